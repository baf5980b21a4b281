"""The torch backend: a model's inference copy (`models.inference_model`) run by PyTorch on the CPU or
a GPU, as a function of numpy arrays (N, 3, S, S) -> (N, dim) float32, the contract the runtime calls
for every backend (`openvino_backend.py` is the other). Needs PyTorch: the full package."""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .optional import require

torch = require("torch", "the torch backend (--runtime torch)")


def pick_device(device: str | None = None) -> "torch.device":
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r}: {exc}") from None


class TorchNetwork:
    """`model` on `device` as a callable numpy (N, 3, S, S) -> numpy (N, dim) float32 (channels_last
    on the CPU: the layout its inference copy's weights have)."""

    def __init__(self, model: "torch.nn.Module", device: "torch.device | str"):
        self.model = model
        self.device = torch.device(device)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return self.model(t).float().cpu().numpy()
