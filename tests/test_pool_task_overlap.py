"""scripts/pool_task_overlap.py on real films: Cohen task images that the shared pool holds again as
Hannover images (the same film, re-cropped and slightly rotated), against other pool films."""

from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from cxr_embed.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def overlap():
    spec = importlib.util.spec_from_file_location("pool_task_overlap", ROOT / "scripts" / "pool_task_overlap.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["pool_task_overlap"] = module
    spec.loader.exec_module(module)
    return module


def test_finds_copies_the_pool_filter_missed_and_nothing_else(overlap, shared, tmp_path, capsys):
    cohen = [r for r in csv.DictReader(open(shared / "tasks" / "covid_cohen.csv"))]
    pool = [r for r in csv.DictReader(open(shared / "pretrain.csv"))]
    hannover = {Path(r["image"]).name: r for r in pool if r["source"] == "hannover_mhh"}
    shared_names = [r for r in cohen if Path(r["image"]).name in hannover][:3]
    assert len(shared_names) == 3  # the same film under its own name in both collections
    others = [r for r in pool if r["source"] == "hannover_mhh" and Path(r["image"]).name not in
              {Path(c["image"]).name for c in cohen}][:4]
    unrelated = [r for r in cohen if Path(r["image"]).name not in hannover][:3]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    with open(tasks / "covid_cohen.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cohen[0]))
        w.writeheader()
        w.writerows(shared_names + unrelated)
    pool_rows = [hannover[Path(r["image"]).name] for r in shared_names] + others
    with open(tmp_path / "pretrain.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(pool[0]))
        w.writeheader()
        w.writerows(pool_rows)
    for name, csv_path in (("task", tasks / "covid_cohen.csv"), ("pool", tmp_path / "pretrain.csv")):
        assert cli(["embed", "--images", str(csv_path), "--image-root", str(shared), "--out", str(tmp_path / f"{name}.h5"),
                    "--model", "imagenet-effnet-lite0", "--no-progress"]) == 0
    out, exclude = tmp_path / "overlap.csv", tmp_path / "exclude.txt"
    capsys.readouterr()
    assert overlap.main(["--pool-store", str(tmp_path / "pool.h5"), "--task-store", str(tmp_path / "task.h5"),
                         "--tasks", str(tasks), "--image-root", str(shared), "--neighbours", "3", "--workers", "1",
                         "--out", str(out), "--exclude-out", str(exclude)]) == 0
    rows = list(csv.DictReader(open(out)))
    copies = {(r["task_image"], r["pool_image"]) for r in rows if r["copy"] == "1"}
    truth = {(r["image"], hannover[Path(r["image"]).name]["image"]) for r in shared_names}
    assert copies == truth, [(r["task_image"], r["pool_image"], r["inliers"]) for r in rows]
    assert all(int(r["inliers"]) < 8 for r in rows if (r["task_image"], r["pool_image"]) not in truth)
    assert exclude.read_text().split() == sorted(p for _, p in truth)
    assert "covid_cohen" in capsys.readouterr().out
