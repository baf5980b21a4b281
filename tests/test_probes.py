import csv
import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_score

from cxr_embed import ModelMismatch, Store
from cxr_embed.cli import main
from cxr_embed.errors import LabelError
from probes import Probe, ProbeFileError, auc_ci, delong_test, load_probe, save_probe, sensitivity_specificity, train_probe
from cxr_embed.labels import MIN_PER_CLASS, read_labels
from probes.curve import draw_training_set
from probes.metrics import logit_interval
from conftest import write_rows


@pytest.fixture(scope="module")
def tb(tb_store, shared):
    store = Store(tb_store)
    table = read_labels(shared / "tasks" / "tb_shenzhen_mc.csv", require_split=True)
    X = store.get(table.images)
    tr = np.array([s == "train" for s in table.splits])
    return store, X[tr], table.labels[tr], X[~tr], table.labels[~tr]


@pytest.mark.parametrize("kind", ["linear", "gbm"])
def test_probe_on_real_embeddings(tb, kind):
    store, Xtr, ytr, Xte, yte = tb
    probe = train_probe(Xtr, ytr, kind=kind, identity=store.identity)
    p = probe.predict_proba(Xte)
    assert p.shape == (len(yte), 2) and np.allclose(p.sum(1), 1)
    assert roc_auc_score(yte, p[:, 1]) > 0.7  # TB is visible on ImageNet features too
    assert 0 < probe.threshold_ < 1 and probe.threshold_info_["method"] == "youden"
    assert set(probe.predict(Xte)) <= {0, 1}
    d = probe.decision_function(Xte)
    assert d.shape == (len(yte),) and np.corrcoef(d, p[:, 1])[0, 1] > 0.9


def test_45_labels_work(tb):
    _, Xtr, ytr, Xte, yte = tb
    idx = draw_training_set(ytr, [""] * len(ytr), 45, np.random.default_rng(1))
    assert 40 <= len(idx) <= 50 and min(np.bincount(ytr[idx])) >= 5
    for kind in ("linear", "gbm"):
        probe = train_probe(Xtr[idx], ytr[idx], kind=kind)
        assert roc_auc_score(yte, probe.predict_proba(Xte)[:, 1]) > 0.6


def test_sklearn_compatibility(tb):
    _, Xtr, ytr, _, _ = tb
    probe = Probe(kind="linear", cv=3)
    assert clone(probe).get_params()["kind"] == "linear"
    scores = cross_val_score(probe, Xtr, ytr, cv=3, scoring="roc_auc")
    assert scores.shape == (3,) and scores.mean() > 0.7
    cal = CalibratedClassifierCV(Probe(kind="linear", cv=3), cv=3).fit(Xtr, ytr)
    assert cal.predict_proba(Xtr[:5]).shape == (5, 2)


def test_multiclass_and_string_labels(tb):
    _, Xtr, ytr, Xte, _ = tb
    # three classes from real data: normal, TB in even rows, TB in odd rows (mechanics only)
    y3 = np.where(ytr == 0, "normal", np.where(np.arange(len(ytr)) % 2 == 0, "tb-a", "tb-b"))
    for kind in ("linear", "gbm"):
        probe = train_probe(Xtr, y3, kind=kind)
        p = probe.predict_proba(Xte)
        assert p.shape == (len(Xte), 3) and np.allclose(p.sum(1), 1)
        assert list(probe.classes_) == ["normal", "tb-a", "tb-b"] and probe.threshold_ is None
        assert set(probe.predict(Xte)) <= set(probe.classes_)


def test_too_few_examples_named(tb):
    _, Xtr, ytr, _, _ = tb
    idx = np.r_[np.flatnonzero(ytr == 0)[:10], np.flatnonzero(ytr == 1)[:2]]
    with pytest.raises(LabelError, match=rf"at least {MIN_PER_CLASS} .*1: 2"):
        train_probe(Xtr[idx], ytr[idx])
    with pytest.raises(LabelError, match="two classes"):
        train_probe(Xtr[:10], np.zeros(10))


def test_target_sensitivity_threshold(tb):
    _, Xtr, ytr, Xte, yte = tb
    probe = train_probe(Xtr, ytr, threshold_method="sensitivity", target_sensitivity=0.95)
    youden = train_probe(Xtr, ytr)
    assert probe.threshold_ <= youden.threshold_
    sens, spec = sensitivity_specificity(yte == 1, probe.predict_proba(Xte)[:, 1], probe.threshold_)
    assert sens >= 0.8 and 0 <= spec <= 1


