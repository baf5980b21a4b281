"""The one canonical preprocessing: decoded grey image -> model input array. Versioned. Numpy only
(no torch), so a slim install runs exactly this too."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

from .image import DecodedImage
from .resize import resize

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


def letterbox(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize so the long side is `size` (antialiased bilinear, `resize.py`), pad to size x size,
    centred; float32 in [0, 1]."""
    a = np.asarray(pixels, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"letterbox expects a 2-D grey image, got shape {tuple(a.shape)}")
    top, left, nh, nw = letterbox_box(*a.shape, size)
    a = np.clip(resize(a, nh, nw), 0.0, 1.0)
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + nh, left : left + nw] = a
    return out


def preprocess(image: DecodedImage | np.ndarray, config: PreprocessConfig = PreprocessConfig()) -> np.ndarray:
    """Canonical model input (3, size, size) float32 from a decoded image or a grey [0,1] array."""
    pixels = image.pixels if isinstance(image, DecodedImage) else image
    square = (letterbox(pixels, config.size) - np.float32(config.mean)) / np.float32(config.std)
    return np.ascontiguousarray(np.broadcast_to(square, (3, config.size, config.size)))
