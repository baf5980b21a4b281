"""The OpenVINO backend: same contract and (at f32) the same embeddings as torch, a checked ONNX export."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

try:
    import openvino  # noqa: F401
except ImportError:  # CI installs the dev extra, which holds it: there a missing package fails
    if os.environ.get("CI"):
        raise
    pytest.skip("the [openvino] extra is not installed", allow_module_level=True)

from cxr_embed.errors import CheckpointError, ConfigError, ModelMismatch  # noqa: E402
from cxr_embed.export_onnx import CACHE_ENV, ONNX_FORMAT, cached_onnx, check_onnx, export_onnx, onnx_metadata  # noqa: E402
from cxr_embed.models import create_model  # noqa: E402
from cxr_embed.runtime import Runtime, RuntimeSettings  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private export cache for this module (CXR_EMBED_CACHE), so the first use really exports."""
    folder, before = tmp_path_factory.mktemp("cxr-cache"), os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(folder)
    yield folder
    if before is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = before


@pytest.fixture(scope="module")
def real_inputs(samples, dcm_dir):
    """The NIH JPEGs and a real chest DICOM, preprocessed by the torch runtime, and its embeddings."""
    rt = Runtime(RuntimeSettings())
    files = sorted(samples.glob("*.jpg")) + [dcm_dir / "RG1_UNCR.dcm"]
    x = np.stack([rt.prepare(p.read_bytes()).tensor for p in files])
    embs = rt.forward(x)[0]
    rt.close()
    return files, x, embs, rt.identity


def _cosines(a, b):
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_f32_runs_the_shipped_export_and_gives_the_torch_embeddings(cache, real_inputs):
    """The shipped model runs the ONNX export in the package (nothing exported, no torch model
    built); odd chunks (dynamic batch, a short last call) included."""
    from cxr_embed.registry import shipped_onnx

    files, x, ref, identity = real_inputs
    rt = Runtime(RuntimeSettings(backend="openvino", precision="f32", cpu_chunk=3))
    try:
        assert rt.network.path == shipped_onnx("cxr-supcon-effnet-lite0") and not (cache / "onnx").exists()
        embs, checks = rt.forward(x)
        assert embs.shape == ref.shape and embs.dtype == np.float32 and checks == [None] * len(files)
        np.testing.assert_allclose(embs, ref, atol=1e-4)
        assert rt.identity == identity and rt.model.identity == identity
        info = rt.describe()
        assert (info["backend"], info["precision"], info["device"], info["cpu_chunk"]) == ("openvino", "f32", "cpu", 3)
        assert rt.label == "openvino/f32" and info["onnx"] == rt.network.path.name and "torch" not in info
    finally:
        rt.close()


def test_a_model_without_a_shipped_export_is_exported_once_into_the_cache(cache, real_inputs):
    """A model object (as a checkpoint would be) has no export in the package: exported on first use."""
    _, x, ref, identity = real_inputs
    rt = Runtime(RuntimeSettings(backend="openvino"), model=create_model())
    try:
        assert list((cache / "onnx").glob("*.onnx")) == [rt.network.path]
        assert rt.identity == identity
        np.testing.assert_allclose(rt.forward(x)[0], ref, atol=1e-4)
    finally:
        rt.close()


def test_the_chest_check_on_openvino_makes_torch_decisions(dcm_dir, samples):
    """The check network runs on OpenVINO too (the shipped export, at 128 px, f32): the same
    similarities within 1e-4 and the same verdicts as torch on CXRs, a tibia and a photograph."""
    import io

    from PIL import Image
    from skimage import data

    photo = io.BytesIO()
    Image.fromarray(data.chelsea()).resize((512, 384)).save(photo, format="JPEG")
    items = [(p.name, p) for p in sorted(samples.glob("*.jpg"))] + [
        ("tibia", dcm_dir / "RG3_UNCR.dcm"), ("chest", dcm_dir / "RG1_UNCR.dcm"), ("photo", photo.getvalue())]
    checks = {}
    for backend in ("torch", "openvino"):
        rt = Runtime(RuntimeSettings(backend=backend, image_check="always"))
        try:
            checks[backend] = [r.chest for r in rt.iter_embed(items)]
        finally:
            rt.close()
    assert [c.is_frontal_cxr for c in checks["openvino"]] == [c.is_frontal_cxr for c in checks["torch"]]
    assert [c.is_frontal_cxr for c in checks["torch"]][-3:] == [False, True, False]  # the test has teeth
    sims = [(a.nearest_reference_similarity, b.nearest_reference_similarity) for a, b in zip(*checks.values())]
    np.testing.assert_allclose([a for a, _ in sims], [b for _, b in sims], atol=1e-4)


def test_bf16_is_opt_in_recorded_and_close(cache, real_inputs):
    import openvino

    if "BF16" not in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(ConfigError, match="no bfloat16"):
            Runtime(RuntimeSettings(backend="openvino", precision="bf16"))
        return
    _, x, ref, identity = real_inputs
    rt = Runtime(RuntimeSettings(backend="openvino", precision="bf16", image_check="always"))
    try:
        embs = rt.forward(x)[0]
        assert rt.describe()["precision"] == "bf16" and rt.identity == identity
        assert "16" in str(rt.network.compiled.get_property("INFERENCE_PRECISION_HINT"))
        assert "32" in str(rt.check_network.compiled.get_property("INFERENCE_PRECISION_HINT"))  # the check stays f32
        diff = float(np.abs(embs - ref).max())
        assert 1e-3 < diff < 1.0  # really bf16 (f32 is within 1e-6), and still the same embedding
        assert _cosines(embs, ref).min() > 0.99
    finally:
        rt.close()


