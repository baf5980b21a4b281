"""What the model sees: the canonical input tensor of an image, turned back into a grey picture
(for `cxr-embed preview` and the web page's `/preview`)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .ingest import MAX_PIXELS, MIN_SIDE, ImageSource, load_image
from .preprocess import PreprocessConfig, preprocess
from .registry import default_model_name, get_spec


def tensor_image(tensor: np.ndarray, config: PreprocessConfig) -> Image.Image:
    """A preprocessed input (3, S, S) or (S, S) un-normalised to an 8-bit grey image (mode "L")."""
    grey = np.asarray(tensor, dtype=np.float32)
    grey = grey[0] if grey.ndim == 3 else grey  # the three channels are copies of one
    pixels = np.clip(grey * np.float32(config.std) + np.float32(config.mean), 0.0, 1.0)
    return Image.fromarray(np.rint(pixels * 255.0).astype(np.uint8), mode="L")


def preview_image(source: ImageSource, config: PreprocessConfig | None = None,
                  min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The exact model input of `source` (decoded, windowed, letterboxed, normalised) as a grey
    image; `config`: the preprocessing (default: the default model's). Raises the same typed errors
    as `load_image` for inputs the model would refuse."""
    config = config or get_spec(default_model_name()).preprocess
    return tensor_image(preprocess(load_image(source, min_side=min_side, max_pixels=max_pixels), config), config)


def png_bytes(image: Image.Image) -> bytes:
    """`image` encoded as PNG."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def preview_png(source: ImageSource, config: PreprocessConfig | None = None, min_side: int = MIN_SIDE,
                max_pixels: int = MAX_PIXELS) -> bytes:
    """`preview_image` as PNG bytes."""
    return png_bytes(preview_image(source, config, min_side, max_pixels))
