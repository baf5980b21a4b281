"""The built wheel, installed into a fresh virtual environment, is what users run: it must hold every
file the code loads, and its chest check must work there (not silently switch itself off)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def test_wheel_holds_every_file_the_code_loads(wheel):
    from cxr_embed.models import package_files

    names = set(zipfile.ZipFile(wheel).namelist())
    needed = [p.relative_to(ROOT).as_posix() for p in package_files()]
    assert needed and all(n in names for n in needed), sorted(set(needed) - names)
    for pkg in ("cxr_embed", "probes", "service"):
        assert f"{pkg}/__init__.py" in names
    page = {f"service/static/{p.name}" for p in (ROOT / "service" / "static").iterdir()}
    assert "service/static/index.html" in page and page <= names, sorted(page - names)
    from probes.examples import example_image_path, example_probe_path

    shipped = [p.relative_to(ROOT).as_posix() for p in (example_probe_path(), example_image_path())]
    assert all(n in names for n in shipped), sorted(set(shipped) - names)  # `predict --example` works from a wheel
    assert {"cxr_embed/weights/cxr-supcon-effnet-lite0.onnx", "cxr_embed/weights/imagenet-effnet-lite0.onnx"} <= names
    # the two ONNX exports (13.5 MB each, float32) are most of it; PyPI refuses files over 100 MB
    assert wheel.stat().st_size < 60e6, f"the wheel is {wheel.stat().st_size / 1e6:.1f} MB"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry).decode()
    assert "[cxr_embed.commands]" in text and "probes.cli:register" in text and "service.cli:register" in text


CHECK = r"""
import io, sys
import numpy as np
from PIL import Image
import cxr_embed
from cxr_embed import Embedder
assert cxr_embed.__file__.startswith(sys.prefix), cxr_embed.__file__  # the wheel, not the checkout
from skimage import data
photo = io.BytesIO(); Image.fromarray(data.chelsea()).resize((512, 384)).save(photo, format="JPEG")
emb = Embedder("imagenet-effnet-lite0", image_check="always")
items = [("tibia", sys.argv[1]), ("chest", sys.argv[2]), ("photo", photo.getvalue())]
for r in emb.iter_embed(items):
    print(r.key, r.chest.is_frontal_cxr, "image" in r.chest.checked_by)
"""


def test_installed_wheel_flags_a_tibia_and_a_photograph(wheel, tmp_path, dcm_dir):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=300,
                   capture_output=True, text=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(py), "-c", CHECK, str(dcm_dir / "RG3_UNCR.dcm"), str(dcm_dir / "RG1_UNCR.dcm")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verdicts = dict((k, (ok == "True", by == "True")) for k, ok, by in (line.split() for line in proc.stdout.splitlines()))
    assert verdicts == {"tibia": (False, True), "chest": (True, True), "photo": (False, True)}
