"""The picture `cxr-embed explain` writes: the model's preview with a saliency map over it and a colour bar.

The overlay is composited pixel by pixel on the preview (`cxr_embed.preview`'s picture), then shown
at SCALE x without interpolation: a preview pixel is a SCALE x SCALE block of the PNG. Only the
positive part of the map is painted, with an opacity that grows with the value, so a pixel whose
value is 0 (the letterbox padding, regions that do not raise the score) stays the preview's grey.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cxr_embed.errors import CxrEmbedError
from cxr_embed.store import atomic_replace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SCALE = 3  # PNG pixels per preview pixel (224 px -> 672 px)
TITLE_PX = 48  # strip above the image
BAR_PANEL_PX = 250  # colour bar, its ticks and its label, right of the image
DPI = 100
CMAP = "inferno"
MAX_ALPHA = 0.6  # opacity at the map's largest value


def png_size(side: int) -> tuple[int, int]:
    """(width, height) of the PNG for a preview of side x side px."""
    return side * SCALE + BAR_PANEL_PX, side * SCALE + TITLE_PX


def composite(preview: Image.Image, saliency: np.ndarray, vmax: float) -> np.ndarray:
    """RGB float image in [0, 1]: the grey preview with the positive part of `saliency` painted over."""
    from matplotlib import colormaps

    grey = np.asarray(preview.convert("L"), dtype=np.float64) / 255.0
    level = np.clip(np.maximum(saliency, 0.0) / vmax, 0.0, 1.0)
    heat = colormaps[CMAP](level)[..., :3]
    alpha = (MAX_ALPHA * level)[..., None]
    return (1.0 - alpha) * grey[..., None] + alpha * heat


def render(preview: Image.Image, saliency: np.ndarray, label: str, title: str) -> Figure:
    """A matplotlib Figure (no pyplot, no process-wide backend) of exactly png_size pixels."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    side = preview.width
    width, height = png_size(side)
    vmax = float(max(np.max(saliency), 1e-12))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, facecolor="white")
    ax = fig.add_axes((0.0, 0.0, side * SCALE / width, side * SCALE / height))
    ax.imshow(composite(preview, saliency, vmax), interpolation="nearest", resample=False)
    ax.set_axis_off()
    cax = fig.add_axes(((side * SCALE + 24) / width, 0.1, 22 / width, 0.75 * side * SCALE / height))
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, vmax), CMAP), cax=cax)
    bar.ax.tick_params(labelsize=9)
    bar.set_label(label, fontsize=9, parse_math=False)  # names come from probe files: "$" is a dollar, not maths
    fig.text(0.01, 1.0 - 0.5 * TITLE_PX / height, title, fontsize=11, va="center", ha="left", parse_math=False)
    return fig


def check_outputs(out: str | os.PathLike, raw: str | os.PathLike | None = None, inputs=()) -> None:
    """Refuse, before any work, a picture not named *.png, a raw map not named *.npy, a missing folder,
    or an output that is one of the `inputs` (the image, the probe file)."""
    kept = {Path(p).resolve() for p in inputs if isinstance(p, (str, os.PathLike))}
    for path, suffix, what in ((out, ".png", "the picture is a PNG"), (raw, ".npy", "the raw map is a NumPy file")):
        if path is None:
            continue
        if Path(path).resolve() in kept:
            raise CxrEmbedError(f"{path} is an input of this command; writing there would overwrite it: name another file")
        if Path(path).suffix.lower() != suffix:
            raise CxrEmbedError(f"{path}: {what}; name it *{suffix}")
        if not Path(path).resolve().parent.is_dir():
            raise CxrEmbedError(f"{path}: folder {Path(path).resolve().parent} does not exist")


def save_png(fig: Figure, out: str | os.PathLike) -> Path:
    """Write the figure as PNG at exactly its pixel size, whole or not at all; a bad path is a CxrEmbedError."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    out = Path(out)
    check_outputs(out)
    with atomic_replace(out, "picture") as tmp:  # whole or not at all; a failure is a StoreWriteFailed
        FigureCanvasAgg(fig).print_png(str(tmp))
    return out