@pytest.mark.parametrize("kind", ["linear", "gbm"])
def test_save_load_is_plain_json_and_checks_model(tb, tmp_path, kind):
    store, Xtr, ytr, Xte, _ = tb
    probe = train_probe(Xtr, ytr, kind=kind, identity=store.identity)
    path = save_probe(probe, tmp_path / f"tb-{kind}.json")
    doc = json.loads(path.read_text())
    assert doc["params"]["identity"]["weights_hash"] == store.identity["weights_hash"]
    back = load_probe(path, expected_identity=store.identity)
    np.testing.assert_allclose(back.predict_proba(Xte), probe.predict_proba(Xte), atol=1e-9)
    other = dict(store.identity, weights_hash="0123456789abcdef")
    with pytest.raises(ModelMismatch, match="weights_hash"):
        load_probe(path, expected_identity=other)
    with pytest.raises(ModelMismatch):
        probe.check_model(other)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProbeFileError, match="cannot read probe"):
        load_probe(tmp_path / "bad.json")


def _delong_bruteforce(y, s):
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(1), psi.mean(0)
    return psi.mean(), np.var(v10, ddof=1) / len(pos) + np.var(v01, ddof=1) / len(neg)


def test_delong_matches_definition():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(y * 0.8 + rng.normal(size=300), 1)  # ties on purpose
    a = auc_ci(y, s)
    auc, var = _delong_bruteforce(y, s)
    assert a.auc == pytest.approx(auc) == pytest.approx(roc_auc_score(y, s))
    assert a.se == pytest.approx(np.sqrt(var))
    assert (a.ci_low, a.ci_high) == pytest.approx(logit_interval(auc, np.sqrt(var)))
    assert a.ci_low < auc < a.ci_high
    same = delong_test(y, s, s)
    assert same.p_value == 1.0 and same.difference == 0
    noise = delong_test(y, s, rng.normal(size=300))
    assert noise.difference > 0.2 and noise.p_value < 1e-6


def test_curve_command(tb_store, shared, tmp_path, capsys):
    # a store missing some labelled images is reported, not silently dropped
    rows = list(csv.DictReader(open(shared / "tasks" / "tb_shenzhen_mc.csv")))
    labels = write_rows(tmp_path / "tb.csv", rows + [dict(rows[0], image="images/not/embedded.jpg")])
    out = tmp_path / "curve"
    code = main(["curve", "--store", str(tb_store), "--labels", str(labels), "--sizes", "45,85,full",
                 "--repeats", "3", "--out", str(out), "--no-progress"])
    assert code == 0
    said = capsys.readouterr()
    text = said.out + said.err
    assert "1 labelled image(s) have no embedding" in text
    curve = list(csv.DictReader(open(out / "curve.csv")))
    assert len(curve) == (3 + 3 + 1) * 3  # linear, gbm, and the baseline (TB's view: Shenzhen "frontal", Montgomery "PA")
    summary = list(csv.DictReader(open(out / "summary.csv")))
    assert {r["probe"] for r in summary} == {"linear", "gbm"} and len(summary) == 9
    assert {r["model"] for r in summary} == {"imagenet-effnet-lite0", "metadata only (view)"}
    for r in summary:
        assert float(r["auc_ci_low"]) <= float(r["auc_mean"]) <= float(r["auc_ci_high"])
    full = [r for r in summary if r["size"] == "full"]
    assert all(int(r["n_train"]) == 228 for r in full)
    assert (out / "curve.png").stat().st_size > 10_000
    assert {r["ci_method"] for r in summary} == {summary[0]["ci_method"]}  # one kind of interval at every size
    assert all(int(r["n_test"]) == 98 and int(r["draws"]) == (1 if r["size"] == "full" else 3) for r in summary)
    assert all(0 < float(r["auprc_ci_low"]) <= float(r["auprc_mean"]) <= float(r["auprc_ci_high"]) for r in summary)
    assert (out / "curve.csv").exists() and not (out / "comparison.csv").exists()  # one store: nothing to compare
    fits = list(csv.DictReader(open(out / "fit.csv")))  # 3 sizes: the power law is fitted (not for the baseline)
    assert [(r["model"], r["probe"], r["target_auc"]) for r in fits] == [
        ("imagenet-effnet-lite0", "linear", "0.8"), ("imagenet-effnet-lite0", "gbm", "0.8")]
    for r in fits:
        assert r["sizes"] == "45;85;228" and int(r["bootstrap"]) == 2000 and float(r["a"]) <= 1.0
        assert float(r["a_ci_low"]) <= float(r["a"]) <= float(r["a_ci_high"])
        assert r["status"] in ("not reached", "below smallest size", "interpolated", "extrapolated", "far extrapolation")
        if r["status"] != "not reached":
            assert float(r["labels_ci_low"]) <= float(r["labels_needed"]) <= float(r["labels_ci_high"])
    assert "fit imagenet-effnet-lite0 / linear: AUC(n) = " in said.out and "  AUC 0.8: " in said.out


