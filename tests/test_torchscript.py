"""The torch backend's TorchScript copy (torch_backend.TorchNetwork, `script=True`, the runtime's default
on the CPU): the same embeddings as the eager model, and the eager model wherever a trace would differ."""

import logging

import numpy as np
import torch

from cxr_embed.runtime import Runtime, RuntimeSettings
from cxr_embed.torch_backend import TorchNetwork, scripted_copy

MODEL = "imagenet-effnet-lite0"


def test_scripted_runtime_embeds_as_the_eager_one(dcm_dir):
    data = [(dcm_dir / name).read_bytes() for name in ("RG1_UNCR.dcm", "RG3_UNCR.dcm", "RG1_J2KR.dcm")]
    out = {}
    for script in (True, False):
        runtime = Runtime(RuntimeSettings(model=MODEL, torchscript=script, image_check="always"))
        try:
            batch = np.stack([runtime.prepare(d).tensor for d in data])
            for size in (1, 3):  # batch sizes other than the traced one
                out[script, size] = runtime.forward(batch[:size], [True] * size)
        finally:
            runtime.close()
    for size in (1, 3):
        (emb_s, check_s), (emb_e, check_e) = out[True, size], out[False, size]
        np.testing.assert_allclose(emb_s, emb_e, atol=1e-5)
        for a, b in zip(check_s, check_e):  # the chest check's network is scripted too
            np.testing.assert_allclose(a, b, atol=1e-5)


class Branchy(torch.nn.Module):
    """A forward pass whose Python branch depends on the input: a trace bakes in the branch it saw."""

    def forward(self, x):
        pooled = x.mean((2, 3))
        return pooled if float(x.abs().sum()) == 0 else -pooled


def test_a_trace_that_differs_is_not_used(caplog):
    x = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    network = TorchNetwork(Branchy(), "cpu", script=True)
    with caplog.at_level(logging.WARNING, logger="cxr_embed"):
        network.prepare((3, 8, 8))  # traced on zeros: the first branch
        got = network(x)
    np.testing.assert_allclose(got, -x.mean((2, 3)), atol=1e-6)  # the eager branch, not the traced one
    assert any("runs eagerly" in r.getMessage() and "differs" in r.getMessage() for r in caplog.records)


def test_a_faithful_trace_is_used_and_is_exact():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten()).eval()
    example = torch.zeros(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    copy = scripted_copy(model, example)
    assert isinstance(copy, torch.jit.ScriptModule)
    x = torch.randn(5, 3, 16, 16)
    with torch.inference_mode():
        assert torch.equal(copy(x), model(x))


def test_the_service_variable_switches_it_off_and_refuses_nonsense():
    import pytest

    from cxr_embed.errors import ConfigError
    from service.settings import ServiceSettings

    assert ServiceSettings.from_env({}).runtime.torchscript is True
    assert ServiceSettings.from_env({"CXR_EMBED_TORCHSCRIPT": "0"}).runtime.torchscript is False
    assert ServiceSettings.from_env({"CXR_EMBED_TORCHSCRIPT": "Off"}).runtime.torchscript is False
    with pytest.raises(ConfigError, match="CXR_EMBED_TORCHSCRIPT"):
        ServiceSettings.from_env({"CXR_EMBED_TORCHSCRIPT": "maybe"})
    with pytest.raises(ConfigError, match="torchscript"):
        RuntimeSettings(torchscript="0")
