"""The one canonical preprocessing: decoded grey image -> model input tensor. Versioned."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .image import DecodedImage

# Bump when any step below changes what reaches the model: stores and probes record it.
PREPROCESS_VERSION = "cxr-pre-v1"


@dataclass(frozen=True)
class PreprocessConfig:
    """Letterbox to a square of `size` (aspect kept, black padding), grey to 3 channels, (x-mean)/std."""

    size: int = 224
    mean: float = 0.5
    std: float = 0.5
    version: str = PREPROCESS_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessConfig":
        return cls(**json.loads(text))

    @property
    def identity(self) -> str:
        """What must match for two embeddings to be comparable."""
        return f"{self.version}/size={self.size}/mean={self.mean:g}/std={self.std:g}"


def letterbox_box(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """Where an image of height x width lands in its letterbox: (top, left, rows, columns); the
    rest of the size x size square is padding."""
    scale = size / max(height, width)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    return (size - nh) // 2, (size - nw) // 2, nh, nw


def letterbox(pixels: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """Resize so the long side is `size` (antialiased bilinear), pad to size x size, centred."""
    t = torch.as_tensor(pixels, dtype=torch.float32)
    if t.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D grey image, got shape {tuple(t.shape)}")
    h, w = t.shape
    top, left, nh, nw = letterbox_box(h, w, size)
    if (nh, nw) != (h, w):
        t = F.interpolate(t[None, None], size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    t = t.clamp_(0.0, 1.0)
    out = torch.zeros((size, size), dtype=torch.float32)
    out[top : top + nh, left : left + nw] = t
    return out


def preprocess(image: DecodedImage | np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> torch.Tensor:
    """Canonical model input (3, size, size) float32 from a decoded image or a grey [0,1] array."""
    pixels = image.pixels if isinstance(image, DecodedImage) else image
    square = letterbox(pixels, config.size)
    square = (square - config.mean) / config.std
    return square.unsqueeze(0).expand(3, -1, -1).contiguous()
