"""Fine-tuning baselines (probes/finetune.py) on a tiny real task: 22 Shenzhen/Montgomery radiographs.

Each fit is 2 steps of 4 images here, not the recipe's 100 x 16: what is tested is what the code
does (draws, freezing, resuming, the rows the curve takes in), not how well a network learns.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_embed.cli import main
from cxr_embed.models import create_model
from cxr_embed.runtime import Runtime, RuntimeSettings
from probes.curve import plan_draws
from probes.finetune import FinetuneConfig, build_classifier, load_task, train_fit
from probes.image_cache import canonical, open_or_build
from probes.rows import scores_path
from conftest import write_rows

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--sizes", "10", "--steps", "2", "--batch-size", "4", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(shared, tmp_path_factory):
    """7 + 7 train and 4 + 4 test images of the TB task, its folder, and a store of them (ImageNet)."""
    folder = tmp_path_factory.mktemp("tiny")
    rows = list(csv.DictReader(open(shared / "tasks" / "tb_shenzhen_mc.csv")))
    pick = [r for split, n in (("train", 7), ("test", 4)) for label in "01"
            for r in [r for r in rows if r["split"] == split and r["label"] == label][:n]]
    labels = write_rows(folder / "tb_tiny.csv", pick)
    store = folder / "tb_tiny.imagenet.h5"
    assert main(["embed", "--images", str(labels), "--image-root", str(shared), "--out", str(store),
                 "--model", "imagenet-effnet-lite0", "--no-progress"]) == 0
    return labels, folder, store


def _finetune_args(labels, shared, out, model="imagenet-effnet-lite0", strategy="full", repeats=3):
    return ["finetune", "--labels", str(labels), "--image-root", str(shared), "--model", model, "--strategy", strategy,
            "--repeats", str(repeats), "--out", str(out), *TINY]


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(open(path)))


@pytest.mark.slow
def test_killed_run_resumes_without_duplicates_and_joins_the_curve(tiny, shared, tmp_path, capsys):
    labels, _, store = tiny
    out = tmp_path / "ft.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "cxr_embed", *_finetune_args(labels, shared, out, repeats=4)],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while not (out.exists() and len(_rows(out)) >= 1) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # a real kill, at whatever point the next fit has reached
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    before = {r["repeat"]: r for r in _rows(out)}
    assert 1 <= len(before) < 4
    assert main(_finetune_args(labels, shared, out, repeats=4)) == 0
    assert f"{4 - len(before)} fit(s) run, {len(before)} already" in capsys.readouterr().out
    after = {r["repeat"]: r for r in _rows(out)}
    assert len(_rows(out)) == 4 and sorted(map(int, after)) == list(range(4))  # every draw once
    assert all(after[k] == r for k, r in before.items())  # finished fits were kept, not redone
    records = [json.loads(line) for line in open(scores_path(out))]
    assert len(records) == 4 and all(len(r["scores"]) == 8 for r in records)
    assert main(_finetune_args(labels, shared, out, repeats=4)) == 0
    assert "0 fit(s) run, 4 already" in capsys.readouterr().out

    # the curve's draws are the fine-tuning's: draw k at size 10 is the same set of images
    ids = [r["image"] for r in csv.DictReader(open(labels)) if r["split"] == "train"]
    y = np.array([int(r["label"]) for r in csv.DictReader(open(labels)) if r["split"] == "train"])
    pat = [r["patient_id"] for r in csv.DictReader(open(labels)) if r["split"] == "train"]
    trained = {r["key"][3]: r["train_images"] for r in records}
    for size, rep, idx in plan_draws(y, pat, [10], 4, 0):
        assert trained[rep] == [ids[i] for i in idx]

    # the curve takes the rows in: 3 draws of the linear probe against the first 3 fine-tuning draws
    curve = tmp_path / "curve"
    assert main(["curve", "--store", str(store), "--labels", str(labels), "--sizes", "10", "--repeats", "3",
                 "--probe", "linear", "--bootstrap", "200", "--extra-rows", str(out), "--out", str(curve),
                 "--no-progress"]) == 0
    assert "1 fit(s) of the extra rows are at sizes or draws this curve does not make" in capsys.readouterr().err
    cmp = _rows(curve / "comparison.csv")
    assert len(cmp) == 1
    assert (cmp[0]["model_a"], cmp[0]["probe"]) == ("imagenet-effnet-lite0", "linear")
    assert (cmp[0]["model_b"], cmp[0]["probe_b"], cmp[0]["draws"]) == ("finetune-full:imagenet-effnet-lite0", "finetune", "3")
    assert float(cmp[0]["diff_ci_low"]) <= float(cmp[0]["difference"]) <= float(cmp[0]["diff_ci_high"])
    ft = [r for r in _rows(curve / "curve.csv") if r["probe"] == "finetune"]
    assert [r["repeat"] for r in ft] == ["0", "1", "2"] and all(r["store"] == str(out) for r in ft)
    assert [r["auc"] for r in ft] == [after[k]["auc"] for k in "012"]  # the same test images, the same AUC
    assert {r["model"] for r in _rows(curve / "summary.csv")} >= {"finetune-full:imagenet-effnet-lite0"}

    # draws made with another seed are refused, not compared
    assert main(["curve", "--store", str(store), "--labels", str(labels), "--sizes", "10", "--repeats", "3",
                 "--probe", "linear", "--seed", "1", "--extra-rows", str(out), "--out", str(tmp_path / "c1"),
                 "--no-progress"]) == 2
    assert "was trained on other images than this curve draws" in capsys.readouterr().err


def test_last_block_freezes_everything_but_the_last_block(tiny, shared, tmp_path):
    labels, _, _ = tiny
    base = create_model("cxr-supcon-effnet-lite0")
    task = load_task(labels, shared, base, tmp_path / "cache.h5", None, False, print)
    planes, y = task.cache.planes(task.tr_images), task.tr_y
    last = f"backbone.blocks.{len(base.backbone.blocks) - 1}."
    trains = (last, "backbone.conv_head.", "backbone.bn2.", "head.")
    clf, frozen = build_classifier(base, "last-block")
    grads = {n: p.requires_grad for n, p in clf.named_parameters()}
    assert all(g == n.startswith(trains) for n, g in grads.items()), [n for n, g in grads.items() if g != n.startswith(trains)]
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    cfg = FinetuneConfig(steps=3, batch_size=4, warmup_steps=1)
    train_fit(clf, frozen, planes, y, cfg, 0, torch.device("cpu"), 0.5, 0.5)
    after = clf.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(trains) for k in changed)  # BatchNorm statistics of frozen stages too
    assert any(k.startswith(last) and k.endswith("running_mean") for k in changed)  # the last block's BN trains
    assert {"head.weight", f"{last}0.conv_pw.weight"} <= changed

    full, none = build_classifier(base, "full")
    assert none == [] and all(p.requires_grad for p in full.parameters())
    stem = full.backbone.conv_stem.weight.detach().clone()
    train_fit(full, none, planes, y, cfg, 0, torch.device("cpu"), 0.5, 0.5)
    assert not torch.equal(stem, full.backbone.conv_stem.weight)


def test_cache_holds_the_canonical_input_and_is_rebuilt_when_images_change(tiny, shared, tmp_path, capsys):
    labels, _, _ = tiny
    images = [r["image"] for r in csv.DictReader(open(labels))][:4]
    root = tmp_path / "root"
    for i in images:
        (root / i).parent.mkdir(parents=True, exist_ok=True)
        (root / i).write_bytes((shared / i).read_bytes())
    model = create_model("imagenet-effnet-lite0")
    cache = open_or_build(tmp_path / "c.h5", images, root, model, progress=False)
    rt = Runtime(RuntimeSettings(device="cpu"), model=model)
    want = torch.stack([torch.as_tensor(rt.prepare(root / i).tensor) for i in images])
    got = canonical(cache.planes(images[::-1]), 0.5, 0.5).flip(0)  # any order, the same planes
    assert cache.planes(images).dtype == torch.float16
    assert float((got - want).abs().max()) < 5e-4  # float16's step, in the canonical (x - 0.5) / 0.5 units
    stamp = (tmp_path / "c.h5").stat().st_mtime_ns
    assert open_or_build(tmp_path / "c.h5", images, root, model, progress=False).ids == images
    assert (tmp_path / "c.h5").stat().st_mtime_ns == stamp  # reused, not rebuilt
    (root / images[0]).write_bytes((shared / images[1]).read_bytes())  # the same name, other pixels
    notes = []
    again = open_or_build(tmp_path / "c.h5", images, root, model, progress=False, log=notes.append)
    assert notes and "rebuilding" in notes[0]
    assert torch.equal(again.planes([images[0]]), again.planes([images[1]]))
    (root / images[2]).write_bytes(b"not an image")
    broken = open_or_build(tmp_path / "c.h5", images, root, model, progress=False, log=notes.append)
    assert images[2] not in broken and images[2] in broken.failed and len(broken.ids) == 3


def test_refusals_name_the_file(tiny, shared, tmp_path, capsys):
    labels, _, store = tiny
    out = tmp_path / "ft.csv"
    assert main(_finetune_args(labels, shared, out, repeats=1)) == 0
    capsys.readouterr()
    other = _finetune_args(labels, shared, out, repeats=1)
    other[other.index("--steps") + 1] = "4"  # another recipe into the same rows
    assert main(other) == 2
    assert "made with another recipe" in capsys.readouterr().err
    renamed = tmp_path / "other_task.csv"
    renamed.write_bytes(labels.read_bytes())
    assert main(_finetune_args(renamed, shared, out, repeats=1)) == 2  # its cache, beside the rows, is left alone
    assert "holds fits of task 'tb_tiny', not 'other_task'" in capsys.readouterr().err
    scores_path(out).unlink()
    assert main(["curve", "--store", str(store), "--labels", str(labels), "--sizes", "10", "--repeats", "1",
                 "--probe", "linear", "--extra-rows", str(out), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "has no per-image test scores beside it" in capsys.readouterr().err
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("image,label\na.jpg,1\n")
    assert main(_finetune_args(labels, shared, foreign, repeats=1)) == 2
    assert "is not a rows file of curve.csv's format" in capsys.readouterr().err


# --- a resumed run, and the files it reads, are checked (each case here was taken in silently before) ---


def test_resume_refuses_fits_of_another_run_and_leaves_foreign_rows_alone(tiny, shared, tmp_path, capsys):
    labels, _, _ = tiny
    out = tmp_path / "ft.csv"
    assert main(_finetune_args(labels, shared, out, repeats=1)) == 0
    capsys.readouterr()
    kept = (out.read_bytes(), scores_path(out).read_bytes())

    seed = _finetune_args(labels, shared, out, repeats=1) + ["--seed", "3"]
    assert main(seed) == 2
    assert "fits of another run (other --seed)" in capsys.readouterr().err
    rows = list(csv.DictReader(open(labels)))
    rows[0]["label"] = "1" if rows[0]["label"] == "0" else "0"  # the same file name, another label
    relabelled = write_rows(tmp_path / "tb_tiny.csv", rows)
    assert main(_finetune_args(relabelled, shared, out, repeats=1)) == 2
    assert "(other labels file contents)" in capsys.readouterr().err
    moved = tmp_path / "root"  # the same names under another --image-root, one with other bytes
    for r in rows:
        (moved / r["image"]).parent.mkdir(parents=True, exist_ok=True)
        (moved / r["image"]).write_bytes((shared / r["image"]).read_bytes())
    (moved / rows[1]["image"]).write_bytes((shared / rows[2]["image"]).read_bytes())
    other_root = _finetune_args(labels, moved, out, repeats=1)
    other_root += ["--cache", str(tmp_path / "moved.cache.h5")]
    assert main(other_root) == 2
    assert "(other image bytes under --image-root)" in capsys.readouterr().err

    old = [json.loads(line) for line in open(scores_path(out))]  # records of a version that kept no run
    scores_path(out).write_text("".join(json.dumps({k: v for k, v in r.items() if k != "run"}) + "\n" for r in old))
    assert main(_finetune_args(labels, shared, out, repeats=1)) == 2
    assert "written by an older cxr-embed" in capsys.readouterr().err
    scores_path(out).write_bytes(kept[1])
    assert (out.read_bytes(), scores_path(out).read_bytes()) == kept  # nothing was rewritten by a refusal

    curve_csv = tmp_path / "curve.csv"  # --out naming a curve.csv: the same columns, no scores beside it
    curve_csv.write_bytes(out.read_bytes())
    assert main(_finetune_args(labels, shared, curve_csv, repeats=2)) == 2
    assert "has rows but no per-image scores beside it" in capsys.readouterr().err
    assert curve_csv.read_bytes() == out.read_bytes()


def test_damaged_rows_and_records_are_refused_by_line(tiny, shared, tmp_path, capsys):
    labels, _, _ = tiny
    out = tmp_path / "ft.csv"
    assert main(_finetune_args(labels, shared, out, repeats=1)) == 0
    capsys.readouterr()
    good = scores_path(out).read_bytes()
    for bad, says in ((b"\xff\xfe not utf-8\n", "line 1: not a fit record"),
                      (good.replace(b'"scores": [', b'"scores": [NaN, ', 1), "line 1: not a fit record"),
                      (good.replace(b'"train_images": [', b'"train_images": [1, ', 1), "train_images: a list of image ids")):
        scores_path(out).write_bytes(bad)
        assert main(_finetune_args(labels, shared, out, repeats=1)) == 2
        assert says in capsys.readouterr().err
    scores_path(out).write_bytes(good)
    text = out.read_text().splitlines()
    out.write_text("\n".join([text[0], text[1] + ",extra", *text[2:]]) + "\n")
    assert main(_finetune_args(labels, shared, out, repeats=1)) == 2
    assert "line 2: more fields than the header's 10" in capsys.readouterr().err


def test_a_second_run_on_the_same_rows_is_refused(tiny, shared, tmp_path, capsys):
    from probes.rows import writing

    labels, _, _ = tiny
    out = tmp_path / "ft.csv"
    with writing(out):  # what a running `cxr-embed finetune --out ft.csv` holds
        assert main(_finetune_args(labels, shared, out, repeats=1)) == 2
        assert "another run is writing" in capsys.readouterr().err
    assert not out.exists()
    assert main(_finetune_args(labels, shared, out, repeats=1)) == 0  # released when the holder ends


def test_a_diverged_fit_is_not_stored(tiny, shared, tmp_path, capsys, monkeypatch):
    import probes.finetune as ft

    labels, _, _ = tiny
    out = tmp_path / "ft.csv"
    assert main(_finetune_args(labels, shared, out, repeats=1) + ["--lr", "nan"]) == 2
    assert "a finite lr > 0" in capsys.readouterr().err
    real = ft.score
    monkeypatch.setattr(ft, "score", lambda *a, **k: real(*a, **k) * np.nan)  # what a diverged network scores
    assert main(_finetune_args(labels, shared, out, repeats=1)) == 2
    assert "gave non-finite test scores" in capsys.readouterr().err
    assert not out.exists() and not scores_path(out).exists()


def test_one_class_test_split_is_refused(tiny, shared, tmp_path, capsys):
    labels, _, _ = tiny
    rows = [r for r in csv.DictReader(open(labels)) if r["split"] == "train" or r["label"] == "1"]
    one = write_rows(tmp_path / "one_class.csv", rows)
    assert main(_finetune_args(one, shared, tmp_path / "ft.csv", repeats=1)) == 2
    assert "its test split has one class only" in capsys.readouterr().err


def test_cache_refuses_a_foreign_file_and_rebuilds_a_tampered_one(tiny, shared, tmp_path):
    import h5py

    from probes.image_cache import CacheFileError

    labels, _, store = tiny
    images = [r["image"] for r in csv.DictReader(open(labels))][:3]
    model = create_model("imagenet-effnet-lite0")
    for foreign in (store, labels, tmp_path):  # a store, the labels CSV, a folder: none is overwritten
        before = foreign.read_bytes() if foreign.is_file() else None
        with pytest.raises(CacheFileError, match="name another --cache"):
            open_or_build(foreign, images, shared, model, progress=False)
        assert before is None or foreign.read_bytes() == before
    path = tmp_path / "c.h5"
    good = open_or_build(path, images, shared, model, progress=False)
    want = good.planes(images)
    for tamper, why in ((lambda f: f["planes"].__setitem__(1, np.full((224, 224), np.nan, np.float16)), "not finite"),
                        (lambda f: f["planes"].__setitem__(0, np.full((224, 224), 7, np.float16)), "not in [0, 1]"),
                        (lambda f: (f.__delitem__("planes"), f.create_dataset("planes", data=np.zeros((3, 4, 4), np.float16))),
                         "float16 expected"),
                        (lambda f: f.attrs.__setitem__("data_hash", np.array(["a", "b"], dtype=object)), "other images")):
        with h5py.File(path, "r+") as f:
            tamper(f)
        notes = []
        again = open_or_build(path, images, shared, model, progress=False, log=notes.append)
        assert len(notes) == 1 and why in notes[0] and "rebuilding it" in notes[0], notes
        assert again.ids == images and torch.equal(again.planes(images), want)


def test_curve_refuses_fine_tuning_made_from_other_labels(tiny, shared, tmp_path, capsys):
    """At size `full` every run trains on the same images, so the draw check cannot see that fits were
    made with other labels (another --positive would score them the wrong way round): the record can."""
    labels, _, store = tiny
    out = tmp_path / "ft.csv"
    args = _finetune_args(labels, shared, out, repeats=1)
    args[args.index("--sizes") + 1] = "full"
    assert main(args) == 0
    rows = list(csv.DictReader(open(labels)))
    rows[0]["label"] = "1" if rows[0]["label"] == "0" else "0"
    relabelled = write_rows(tmp_path / "tb_tiny.csv", rows)  # the same task name, one label flipped
    capsys.readouterr()
    assert main(["curve", "--store", str(store), "--labels", str(relabelled), "--sizes", "full", "--probe", "linear",
                 "--bootstrap", "50", "--extra-rows", str(out), "--out", str(tmp_path / "c"), "--no-progress"]) == 2
    assert "was made with another labels_sha256" in capsys.readouterr().err
