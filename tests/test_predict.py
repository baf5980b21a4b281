"""`predict`, `evaluate` and `probe` end to end on real stores and images: string labels with and
without --positive, multi-class labels, the predict CSV and its resume, evaluate against a hand
computation, and the newcomer's `predict --example`."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from cxr_embed import Embedder, Store
from cxr_embed.cli import main
from probes import load_probe
from probes.examples import example_probe_path
from probes.predict import predict_images


def _write(path, header, rows):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def task(shared):
    with open(shared / "tasks" / "tb_shenzhen_mc.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tb_words(task, tmp_path_factory):
    """The TB task with string labels: TB / normal."""
    rows = [[r["image"], "TB" if r["label"] == "1" else "normal", r["split"], r["patient_id"]] for r in task]
    return _write(tmp_path_factory.mktemp("labels") / "tb_words.csv", ["image", "label", "split", "patient_id"], rows)


@pytest.fixture(scope="module")
def tb_probe(tb_store, tb_words, tmp_path_factory):
    out = tmp_path_factory.mktemp("probes") / "tb.json"
    assert main(["probe", "--store", str(tb_store), "--labels", str(tb_words), "--positive", "TB", "--out", str(out)]) == 0
    return out


def _test_split(task, store_path):
    test = [r for r in task if r["split"] == "test"]
    return Store(store_path).get([r["image"] for r in test]), np.array([r["label"] == "1" for r in test])


def test_string_labels_need_positive_and_the_named_class_is_the_positive_one(tb_store, tb_words, tb_probe, task,
                                                                              tmp_path, capsys):
    assert main(["probe", "--store", str(tb_store), "--labels", str(tb_words), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert "--positive 'TB'" in err and "--positive 'normal'" in err and not (tmp_path / "x.json").exists()
    normal = tmp_path / "normal.json"
    assert main(["probe", "--store", str(tb_store), "--labels", str(tb_words), "--positive", "normal",
                 "--out", str(normal)]) == 0
    X, is_tb = _test_split(task, tb_store)
    p_tb = load_probe(tb_probe).predict_proba(X)[:, 1]
    p_normal = load_probe(normal).predict_proba(X)[:, 1]
    assert p_tb[is_tb].mean() > 0.5 > p_tb[~is_tb].mean()  # high P(TB) on TB images
    assert p_normal[~is_tb].mean() > 0.5 > p_normal[is_tb].mean()
    assert roc_auc_score(is_tb, p_tb) > 0.7 and roc_auc_score(is_tb, p_normal) < 0.3


def test_evaluate_matches_a_hand_computation(tb_probe, tb_store, tb_words, task, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--probe", str(tb_probe), "--store", str(tb_store), "--labels", str(tb_words),
                 "--positive", "TB", "--json", str(out)]) == 0
    assert "AUPRC" in capsys.readouterr().out
    got = json.loads(out.read_text())
    probe = load_probe(tb_probe)
    X, y = _test_split(task, tb_store)  # `auto`: the file has splits, so the test split is scored
    p = probe.predict_proba(X)[:, 1]
    called = p >= probe.threshold_
    tp, fn = int((called & y).sum()), int((~called & y).sum())
    tn, fp = int((~called & ~y).sum()), int((called & ~y).sum())
    assert (got["n"], got["n_pos"], got["tp"], got["fn"], got["tn"], got["fp"]) == (len(y), y.sum(), tp, fn, tn, fp)
    assert got["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert got["auprc"] == pytest.approx(average_precision_score(y, p), abs=1e-12)
    assert got["sensitivity"] == pytest.approx(tp / (tp + fn)) and got["specificity"] == pytest.approx(tn / (tn + fp))
    assert got["auc_ci_low"] < got["auc"] < got["auc_ci_high"] and got["auprc_ci_low"] < got["auprc"] < got["auprc_ci_high"]
    assert got["threshold"] == probe.threshold_ and got["positive"] == "TB"


def test_evaluate_refuses_a_positive_class_the_probe_was_not_trained_on(tb_probe, tb_store, tb_words, task,
                                                                        tmp_path, capsys):
    """A probe of P(TB) evaluated with --positive normal used to give AUC 0.05 and exit 0: every score read
    the wrong way round. The probe file records its training labels' class names, and evaluate checks."""
    assert json.loads(tb_probe.read_text())["class_names"] == ["normal", "TB"]
    assert load_probe(tb_probe).class_names_ == ["normal", "TB"]
    out = tmp_path / "e.json"
    assert main(["evaluate", "--probe", str(tb_probe), "--store", str(tb_store), "--labels", str(tb_words),
                 "--positive", "normal", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gives the probability of 'TB'" in err and "'normal' as positive" in err and "--positive TB" in err
    assert not out.exists()
    # without --positive the probe's own positive class is used; the numbers are those of --positive TB
    assert main(["evaluate", "--probe", str(tb_probe), "--store", str(tb_store), "--labels", str(tb_words),
                 "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    X, y = _test_split(task, tb_store)
    assert got["positive"] == "TB" and got["auc"] == pytest.approx(roc_auc_score(y, load_probe(tb_probe).predict_proba(X)[:, 1]))
    # 0/1 labels of the same task: a class name and a 0/1 label cannot be matched, so a warning, not a refusal
    ones = _write(tmp_path / "tb01.csv", ["image", "label", "split"], [[r["image"], r["label"], r["split"]] for r in task])
    assert main(["evaluate", "--probe", str(tb_probe), "--store", str(tb_store), "--labels", str(ones),
                 "--positive", "1"]) == 0
    assert "trained with 'TB' as positive and tb01.csv has '1'" in capsys.readouterr().err


def test_yes_no_labels_keep_their_side_through_the_probe_file(tb_store, task, tmp_path, capsys):
    """Trained with --positive no (the false side made positive), evaluated without --positive: the
    probe's recorded side is used, not the yes/no default, which would flip it."""
    labels = _write(tmp_path / "normal_yn.csv", ["image", "label", "split"],
                    [[r["image"], "no" if r["label"] == "1" else "yes", r["split"]] for r in task])  # "normal?" no = TB
    probe = tmp_path / "not_normal.json"
    assert main(["probe", "--store", str(tb_store), "--labels", str(labels), "--positive", "no", "--out", str(probe)]) == 0
    assert load_probe(probe).class_names_ == ["yes", "no"]
    out = tmp_path / "e.json"
    assert main(["evaluate", "--probe", str(probe), "--store", str(tb_store), "--labels", str(labels),
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())["auc"] > 0.7  # P(no) = P(TB): high on TB images
    assert main(["evaluate", "--probe", str(probe), "--store", str(tb_store), "--labels", str(labels),
                 "--positive", "yes"]) == 2
    assert "gives the probability of 'no'" in capsys.readouterr().err


def test_multiclass_labels_through_probe_and_predict(tb_store, task, shared, tmp_path):
    labels = _write(tmp_path / "finding.csv", ["image", "label", "split"],
                    [[r["image"], r["finding"], r["split"]] for r in task])
    probe_path = tmp_path / "finding.json"
    assert main(["probe", "--store", str(tb_store), "--labels", str(labels), "--out", str(probe_path)]) == 0
    probe = load_probe(probe_path)
    classes = sorted({r["finding"] for r in task})
    assert list(probe.classes_) == classes and len(classes) == 4
    picks = [r["image"] for r in task if r["split"] == "test"][:3]
    images = _write(tmp_path / "some.csv", ["image"], [[i] for i in picks])
    out = tmp_path / "scores.csv"
    assert main(["predict", "--probe", str(probe_path), "--images", str(images), "--image-root", str(shared),
                 "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out, newline="")))
    cols = [f"finding.P({c})" for c in classes]
    assert [r["image"] for r in rows] == picks and all(c in rows[0] for c in cols + ["finding.predicted"])
    got = np.array([[float(r[c]) for c in cols] for r in rows])
    want = probe.predict_proba(Store(tb_store).get(picks))
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert [r["finding.predicted"] for r in rows] == [classes[i] for i in want.argmax(1)]


def test_predict_csv_content_and_resume(tb_probe, samples, dcm_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    jpgs = sorted(samples.glob("*.jpg"))[:3]
    for p in jpgs:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "chest.dcm").write_bytes((dcm_dir / "RG1_UNCR.dcm").read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    out = tmp_path / "scores.csv"
    first = predict_images(folder, out, probes=tb_probe, progress=False)
    assert (first.scored, first.failed, first.skipped) == (4, 1, 0)
    rows = {r["image"]: r for r in csv.DictReader(open(out, newline=""))}
    assert list(next(csv.reader(open(out)))) == ["image", "tb.probability", "tb.decision", "reliable",
                                                  "is_frontal_cxr", "chest_check_reasons", "error"]
    assert rows["broken.png"]["error"] and rows["broken.png"]["tb.probability"] == ""
    probe = load_probe(tb_probe)
    emb = Embedder("imagenet-effnet-lite0").embed([folder / p.name for p in jpgs] + [folder / "chest.dcm"])
    want = probe.predict_proba(emb)[:, 1]
    for name, p in zip([p.name for p in jpgs] + ["chest.dcm"], want):
        r = rows[name]
        assert float(r["tb.probability"]) == pytest.approx(p, abs=1e-4)
        assert r["tb.decision"] == str(int(float(r["tb.probability"]) >= probe.threshold_))
        assert r["is_frontal_cxr"] == r["reliable"] == "1" and r["chest_check_reasons"] == ""
    before = out.read_bytes()
    again = predict_images(folder, out, probes=tb_probe, progress=False)
    assert (again.scored, again.failed, again.skipped) == (0, 0, 5) and out.read_bytes() == before
    (folder / "new.jpg").write_bytes(sorted(samples.glob("*.jpg"))[3].read_bytes())
    third = predict_images(folder, out, probes=tb_probe, progress=False)
    assert (third.scored, third.skipped) == (1, 5) and out.read_bytes().startswith(before)
    assert [r["image"] for r in csv.DictReader(open(out, newline=""))].count("new.jpg") == 1


def test_predict_refuses_to_resume_with_a_probe_trained_again_under_its_name(tb_probe, tb_store, tb_words, samples,
                                                                             tmp_path, capsys):
    """A probe retrained into the same file name used to resume its old CSV: `scored 0, N already in the
    file`, exit 0, and the old probe's scores kept as the new one's."""
    folder = tmp_path / "images"
    folder.mkdir()
    for src in sorted(samples.glob("*.jpg"))[:2]:
        (folder / src.name).write_bytes(src.read_bytes())
    probe = tmp_path / "p" / "tb.json"
    probe.parent.mkdir()
    probe.write_bytes(tb_probe.read_bytes())
    out = tmp_path / "scores.csv"
    assert main(["predict", "--probe", str(probe), "--images", str(folder), "--out", str(out), "--no-progress"]) == 0
    record = json.loads((tmp_path / "scores.csv.probes.json").read_text())
    assert list(record["probes"]) == ["tb"] and len(record["probes"]["tb"]) == 16
    before = out.read_bytes()
    assert main(["predict", "--probe", str(probe), "--images", str(folder), "--out", str(out), "--no-progress"]) == 0
    assert "scored 0 image(s)" in capsys.readouterr().out  # the same probe: resumed
    assert main(["probe", "--store", str(tb_store), "--labels", str(tb_words), "--positive", "TB", "--kind", "gbm",
                 "--out", str(probe)]) == 0  # trained again, same name
    capsys.readouterr()
    assert main(["predict", "--probe", str(probe), "--images", str(folder), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "written by another version of probe(s) tb" in err and "scores.csv.probes.json" in err
    assert out.read_bytes() == before
    (tmp_path / "scores.csv.probes.json").unlink()  # a CSV without its record (an earlier cxr-embed): refused too
    assert main(["predict", "--probe", str(probe), "--images", str(folder), "--out", str(out), "--no-progress"]) == 2
    assert "does not record which probes wrote it" in capsys.readouterr().err
    out.unlink()
    assert main(["predict", "--probe", str(probe), "--images", str(folder), "--out", str(out), "--no-progress"]) == 0
    assert "scored 2 image(s)" in capsys.readouterr().out


def test_predict_refuses_an_output_of_other_probes(tb_probe, samples, tmp_path, capsys):
    out = _write(tmp_path / "scores.csv", ["image", "other.probability"], [["a.jpg", "0.5"]])
    assert main(["predict", "--probe", str(tb_probe), "--images", str(samples), "--out", str(out)]) == 2
    assert "other columns" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_example_prints_a_score(capsys):
    """The README's second set-up command: the shipped probe on the shipped radiograph, no data needed."""
    assert main(["predict", "--example"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if "nih-pneumonia-linear.probability" in ln)
    probe = load_probe(example_probe_path())
    assert float(line.split(":")[-1]) >= probe.threshold_  # the image's report says pneumonia
    assert "is_frontal_cxr: 1" in out


def test_evaluate_without_a_split_column_warns_that_training_rows_count(tb_probe, tb_store, task, tmp_path, capsys):
    labels = _write(tmp_path / "nosplit.csv", ["image", "label"],
                    [[r["image"], "TB" if r["label"] == "1" else "normal"] for r in task])
    assert main(["evaluate", "--probe", str(tb_probe), "--store", str(tb_store), "--labels", str(labels)]) == 0
    captured = capsys.readouterr()
    assert "(every row)" in captured.out or "every row" in captured.out
    assert "nosplit.csv has no split column, so every row is scored" in captured.err
