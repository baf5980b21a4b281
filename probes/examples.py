"""What the package ships for a first try: an example probe and a real radiograph to score with it.

Both are made by `scripts/make_artifacts.py` from public NIH ChestX-ray14 images (no use
restriction; acknowledge the NIH Clinical Center). The probe sits on the shipped default model,
whose weights carry research-only terms (MODEL_CARD.md): it is an example, not a diagnostic tool.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")
EXAMPLE_PROBE = DATA_DIR / "nih-pneumonia-linear.json"
EXAMPLE_IMAGE = DATA_DIR / "example-nih-00000061_015.jpg"
EXAMPLE_IMAGE_NOTE = "NIH ChestX-ray14 00000061_015.jpg, a test-split image whose report lists Pneumonia"


def example_probe_path() -> Path:
    """The shipped example probe (NIH pneumonia vs no finding, linear, on cxr-supcon-effnet-lite0)."""
    return EXAMPLE_PROBE


def example_image_path() -> Path:
    """The shipped example radiograph (a frontal NIH CXR, JPEG)."""
    return EXAMPLE_IMAGE


def is_example_probe(path: str | os.PathLike | None) -> bool:
    """Whether `path` is the shipped example probe file."""
    return path is not None and Path(path).resolve() == EXAMPLE_PROBE.resolve()
