"""cxr_embed.preview: the model input of a real DICOM, back as the grey picture the model saw."""

import io

import numpy as np
import pytest
from PIL import Image

from cxr_embed.errors import InputError
from cxr_embed.ingest import load_image
from cxr_embed.preprocess import PreprocessConfig, preprocess
from cxr_embed.preview import preview_image, preview_png


@pytest.mark.parametrize("config", [PreprocessConfig(), PreprocessConfig(size=160, mean=0.45, std=0.25)])
def test_preview_is_the_model_input_unnormalised(dcm_dir, config):
    path = dcm_dir / "RG1_UNCR.dcm"  # 1841 x 1955: letterboxed with black side bands
    image = preview_image(path, config)
    assert image.mode == "L" and image.size == (config.size, config.size)
    pixels = np.asarray(image, dtype=np.float32) / 255.0
    model_input = preprocess(load_image(path), config)
    back = (pixels - config.mean) / config.std
    assert float(np.abs(back - model_input[0]).max()) <= 0.5 / 255.0 / config.std + 1e-6
    assert pixels[:, 0].max() == 0.0 and pixels[config.size // 2, config.size // 2] > 0.1  # padding is black


def test_preview_png_and_its_errors(dcm_dir):
    png = preview_png((dcm_dir / "RG1_UNCR.dcm").read_bytes())
    assert Image.open(io.BytesIO(png)).size == (224, 224)
    with pytest.raises(InputError, match="multi-frame"):
        preview_png(dcm_dir / "liver.dcm")