def test_export_records_identity_and_the_loader_refuses_others(cache, tmp_path):
    import onnx

    from cxr_embed.openvino_backend import OpenVINONetwork

    model = create_model()
    path = cached_onnx(model)
    meta = onnx_metadata(path)
    assert meta["format"] == ONNX_FORMAT and meta["weights_hash"] == model.weights_hash
    assert meta["model_name"] == model.name and meta["dim"] == "1280" and meta["preprocess_version"] == model.preprocess.identity
    other = create_model("imagenet-effnet-lite0")
    with pytest.raises(ModelMismatch, match="weights_hash"):
        OpenVINONetwork(path, expected=other.identity)
    with pytest.raises(ModelMismatch, match="not 'imagenet-effnet-lite0'"):
        OpenVINONetwork(path, expected="imagenet-effnet-lite0")
    proto = onnx.load(str(path))
    next(p for p in proto.metadata_props if p.key == "format").value = "cxr-embed-onnx/99"
    future = tmp_path / "future.onnx"
    onnx.save(proto, str(future))
    with pytest.raises(CheckpointError, match="cxr-embed-onnx/99"):
        check_onnx(future, model.identity)
    with pytest.raises(CheckpointError, match="cxr-embed-onnx/99"):  # OpenVINO's reader checks the same
        OpenVINONetwork(future)
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(b"not an onnx file" * 64)
    with pytest.raises(CheckpointError, match="cannot read ONNX file"):
        OpenVINONetwork(damaged)


def test_the_cache_is_reused_and_a_damaged_file_rebuilt(cache, monkeypatch):
    import cxr_embed.export_onnx as ex

    model = create_model()
    path = cached_onnx(model)  # present since an earlier test (or exported now)
    calls = []
    monkeypatch.setattr(ex, "export_onnx", lambda m, p: calls.append(p) or export_onnx(m, p))
    assert cached_onnx(model) == path and calls == []
    saved = path.with_suffix(".good")
    shutil.copyfile(path, saved)
    path.write_bytes(b"not an onnx file")
    try:
        assert cached_onnx(model) == path and calls == [path]
        check_onnx(path, model.identity)
    finally:
        shutil.copyfile(saved, path)


def test_an_onnx_file_is_a_model_for_openvino_and_refused_by_torch(cache, tmp_path, real_inputs):
    """`cxr-embed export-onnx` writes what a slim install serves with --model FILE.onnx."""
    from cxr_embed.cli import main

    out = tmp_path / "mine.onnx"
    assert main(["export-onnx", "--model", "cxr-supcon-effnet-lite0", "--out", str(out)]) == 0
    _, x, ref, identity = real_inputs
    rt = Runtime(RuntimeSettings(backend="openvino", model=str(out)))
    try:
        assert rt.identity == identity and rt.network.path == out
        np.testing.assert_allclose(rt.forward(x[:2])[0], ref[:2], atol=1e-4)
    finally:
        rt.close()
    with pytest.raises(ConfigError, match="runs on backend 'openvino'"):
        RuntimeSettings(model=str(out), backend="torch")
    assert RuntimeSettings(model=str(out)).backend == "openvino"  # the default (auto) picks it for an export


@pytest.mark.parametrize("values, message", [
    ({"backend": "tensorrt"}, "backend 'tensorrt'"),
    ({"precision": "bf16"}, "needs backend 'openvino'"),
    ({"backend": "openvino", "precision": "fp8"}, "precision 'fp8'"),
    ({"backend": "openvino", "device": "cuda"}, "runs on the CPU"),
    ({"backend": "openvino", "cpu_workers": 2}, "cpu_workers"),
])
def test_bad_backend_settings_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        RuntimeSettings(**values)


def test_embed_command_with_openvino_records_the_runtime(cache, samples, tmp_path):
    from cxr_embed.cli import main
    from cxr_embed.store import Store

    stores = {}
    for backend in ("torch", "openvino"):
        stores[backend] = tmp_path / f"{backend}.h5"
        assert main(["embed", "--images", str(samples), "--out", str(stores[backend]), "--runtime", backend,
                     "--precision", "f32", "--no-progress"]) == 0
    torch_store, ov_store = Store(stores["torch"]), Store(stores["openvino"])
    assert ov_store.identity == torch_store.identity and ov_store.ids == torch_store.ids and len(ov_store) == 6
    np.testing.assert_allclose(ov_store.embeddings(), torch_store.embeddings(), atol=1e-4)
    assert ov_store.metadata(ov_store.ids[0])["runtime"] == "openvino/f32"
    assert torch_store.metadata(torch_store.ids[0])["runtime"] == "torch/f32"


def test_service_from_environment_runs_openvino(cache, dcm_dir, real_inputs):
    """CXR_EMBED_BACKEND / CXR_EMBED_PRECISION reach the service's runtime; /info says what runs."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.engine import Engine
    from service.settings import ServiceSettings

    settings = ServiceSettings.from_env({"CXR_EMBED_BACKEND": "openvino", "CXR_EMBED_PRECISION": "f32"})
    assert (settings.runtime.backend, settings.runtime.precision, settings.runtime.cpu_workers) == ("openvino", "f32", 0)
    engine = Engine(settings)
    engine.load()
    with TestClient(create_app(settings, engine)) as client:
        info = client.get("/info").json()
        assert info["runtime"]["backend"] == "openvino" and info["runtime"]["precision"] == "f32"
        r = client.post("/embed", content=(dcm_dir / "RG1_UNCR.dcm").read_bytes(),
                        headers={"content-type": "application/dicom"})
        assert r.status_code == 200, r.text
        emb = np.asarray(r.json()["results"][0]["embedding"], dtype=np.float32)
    np.testing.assert_allclose(emb, real_inputs[2][-1], atol=1e-4)