def test_curve_compares_two_stores_with_delong(tb_store, shared, tmp_path, capsys):
    other = tmp_path / "copy.h5"
    other.write_bytes(tb_store.read_bytes())
    out = tmp_path / "cmp"
    assert main(["curve", "--store", str(tb_store), "--store", str(other), "--labels",
                 str(shared / "tasks" / "tb_shenzhen_mc.csv"), "--sizes", "45,full", "--repeats", "2",
                 "--probe", "linear", "--out", str(out), "--no-progress"]) == 0
    rows = list(csv.DictReader(open(out / "comparison.csv")))
    assert [r["size"] for r in rows] == ["45", "full"] and [r["draws"] for r in rows] == ["2", "1"]
    for r in rows:  # the same embeddings: every replicate's difference is 0
        assert float(r["difference"]) == float(r["diff_ci_low"]) == float(r["diff_ci_high"]) == 0.0
        assert float(r["p_one_sided"]) == float(r["p_holm"]) == 1.0
    said = capsys.readouterr()
    assert "Holm p = 1" in said.out
    assert not (out / "fit.csv").exists() and "no learning-curve fit" in said.err and "at least 3" in said.err


def test_probe_command_and_label_errors(tb_store, shared, tmp_path, capsys):
    out = tmp_path / "tb.json"
    assert main(["probe", "--store", str(tb_store), "--labels", str(shared / "tasks" / "tb_shenzhen_mc.csv"),
                 "--kind", "linear", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "test split: AUC" in text and out.exists()
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label,split\na.jpg,1,train\nb.jpg,,train\n")
    assert main(["curve", "--store", str(tb_store), "--labels", str(bad), "--out", str(tmp_path / "c")]) == 2
    assert "line 3" in capsys.readouterr().err


def test_curve_refuses_a_test_set_that_is_not_held_out_and_bad_counts(tb_store, shared, tmp_path, capsys):
    """Each was taken before: --test-labels naming the training labels scored probes on their own
    training images; a size given twice was fitted and counted twice; --bootstrap 0 crashed at the end."""
    labels = shared / "tasks" / "tb_shenzhen_mc.csv"
    base = ["curve", "--store", str(tb_store), "--labels", str(labels), "--out", str(tmp_path / "c"), "--no-progress",
            "--probe", "linear", "--repeats", "1"]
    assert main([*base, "--sizes", "45", "--test-labels", str(labels)]) == 2
    assert "test image(s) are also training images of" in capsys.readouterr().err
    rows = list(csv.DictReader(open(labels)))
    test_patient = next(r["patient_id"] for r in rows if r["split"] == "test")
    train = next(i for i, r in enumerate(rows) if r["split"] == "train")
    rows[train]["patient_id"] = test_patient  # one patient on both sides
    leaky = write_rows(tmp_path / "leaky.csv", rows)
    assert main([*base[:4], str(leaky), *base[5:], "--sizes", "45"]) == 2
    assert "1 patient id(s) have images in both the training and the test rows" in capsys.readouterr().err
    assert main([*base, "--sizes", "45,85,45"]) == 2
    assert "a size is given twice" in capsys.readouterr().err
    assert main([*base, "--sizes", "45", "--bootstrap", "0"]) == 2
    assert "--bootstrap >= 2" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_size_below_what_a_draw_needs_is_said_not_silently_raised():
    """`--sizes 4,6,8,10` on a binary task gave four rows of n_train 10 and no word why (a newcomer's
    review): a stratified draw holds at least 5 images of each class."""
    import numpy as np

    from probes.curve import plan_draws

    y = np.array([0, 1] * 30)
    said = []
    plan = plan_draws(y, [""] * len(y), [4, 10, 20], 2, 0, log=said.append)
    assert said == ["warning: size 4 is below the 10 images a draw needs (5 of each class): its draws hold 10 "
                    "(the n_train column says so)"]
    assert [len(idx) for size, _, idx in plan if size == 4] == [10, 10]
