"""Every shipped artefact records the identity of the shipped model it was made with
(scripts/make_artifacts.py regenerates them); the service serves the example probe by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cxr_embed import create_model, load_image
from cxr_embed.chest import CHECK_MODEL, ReferenceSet
from cxr_embed.export_onnx import check_onnx
from cxr_embed.models import default_model_name
from probes import load_probe
from probes.examples import example_image_path, example_probe_path, is_example_probe
from service.cli import default_probes
from service.routes import probes_source
from service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]


def test_example_probe_sits_on_the_shipped_default_model():
    model = create_model()
    assert model.name == default_model_name() == "cxr-supcon-effnet-lite0"
    probe = load_probe(example_probe_path(), expected_identity=model.identity)  # raises ModelMismatch otherwise
    assert probe.identity == model.identity.to_dict()
    assert probe.name == "nih-pneumonia-linear" and list(probe.classes_) == [0, 1] and 0 < probe.threshold_ < 1
    assert "P(pneumonia)" in probe.description


def test_reference_set_matches_the_check_model():
    model = create_model(CHECK_MODEL)
    with np.load(ReferenceSet.path_for(CHECK_MODEL), allow_pickle=False) as z:
        assert str(z["weights_hash"]) == model.weights_hash
        assert z["embeddings"].shape == (500, model.dim)
    assert ReferenceSet.for_model(model) is not None


def test_shipped_onnx_exports_record_the_identity_of_their_torch_models():
    """What a slim install runs (no torch to check it there) is checked here: each registered
    model's shipped export holds its torch model's identity and preprocessing, in the current format."""
    from cxr_embed.export_onnx import ONNX_FORMAT, check_metadata
    from cxr_embed.registry import WEIGHTS_DIR, get_spec, list_models, shipped_onnx

    for name in list_models():
        path = shipped_onnx(name)
        assert path == WEIGHTS_DIR / get_spec(name).onnx_file, f"{name}: run scripts/make_artifacts.py --only onnx"
        model = create_model(name)
        meta = check_onnx(path, model.identity)  # ModelMismatch if the weights changed since the export
        assert meta["format"] == ONNX_FORMAT and meta["arch"] == model.arch
        assert check_metadata(meta, path, name).preprocess == model.preprocess


def test_example_image_is_a_real_radiograph_shipped_as_package_data():
    img = load_image(example_image_path())
    assert img.pixels.shape == (256, 256) and img.pixels.std() > 0.1
    assert example_image_path().parent == example_probe_path().parent
    assert 'probes = ["data/*"]' in (ROOT / "pyproject.toml").read_text()
    assert "../shared" not in (ROOT / "README.md").read_text().split("## Set up and run")[1].split("\n## ")[0]


def test_serve_defaults_to_the_example_probe_on_the_shipped_model_only():
    assert is_example_probe(default_probes(ServiceSettings.from_env({})))
    assert default_probes(ServiceSettings.from_env({}, model="imagenet-effnet-lite0")) is None
    none = ServiceSettings.from_env({"CXR_EMBED_PROBES": "none"})
    assert none.probes is None and none.no_probes
    assert ServiceSettings.from_env({}).no_probes is False
    assert probes_source(str(example_probe_path())).startswith("the shipped example probe")
    assert probes_source(None) == "none"
