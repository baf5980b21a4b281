"""Which regions of an image drive a probe's score: what `cxr-embed explain` does, as a Python function.

The image is decoded and letterboxed by the one runtime (`Runtime.prepare`), the probe is read from
a validated probe file and must have been trained on the model that runs (`ModelMismatch`
otherwise). Linear probes get Grad-CAM on the backbone's last feature map, GBM probes occlusion
(saliency.py says exactly what each computes). The map explains the probe's decision function
(the raw score before calibration) for one class, lives on the model's 224 px input and is 0 over
the letterbox padding; overlay.py draws it over the preview (`cxr-embed preview`'s picture).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cxr_embed.errors import ConfigError, CxrEmbedError
from cxr_embed.image import ImageInfo
from cxr_embed.ingest import ImageSource
from cxr_embed.preprocess import letterbox_box
from cxr_embed.preview import tensor_image
from cxr_embed.runtime import Runtime, RuntimeSettings
from cxr_embed.store import atomic_replace

from .examples import example_probe_path
from .io import check_probe_model, load_probe
from .overlay import check_outputs, render, save_png
from .probe import Probe
from .saliency import Box, class_scores, content_mask, grad_cam, linear_direction, occlusion, upsample
from .scoring import plain

METHODS = ("auto", "grad-cam", "occlusion")


@dataclass
class Explanation:
    """A saliency map of one probe's score over one image, and what it was computed from."""

    saliency: np.ndarray  # (S, S) float32: signed, in units of the probe's score, 0 over the padding
    preview: Image.Image  # the model's input as a grey picture (what `cxr-embed preview` writes)
    box: Box  # top, left, rows, columns of the image inside the letterbox
    method: str  # "grad-cam" or "occlusion"
    probe_name: str
    target: str  # the class whose score is explained
    score: float  # the probe's decision function for that class on the whole image
    probability: float  # the probe's (calibrated) probability of that class
    threshold: float | None  # a binary probe's operating threshold, when the class explained is its positive one
    passes: int  # forward passes run (Grad-CAM: 2, one with a backward pass)
    model: str
    info: ImageInfo
    patch: int = 32  # occlusion: patch side in px of the model's input
    padding_share: float | None = None  # Grad-CAM: share of the positive map that fell on the padding
    notes: list[str] = field(default_factory=list)

    @property
    def unit(self) -> str:
        """What one value of the map is (the colour bar's label)."""
        if self.method == "grad-cam":
            return (f"Grad-CAM: contribution of each 32 px cell to the score of class {self.target}\n"
                    "(probe decision function, before calibration); positive part")
        return (f"occlusion: drop of the score of class {self.target} when a {self.patch} px patch\n"
                "is greyed (probe decision function, before calibration); positive part")

    def text(self) -> str:
        where = "" if self.padding_share is None else \
            f"; {100 * self.padding_share:.1f}% of the positive map fell on the letterbox padding (not shown)"
        lines = [f"{self.probe_name} ({self.model}): class {self.target}, probability {self.probability:.3f}, "
                 f"score {self.score:+.3f}; {self.method}, {self.passes} forward pass(es){where}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def choose_method(probe: Probe, method: str) -> str:
    """`auto`: Grad-CAM for a linear probe, occlusion for a GBM (its score is piecewise constant)."""
    if method not in METHODS:
        raise ConfigError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    if method == "auto":
        return "grad-cam" if probe.kind == "linear" else "occlusion"
    if method == "grad-cam" and probe.kind != "linear":
        raise ConfigError(f"Grad-CAM needs a probe whose score has a gradient; this is a {probe.kind} probe "
                          "(piecewise constant): use --method occlusion")
    return method


def target_index(probe: Probe, embedding: np.ndarray, target: str | None) -> int:
    """The class to explain: `target` by name, else a binary probe's positive class, else the most probable."""
    names = [str(plain(c)) for c in probe.classes_]
    if target is None:
        return 1 if len(names) == 2 else int(np.argmax(probe.predict_proba(embedding[None])[0]))
    labels = getattr(probe, "class_names_", None) or names  # a binary probe's label names, where recorded
    if str(target) in names:
        return names.index(str(target))
    if str(target) in labels:
        return labels.index(str(target))
    raise ConfigError(f"--target {target!r}: the probe's classes are {', '.join(names)}"
                      + (f" ({', '.join(labels)})" if labels != names else ""))


def class_label(probe: Probe, i: int) -> str:
    """Class i of a probe as its training labels named it (a binary probe's 0/1 by its recorded names)."""
    names = getattr(probe, "class_names_", None)
    return names[i] if names else str(plain(probe.classes_[i]))


MAX_BATCH = 256  # occlusion: images per forward pass (each about 600 KB)


def _prepare(runtime: Runtime, image: ImageSource) -> tuple[torch.Tensor, ImageInfo, Box, bool]:
    """The model's input for `image` through the runtime, where the image lies in its letterbox, and
    whether the runtime's chest check wants to see it."""
    prepared = runtime.prepare(image)
    if prepared.error is not None:
        name = image if isinstance(image, (str, os.PathLike)) else "the image"
        raise type(prepared.error)(f"{name}: {prepared.error}") from None
    x = torch.as_tensor(prepared.tensor)  # the runtime prepares numpy arrays (one path for every backend)
    size = x.shape[-1]
    box = letterbox_box(*prepared.info.original_size, size)
    config = runtime.model.preprocess
    padding = x[0][torch.from_numpy(~content_mask(box, size))]
    fill = torch.tensor(-config.mean / config.std, dtype=padding.dtype)  # float32 rounding may differ by an ulp
    if len(padding) and not bool(torch.isclose(padding, fill, rtol=0, atol=1e-5).all()):  # the runtime's geometry
        raise CxrEmbedError(f"letterbox of {image} is not where {config.identity} puts it; please report this")
    return x, prepared.info, box, prepared.wants_check


def _check_direction(probe: Probe, path: Path) -> None:
    """A binary probe whose calibrated probability does not rise with its score would have its map
    read the wrong way round (regions that raise the score lower the probability shown): refused."""
    a = (probe.calibration_ or {}).get("a")
    if len(probe.classes_) == 2 and a is not None and not a > 0:
        raise ConfigError(f"{path}: its calibration slope is {a:g}, so its probability does not rise with its score "
                          "and a map of the score would mislead; train the probe again (`cxr-embed probe`), which "
                          "never fits such a slope")


def explain_image(image: ImageSource, probe: str | os.PathLike | None = None, method: str = "auto",
                  model: str | None = None, device: str = "auto", target: str | None = None, patch: int = 32,
                  stride: int = 16, batch_size: int = 16, progress: bool = True,
                  runtime: Runtime | None = None) -> Explanation:
    """Saliency of `probe`'s score (a probe file; default: the shipped example probe) over `image`.
    `model`: default the probe's; any other raises ModelMismatch. `patch`, `stride` (px of the
    224 px input) and `batch_size`: occlusion only. `runtime`: one to reuse (for many images; it
    must run the probe's model, and is left open), instead of `model` and `device`."""
    path = Path(probe) if probe is not None else example_probe_path()
    loaded = load_probe(path)
    _check_direction(loaded, path)
    method = choose_method(loaded, method)
    if not 1 <= stride <= patch:
        raise ConfigError(f"occlusion needs 1 <= stride <= patch, got patch {patch}, stride {stride}")
    if not 1 <= batch_size <= MAX_BATCH:
        raise ConfigError(f"occlusion batch size {batch_size}: must be 1 to {MAX_BATCH} images per forward pass")
    if loaded.identity is None:
        check_probe_model(loaded, None, path)  # raises ModelMismatch: the probe does not name its model
    own = runtime is None
    if own:
        runtime = Runtime(RuntimeSettings(model=model or loaded.identity["model_name"], device=device))
    try:
        check_probe_model(loaded, runtime.identity, path)
        x, info, box, wants_check = _prepare(runtime, image)
        if not 1 <= patch <= x.shape[-1]:
            raise ConfigError(f"occlusion patch {patch} px: must be 1 to {x.shape[-1]} (the model's input)")
        base, check = runtime.forward(x[None], [wants_check])
        chest = runtime.chest_check(info, check[0])  # as `predict` does: a map of a knee is no chest finding
        cls = target_index(loaded, base[0], target)
        result = _run(method, runtime, loaded, x, box, cls, (patch, stride, batch_size), progress,
                      float(class_scores(loaded, base, cls)[0]))
    finally:
        if own:
            runtime.close()
    proba = loaded.predict_proba(base)[0]
    if not np.isfinite(result[0]).all():
        raise CxrEmbedError(f"the saliency map of {image} has non-finite values; nothing was written")
    notes = [f"not a frontal chest X-ray ({'; '.join(chest.reasons) or 'chest check'}): the probe's score is "
             "unreliable here"] if not chest.is_frontal_cxr else []
    return Explanation(result[0], tensor_image(x, runtime.model.preprocess), box, method, loaded.name,
                       class_label(loaded, cls), result[1], float(proba[cls]),
                       loaded.threshold_ if len(loaded.classes_) == 2 and cls == 1 else None, result[2] + 1,
                       runtime.identity.model_name, info, patch, result[3], notes + list(info.unreliable_reasons))


def _run(method: str, runtime: Runtime, probe: Probe, x: torch.Tensor, box: Box, cls: int,
         grid: tuple[int, int, int], progress: bool, base: float) -> tuple[np.ndarray, float, int, float | None]:
    """(map, score, forward passes besides the one giving `base`, share of the positive map on the
    padding) by `method`; `grid`: occlusion's patch, stride and batch size; `base`: the score."""
    size = x.shape[-1]
    mask = content_mask(box, size)
    if method == "grad-cam":
        cells, score = grad_cam(runtime.model, x, *linear_direction(probe, cls))
        full = upsample(cells, size)
        positive = np.maximum(full, 0.0)
        share = float(positive[~mask].sum() / positive.sum()) if positive.sum() > 0 else 0.0
        return np.where(mask, full, 0.0).astype(np.float32), score, 1, share  # 1: forward and backward
    saliency, score, passes = occlusion(lambda b: runtime.forward(b)[0], lambda e: class_scores(probe, e, cls), x,
                                        box, *grid, progress=progress, base=base)
    return saliency.astype(np.float32), score, passes, None


def write_explanation(explanation: Explanation, out: str | os.PathLike, raw: str | os.PathLike | None = None) -> Path:
    """The PNG (preview, map, colour bar; overlay.py) and, with `raw`, the signed map as .npy (exactly
    that name), each written whole or not at all."""
    check_outputs(out, raw)
    e = explanation
    if not np.isfinite(e.saliency).all():
        raise CxrEmbedError("the saliency map has non-finite values; nothing was written")
    threshold = "" if e.threshold is None else f" (threshold {e.threshold:.2f})"
    title = f"{e.probe_name}: P({e.target}) = {e.probability:.2f}{threshold}, score {e.score:+.2f}; {e.method}"
    save_png(render(e.preview, e.saliency, e.unit, title), out)
    if raw is not None:
        with atomic_replace(Path(raw), "raw map") as tmp, open(tmp, "wb") as fh:
            np.save(fh, e.saliency)  # a handle: np.save adds no second suffix
    return Path(out)
