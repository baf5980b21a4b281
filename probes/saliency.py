"""Saliency of a probe's score over the model's input: Grad-CAM (linear probes) and occlusion (any probe).

What is explained: the probe's decision function for one class (`Probe.decision_function`: the raw
score, log-odds for a binary probe, before Platt calibration). The standardisation of a linear probe
is folded into its weights, so that score is `embedding @ w + b`; calibration is an increasing
function of it (its slope is kept positive), so a region that raises the score raises the
probability too. For a binary probe the score of the negative class is minus that of the positive.

Grad-CAM layer: the backbone's last feature map, the output of `conv_head` + `bn2` (a 1x1
convolution 320 -> 1280 with its BatchNorm and ReLU6; timm's `forward_features`), at 1/32 of the
input (7 x 7 cells for 224 px). Global average pooling of this map *is* the embedding, so for a
linear probe every gradient is w / 49 and Grad-CAM is exact (Zhou et al.'s CAM): the cells' signed
values add up to the score minus the intercept. `blocks[-1]` (320 channels, same 7 x 7) would pass
through the nonlinear head and lose that.

Occlusion: a patch of the letterboxed input is set to the mean grey of the image (the letterbox
padding is left as the model saw it, and patches over padding only are skipped); a pixel's value is
the mean score drop of the patches that cover it. Cost: one forward pass per patch position (plus
one for the whole image), batched; `occlusion_positions` says how many before any runs.
"""

from __future__ import annotations

import sys
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cxr_embed.models import EmbeddingModel

from .probe import Probe

Box = tuple[int, int, int, int]  # top, left, rows, columns of the image inside the letterbox


def linear_direction(probe: Probe, target: int) -> tuple[np.ndarray, float]:
    """(w, b) with score = embedding @ w + b: a linear probe's decision function for class `target`."""
    coef, intercept = probe.linear_["coef"], probe.linear_["intercept"]
    if len(probe.classes_) == 2:
        sign = 1.0 if target == 1 else -1.0
        return sign * coef[0], sign * float(intercept[0])
    return coef[target], float(intercept[target])


def class_scores(probe: Probe, embeddings: np.ndarray, target: int) -> np.ndarray:
    """The probe's decision function for class `target`, one value per embedding."""
    z = probe.decision_function(embeddings)
    if z.ndim == 1:
        return z if target == 1 else -z
    return z[:, target]


def content_mask(box: Box, size: int) -> np.ndarray:
    """True over the image, False over the letterbox padding."""
    top, left, rows, cols = box
    mask = np.zeros((size, size), dtype=bool)
    mask[top : top + rows, left : left + cols] = True
    return mask


def grad_cam(model: EmbeddingModel, x: torch.Tensor, weight: np.ndarray, bias: float) -> tuple[np.ndarray, float]:
    """Grad-CAM of score = embedding @ weight + bias on the last feature map (module docstring) for one
    input (3, S, S): the signed map of cells (S/32 x S/32, float64) and the score."""
    backbone = model.backbone
    device = next(backbone.parameters()).device
    x = torch.as_tensor(x)[None].to(device)  # numpy (what the runtime prepares) or a tensor
    if device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)  # as the runtime runs it
    with torch.no_grad():
        feats = backbone.forward_features(x).float()
    feats.requires_grad_(True)
    with torch.enable_grad():
        embedding = backbone.forward_head(feats).double()
        score = embedding[0] @ torch.as_tensor(weight, dtype=torch.float64, device=device) + bias
        (grad,) = torch.autograd.grad(score, feats)
    alpha = grad.mean(dim=(2, 3), keepdim=True)  # one weight per channel: the spatially averaged gradient
    cam = (alpha.double() * feats.detach().double()).sum(dim=1)[0]
    return cam.cpu().numpy(), float(score.detach())


def upsample(cells: np.ndarray, size: int) -> np.ndarray:
    """A map of cells to size x size pixels (bilinear, cell centres at pixel centres), same units."""
    t = torch.as_tensor(cells, dtype=torch.float64)[None, None]
    return F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def occlusion_positions(box: Box, size: int, patch: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of the patches (every `stride` px, the last flush with the edge) that
    overlap the image; patches over padding only are left out."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] != size - patch:
        starts.append(size - patch)
    top, left, rows, cols = box
    ys = [y for y in starts if y < top + rows and y + patch > top]
    xs = [x for x in starts if x < left + cols and x + patch > left]
    return [(y, x) for y in ys for x in xs]


def _occluded(x: torch.Tensor, corners: list[tuple[int, int]], patch: int, mask: torch.Tensor,
              fill: float) -> torch.Tensor:
    batch = x.repeat(len(corners), 1, 1, 1)
    for i, (y, x0) in enumerate(corners):
        region = batch[i, :, y : y + patch, x0 : x0 + patch]
        region[:, mask[y : y + patch, x0 : x0 + patch]] = fill  # padding stays as the model saw it
    return batch


def occlusion(forward: Callable[[torch.Tensor], np.ndarray], score: Callable[[np.ndarray], np.ndarray],
              x: torch.Tensor, box: Box, patch: int = 32, stride: int = 16, batch_size: int = 16,
              progress: bool = True, base: float | None = None) -> tuple[np.ndarray, float, int]:
    """Occlusion map of `score(forward(inputs))` for one input (3, S, S): (map S x S of mean score
    drops, float64, 0 over the padding; the unoccluded score (`base` when given); forward passes run)."""
    x = torch.as_tensor(x)  # numpy (what the runtime prepares) or a tensor
    size = x.shape[-1]
    mask_np = content_mask(box, size)
    mask = torch.from_numpy(mask_np)
    fill = float(x[0][mask].mean())  # the image's mean grey (channels are copies of one)
    corners = occlusion_positions(box, size, patch, stride)
    passes = len(corners) + (base is None)
    base = float(score(forward(x[None]))[0]) if base is None else float(base)
    total, count = np.zeros((size, size)), np.zeros((size, size))
    with tqdm(total=passes, initial=passes - len(corners), unit="pass", desc="occlusion", file=sys.stderr,
              disable=not progress, dynamic_ncols=True, mininterval=1.0) as bar:
        for i in range(0, len(corners), max(1, batch_size)):
            chunk = corners[i : i + max(1, batch_size)]
            drops = base - score(forward(_occluded(x, chunk, patch, mask, fill)))
            for (y, x0), drop in zip(chunk, drops):
                total[y : y + patch, x0 : x0 + patch] += drop
                count[y : y + patch, x0 : x0 + patch] += 1
            bar.update(len(chunk))
    saliency = np.where(count > 0, total / np.maximum(count, 1), 0.0)
    saliency[~mask_np] = 0.0
    return saliency, base, passes
