"""Radiograph augmentations, batched on the training device (GPU or CPU).

Moderate crops and scales, small rotations, brightness, contrast, gamma and noise. No flips: a
mirrored chest puts the heart on the wrong side, which real radiographs (almost) never show.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    scale_min: float = 0.6  # smallest crop area, as a share of the image
    aspect: float = 1.15  # crop aspect ratio in [1/aspect, aspect]
    rotation_deg: float = 10.0
    brightness: float = 0.15
    contrast: float = 0.2
    gamma: float = 0.25  # log-uniform in [1/(1+g), 1+g]
    noise: float = 0.02  # maximum Gaussian noise sigma (image range 0..1)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    return torch.rand(n, generator=gen, device=device) * (hi - lo) + lo


def augment(images: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """Letterboxed radiographs (B, S, S), uint8 or float in [0, 1] -> normalised float (B, 3, S, S), one
    random view each."""
    b, s, _ = images.shape
    dev = images.device
    x = unit_range(images).unsqueeze(1)

    area = _uniform(b, cfg.scale_min, 1.0, gen, dev)
    log_r = _uniform(b, -math.log(cfg.aspect), math.log(cfg.aspect), gen, dev)
    zx = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    zy = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    theta_r = _uniform(b, -cfg.rotation_deg, cfg.rotation_deg, gen, dev) * (math.pi / 180.0)
    tx = _uniform(b, -1.0, 1.0, gen, dev) * (1.0 - zx)
    ty = _uniform(b, -1.0, 1.0, gen, dev) * (1.0 - zy)
    cos, sin = torch.cos(theta_r), torch.sin(theta_r)
    theta = torch.stack(
        [torch.stack([zx * cos, -zy * sin, tx], 1), torch.stack([zx * sin, zy * cos, ty], 1)], 1
    )
    grid = F.affine_grid(theta, (b, 1, s, s), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    gamma = torch.exp(_uniform(b, -math.log1p(cfg.gamma), math.log1p(cfg.gamma), gen, dev)).view(b, 1, 1, 1)
    x = x.clamp_(1e-6, 1.0).pow_(gamma)
    contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, gen, dev).view(b, 1, 1, 1)
    brightness = _uniform(b, -cfg.brightness, cfg.brightness, gen, dev).view(b, 1, 1, 1)
    mu = x.mean(dim=(2, 3), keepdim=True)
    x = (x - mu) * contrast + mu + brightness
    sigma = _uniform(b, 0.0, cfg.noise, gen, dev).view(b, 1, 1, 1)
    x = x + torch.randn(x.shape, generator=gen, device=dev) * sigma
    x = x.clamp_(0.0, 1.0)
    x = (x - mean) / std
    return x.expand(-1, 3, -1, -1)


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """float32 grey levels in [0, 1]: uint8 images divided by 255, float ones (e.g. float16) as they are."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def center_view(images: torch.Tensor, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """The un-augmented view of letterboxed images (uint8 or float in [0, 1]), as the embedder sees them."""
    x = unit_range(images).unsqueeze(1)
    return ((x - mean) / std).expand(-1, 3, -1, -1)
