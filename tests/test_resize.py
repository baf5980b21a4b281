"""The numpy resize (cxr_embed/resize.py) computes torch's antialiased bilinear interpolation, so the
letterbox, and with it every embedding, is the same with or without PyTorch installed.

Tolerance: 1e-6 absolute on grey levels in [0, 1] (2e-6 on the normalised [-1, 1] check input). Both
sum the same float32 weights in float32, in another order; the largest difference measured on these
images was 7.7e-7 (shrinking RG1's 1955 rows to 16), 5.4e-7 at the letterbox's 224 px. Rounding grows
with the window: shrinking to 4 px (500-term sums) differs by up to 1.2e-6 and to one pixel by 2.8e-6,
so those are not tested. A wrong weight, support or bound is off by 1e-3 or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cxr_embed import load_image
from cxr_embed.chest import CHECK_SIZE, check_input
from cxr_embed.preprocess import PreprocessConfig, preprocess
from cxr_embed.resize import resize, resize_weights

TOL = 1e-6


def torch_resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(height, width), mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def torch_preprocess(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """The letterbox as it was written in torch before it moved to numpy (cxr-pre-v1)."""
    h, w = pixels.shape
    scale = config.size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    t = torch.from_numpy(torch_resize(pixels, nh, nw) if (nh, nw) != (h, w) else pixels.astype(np.float32))
    out = torch.zeros((config.size, config.size))
    top, left = (config.size - nh) // 2, (config.size - nw) // 2
    out[top : top + nh, left : left + nw] = t.clamp(0.0, 1.0)
    return ((out - config.mean) / config.std).expand(3, -1, -1).numpy()


@pytest.fixture(scope="module")
def real_images(dcm_dir, samples) -> dict[str, np.ndarray]:
    images = {p.name: load_image(p).pixels for p in [dcm_dir / "RG1_UNCR.dcm", dcm_dir / "RG3_UNCR.dcm",
                                                     *sorted(samples.glob("*.jpg"))[:2]]}
    nih = images[sorted(samples.glob("*.jpg"))[0].name]  # 256 x 256
    images["nih crop 150x200 (upscaled)"] = nih[50:200, 30:230]
    images["nih crop 131x256"] = nih[100:231]
    return images


@pytest.mark.parametrize("shape", [(224, 211), (128, 128), (224, 224), (300, 97), (16, 12)])
def test_resize_is_torch_antialiased_bilinear(real_images, shape):
    for name, pixels in real_images.items():
        got, want = resize(pixels, *shape), torch_resize(pixels, *shape)
        assert got.dtype == np.float32 and got.shape == want.shape == shape
        assert float(np.abs(got - want).max()) <= TOL, name


def test_each_output_pixel_weights_sum_to_one_over_its_window():
    for n_in, n_out in [(1955, 211), (224, 128), (150, 224), (7, 7)]:
        m = resize_weights(n_in, n_out)
        np.testing.assert_allclose(np.asarray(m.sum(axis=1)).ravel(), 1.0, atol=1e-6)
        assert m.shape == (n_out, n_in) and (m.data > 0).all()
    with pytest.raises(ValueError, match="2-D"):
        resize(np.zeros((3, 4, 5), np.float32), 2, 2)


def test_preprocess_is_the_torch_letterbox(real_images):
    for config in (PreprocessConfig(), PreprocessConfig(size=160, mean=0.45, std=0.25)):
        for name, pixels in real_images.items():
            got = preprocess(pixels, config)
            assert got.shape == (3, config.size, config.size) and got.dtype == np.float32
            assert float(np.abs(got - torch_preprocess(pixels, config)).max()) <= TOL / config.std, name


def test_check_input_is_torch_resize_of_the_batch(real_images):
    batch = np.stack([preprocess(p) for p in real_images.values()])
    batch[0, 2] *= 0.5  # a channel unlike the first is resized on its own
    want = F.interpolate(torch.from_numpy(batch), size=(CHECK_SIZE, CHECK_SIZE), mode="bilinear", antialias=True,
                         align_corners=False).numpy()
    got = check_input(batch, CHECK_SIZE)
    assert got.shape == want.shape == (len(batch), 3, CHECK_SIZE, CHECK_SIZE)
    assert float(np.abs(got - want).max()) <= 2 * TOL  # [-1, 1]: twice the range
    assert check_input(got, CHECK_SIZE) is got  # already at the size: no copy
