"""The fine-tuning recipe and strategies (probes/finetune.py trains with them). Torch-free, so the
`cxr-embed` parser, which shows the recipe's defaults, builds on a slim install too."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cxr_embed.errors import ConfigError

if TYPE_CHECKING:
    from cxr_embed.augment import AugmentConfig


def _pretraining_augment():
    from cxr_embed.augment import AugmentConfig  # imports torch: only when a recipe is made

    return AugmentConfig()


STRATEGIES = ("full", "last-block")
PROBE = "finetune"  # the probe column of every row this module writes


@dataclass(frozen=True)
class FinetuneConfig:
    """The one recipe (probes/finetune.py's docstring). steps x batch_size images per fit, at every size."""

    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-4  # backbone; the head uses head_lr_mult times this
    head_lr_mult: float = 10.0
    weight_decay: float = 1e-4
    warmup_steps: int = 10
    augment: AugmentConfig = field(default_factory=_pretraining_augment)  # pretraining's

    def __post_init__(self):
        finite = all(math.isfinite(v) for v in (self.lr, self.head_lr_mult, self.weight_decay))
        if not finite or self.steps < 1 or self.batch_size < 2 or self.lr <= 0 or self.head_lr_mult <= 0 \
                or self.weight_decay < 0 or self.warmup_steps < 0:
            raise ConfigError("fine-tuning recipe: steps >= 1, batch size >= 2 (BatchNorm), a finite lr > 0, head "
                              f"multiplier > 0 and weight decay >= 0 needed, not {self}")

    def describe(self) -> str:
        """The recipe in one line, written to every row's `chosen` column."""
        return (f"steps={self.steps} batch={self.batch_size} lr={self.lr:g} head_lr={self.lr * self.head_lr_mult:g} "
                f"wd={self.weight_decay:g} warmup={self.warmup_steps}")
