"""SupCon pretraining on real CXRs, tiny sizes so it runs on the CPU in seconds."""

import csv
import json
import shutil
import subprocess

import numpy as np
import pytest
import torch

from cxr_embed import create_model
from cxr_embed.augment import AugmentConfig, augment
from cxr_embed.cli import main
from cxr_embed.errors import CxrEmbedError
from cxr_embed.models import read_checkpoint_metadata
from cxr_embed.pretrain import ClassBalancedBatches, PretrainConfig
from conftest import write_rows


@pytest.fixture(scope="module")
def small_pool(shared, tmp_path_factory):
    rows = list(csv.DictReader(open(shared / "pretrain.csv")))
    rng = np.random.default_rng(0)
    pick = [rows[i] for i in rng.choice(len(rows), 48, replace=False)]
    pick[0]["abnormal"], pick[1]["abnormal"] = "0", "1"
    return write_rows(tmp_path_factory.mktemp("pool") / "pool.csv", pick)


def _config(tmp_path, pool, shared, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = {"labels": str(pool), "image_root": str(shared), "out_dir": str(tmp_path / "run"), "input_size": 64,
           "batch_size": 16, "epochs": 3, "holdout": 10, "log_every": 1, "checkpoint_every": 1, "warmup_steps": 2,
           "threads": 2, **kw}
    path = tmp_path / "cfg.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_files_and_unknown_keys(tmp_path):
    (tmp_path / "a.toml").write_text('epochs = 3\nlabel_columns = ["a", "b"]\n[augment]\nnoise = 0.0\n')
    cfg = PretrainConfig.from_file(tmp_path / "a.toml")
    assert cfg.epochs == 3 and cfg.label_columns == ["a", "b"] and cfg.augment.noise == 0.0
    (tmp_path / "b.yaml").write_text("epocs: 3\n")
    with pytest.raises(CxrEmbedError, match="unknown setting.*epocs"):
        PretrainConfig.from_file(tmp_path / "b.yaml")


def test_augment_shapes_and_determinism():
    imgs = torch.randint(0, 256, (4, 64, 64), dtype=torch.uint8)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = augment(imgs, AugmentConfig(), g1), augment(imgs, AugmentConfig(), g2)
    assert a.shape == (4, 3, 64, 64) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a, augment(imgs, AugmentConfig(), g1))


def test_sampler_keeps_several_of_each_class():
    labels = np.array([0] * 90 + [1] * 30 + [2] * 6)
    s = ClassBalancedBatches(labels, batch_size=24, classes_per_batch=3, seed=0)
    for batch in s.epoch(0):
        assert len(batch) == 24 and all((labels[batch] == c).sum() == 8 for c in range(3))
    assert [b.tolist() for b in s.epoch(1)] == [b.tolist() for b in s.epoch(1)]


def test_pretrain_runs_resumes_and_writes_a_loadable_checkpoint(tmp_path, small_pool, shared, capsys):
    cfg = _config(tmp_path, small_pool, shared, max_steps=2)
    assert main(["pretrain", "--config", str(cfg), "--no-progress"]) == 0
    assert main(["pretrain", "--config", str(cfg), "--set", "max_steps=3", "--no-progress"]) == 0
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    events = [e["event"] for e in log]
    assert "resumed" in events and [e for e in log if e["event"] == "resumed"][0]["step"] == 2
    assert [e["step"] for e in log if e["event"] == "train"][-1] == 3
    assert all(e["holdout_auc"] is None or 0 <= e["holdout_auc"] <= 1 for e in log if e["event"] == "quick_probe")
    ckpt = tmp_path / "run" / "cxr-supcon-effnet-lite0.safetensors"
    model = create_model(str(ckpt))
    base = create_model("imagenet-effnet-lite0")
    assert model.name == "cxr-supcon-effnet-lite0" and model.weights_hash != base.weights_hash
    meta = read_checkpoint_metadata(ckpt)
    assert json.loads(meta["config"])["batch_size"] == 16 and len(meta["data_hash"]) == 16
    assert {"git_commit", "hardware", "train_seconds", "preprocess"} <= set(meta)


def test_multi_label_columns(tmp_path, shared):
    rows = list(csv.DictReader(open(shared / "tasks" / "nih_findings.csv")))[:40]
    path = write_rows(tmp_path / "nih.csv", rows)
    cfg = _config(tmp_path, path, shared, label_columns=["Effusion", "Infiltration", "no_finding"], max_steps=1,
                  min_class_count=2, holdout=5)
    assert main(["pretrain", "--config", str(cfg), "--no-progress"]) == 0
    events = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert events[-1]["event"] == "done"


