"""The exact image a model sees: decoded, windowed, letterboxed, as a picture (for `cxr-embed preview`
and a web page's preview)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .ingest import ImageSource, load_image
from .models import default_model_name, get_spec
from .preprocess import PreprocessConfig, preprocess


def preview_image(source: ImageSource, config: PreprocessConfig | None = None) -> Image.Image:
    """The model's input for `source` as an 8-bit grey PIL image (size x size): the canonical tensor
    of `cxr_embed.preprocess` (after the DICOM grey-level steps, windowing and letterboxing) with its
    normalisation undone. `config`: the preprocessing (default: the default model's). Raises the
    same InputError subclasses as `load_image` for inputs the model would refuse."""
    config = config or get_spec(default_model_name()).preprocess
    tensor = preprocess(load_image(source), config)  # (3, size, size): the same grey in each channel
    grey = tensor[0].numpy() * config.std + config.mean
    return Image.fromarray(np.round(np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8), mode="L")
