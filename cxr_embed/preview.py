"""What the model sees: the canonical input tensor of an image, turned back into a grey picture
(for `cxr-embed preview` and the web page's `/preview`)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from .ingest import MAX_PIXELS, MIN_SIDE, ImageSource, load_image
from .models import default_model_name, get_spec
from .preprocess import PreprocessConfig, preprocess


def tensor_image(tensor: torch.Tensor, config: PreprocessConfig) -> Image.Image:
    """A preprocessed input (3, S, S) or (S, S) un-normalised to an 8-bit grey image (mode "L")."""
    grey = tensor[0] if tensor.ndim == 3 else tensor  # the three channels are copies of one
    pixels = (grey.detach().float().cpu() * config.std + config.mean).clamp(0.0, 1.0)
    return Image.fromarray(np.rint(pixels.numpy() * 255.0).astype(np.uint8), mode="L")


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