@pytest.mark.slow
def test_torchrun_ddp_on_cpu_with_gloo(tmp_path, small_pool, shared):
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not on PATH")
    cfg = _config(tmp_path, small_pool, shared, max_steps=2, threads=1, batch_size=8)
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "cxr_embed", "pretrain",
                           "--config", str(cfg), "--no-progress"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e for e in log if e["event"] == "start"][0]["world"] == 2
    assert (tmp_path / "run" / "cxr-supcon-effnet-lite0.safetensors").exists()


FINDINGS = {"label_columns": ["finding"], "label_map": "configs/finding-classes.yaml"}


def test_finer_labels_and_source_balance_from_a_pack_are_recorded(tmp_path, pool_by_source, shared, monkeypatch):
    """Train from a pack built for `abnormal` with the finer classes and source-balanced batches: the
    checkpoint records the map, the per-source composition and the data hash the CSV gives."""
    from cxr_embed.pool import build_pack, load_pool_from_csv
    from conftest import ROOT

    monkeypatch.chdir(ROOT)  # label_map's path is relative to the current folder, as in the configs
    parts = build_pack(PretrainConfig.from_dict({"labels": str(pool_by_source), "image_root": str(shared),
                                                 "input_size": 64}), tmp_path / "pool.h5", parts=2, progress=False)
    settings = {**FINDINGS, "balance_by": ["source"], "min_class_count": 2, "max_steps": 1}
    cfg = _config(tmp_path, pool_by_source, shared, packs=[str(p) for p in parts], **settings)
    assert main(["pretrain", "--config", str(cfg), "--no-progress"]) == 0
    meta = read_checkpoint_metadata(tmp_path / "run" / "cxr-supcon-effnet-lite0.safetensors")
    recorded = json.loads(meta["config"])
    assert recorded["label_map"][0] == ["Normal$", "normal"] and recorded["balance_by"] == ["source"]
    csv_pool = load_pool_from_csv(PretrainConfig.from_dict({**recorded, "packs": []}), progress=False)
    assert meta["data_hash"] == csv_pool.data_hash
    composition = json.loads(meta["classes"])
    assert set(composition) == {"normal", "covid19", "tuberculosis", "bacterial_pneumonia", "viral_pneumonia"}
    assert set(composition["covid19"]) == {"covid19_radiography_db", "covid_cxnet", "hannover_mhh"}
    assert all(share == pytest.approx(1 / 3, abs=1e-3) for _, share in composition["covid19"].values())


def test_a_resumed_source_balanced_run_ends_where_an_unbroken_one_does(tmp_path, pool_by_source, shared, monkeypatch,
                                                                     capsys):
    from conftest import ROOT

    monkeypatch.chdir(ROOT)
    settings = {**FINDINGS, "balance_by": ["source"], "min_class_count": 2, "holdout": 5}
    runs = {}
    for name, stops in (("straight", [3]), ("resumed", [2, 3])):
        cfg = _config(tmp_path / name, pool_by_source, shared, **settings)
        for stop in stops:
            assert main(["pretrain", "--config", str(cfg), "--set", f"max_steps={stop}", "--no-progress"]) == 0
        runs[name] = create_model(str(tmp_path / name / "run" / "cxr-supcon-effnet-lite0.safetensors")).weights_hash
    assert runs["straight"] == runs["resumed"]
    changed = _config(tmp_path / "resumed", pool_by_source, shared, **{**settings, "balance_by": []})
    assert main(["pretrain", "--config", str(changed), "--set", "max_steps=4", "--no-progress"]) != 0
    assert "was written by a run with other balance_by (balance_by=['source'])" in capsys.readouterr().err


def test_a_time_limit_ends_the_run_with_a_marked_checkpoint(tmp_path, small_pool, shared):
    cfg = _config(tmp_path, small_pool, shared, max_train_seconds=1e-6, probe_every=0)
    assert main(["pretrain", "--config", str(cfg), "--no-progress"]) == 0
    meta = read_checkpoint_metadata(tmp_path / "run" / "cxr-supcon-effnet-lite0.safetensors")
    assert json.loads(meta["stopped_early"]) is True and json.loads(meta["steps"]) == 1
    assert json.loads(meta["planned_steps"]) == 3 * 2  # 3 epochs of 38 training images in batches of 16
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [e["step"] for e in log if e["event"] == "stopped_early"] == [1]
