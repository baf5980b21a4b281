"""Shared fixtures: real DICOMs from pydicom-data, real CXRs from ../shared/data, committed NIH samples."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "tests" / "data" / "nih"
SHARED = Path(os.environ.get("CXR_SHARED_DATA", ROOT.parent / "shared" / "data"))


def pydicom_data_dir() -> Path:
    import data_store

    return Path(data_store.__file__).parent / "data"


@pytest.fixture(scope="session")
def dcm_dir() -> Path:
    return pydicom_data_dir()


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "pretrain.csv").exists():
        if os.environ.get("CI"):
            pytest.fail(f"CI must have the shared data at {SHARED}")
        pytest.skip(f"shared data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    """This checkout built as a wheel (no dependencies), once per session (test_wheel, test_slim)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("cxr_embed-*.whl")
    return whl


@pytest.fixture(scope="session")
def embedder():
    from cxr_embed import Embedder

    return Embedder("imagenet-effnet-lite0", batch_size=8)


@pytest.fixture(scope="session")
def tb_store(shared, tmp_path_factory):
    """A real store of the TB task (326 images) embedded with the ImageNet baseline, built once."""
    from cxr_embed.cli import main

    out = tmp_path_factory.mktemp("stores") / "tb.imagenet.h5"
    code = main(["embed", "--images", str(shared / "tasks" / "tb_shenzhen_mc.csv"), "--image-root", str(shared),
                 "--out", str(out), "--model", "imagenet-effnet-lite0", "--no-progress"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def pool_by_source(shared, tmp_path_factory) -> Path:
    """A small real pool: 6 rows of each (source, class of configs/finding-classes.yaml) pair of
    ../shared/data/pretrain.csv (8 pairs, 48 rows), seeded; every column of the pool CSV kept."""
    import csv
    import re

    import numpy as np
    import yaml

    rows = list(csv.DictReader(open(shared / "pretrain.csv", newline="")))
    patterns = list(yaml.safe_load((ROOT / "configs" / "finding-classes.yaml").read_text()).items())
    cells: dict = {}
    for r in rows:
        cls = next(c for p, c in patterns if re.match(p, r["finding"]))
        cells.setdefault((r["source"], cls), []).append(r)
    rng = np.random.default_rng(0)
    pick = [cell[i] for key in sorted(cells) for cell in [cells[key]] for i in sorted(rng.choice(len(cell), 6, replace=False))]
    return write_rows(tmp_path_factory.mktemp("pool_by_source") / "pool.csv", pick)


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows of a pool or task CSV (dicts with the same keys) written as a CSV with their header."""
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path
