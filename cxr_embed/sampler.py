"""Batches for SupCon pretraining: balanced by class, and within a class by group (e.g. source).

SupCon needs several images of each class in a batch, and a pool whose classes are of very different
sizes would otherwise train mostly on its largest one. `ClassBalancedBatches` draws
`classes_per_batch` classes per batch and the same number of images of each. With `groups` (one
value per image, e.g. the source collection: `balance_by: [source]`), the images of a class are
drawn from its groups in fixed shares, by default evenly, so that a class found in several
collections looks the same from each and the loss cannot separate classes by telling collections
apart. Balancing cannot help where a class exists in one collection only (in our pool: pneumonia,
only in the paediatric Kermany set); `exclude` (cxr_embed.pool) is the way to test without it.

Within each (class, group) cell images are drawn without replacement, pass after pass (a cell smaller
than one draw is sampled with replacement). Everything is a function of (seed, epoch, rank), so a
resumed run draws the batches it would have drawn.
"""

from __future__ import annotations

import numpy as np


class ClassBalancedBatches:
    """Batches of `classes_per_batch` classes x `per_class` images; within a class, images come from its
    groups in shares proportional to (group size ** group_alpha): 0 evenly, 1 as the pool has them."""

    def __init__(self, labels: np.ndarray, batch_size: int, classes_per_batch: int, seed: int, rank: int = 0,
                 groups: np.ndarray | None = None, group_alpha: float = 0.0):
        self.labels = np.asarray(labels)
        self.classes = np.unique(self.labels)
        self.cpb = min(len(self.classes), classes_per_batch or max(2, batch_size // 4))
        self.per_class = max(2, batch_size // self.cpb)
        self.batch_size = self.cpb * self.per_class
        groups = np.zeros(len(self.labels), np.int64) if groups is None else np.asarray(groups)
        self.cells: dict = {}  # class -> [indices of each of its groups], groups in sorted order
        self.group_names: dict = {}
        self.shares: dict = {}
        for c in self.classes:
            mine = self.labels == c
            names = np.unique(groups[mine])
            self.cells[c] = [np.flatnonzero(mine & (groups == g)) for g in names]
            self.group_names[c] = [str(g) for g in names]
            weight = np.array([len(ix) for ix in self.cells[c]], float) ** float(group_alpha)
            self.shares[c] = weight / weight.sum()
        self.seed, self.rank = seed, rank
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def __len__(self) -> int:
        return max(1, len(self.labels) // self.batch_size)

    def epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch (row indices into `labels`)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        perms = {(c, j): rng.permutation(ix) for c in self.classes for j, ix in enumerate(self.cells[c])}
        cursor = dict.fromkeys(perms, 0)
        batches = []
        for _ in range(len(self)):
            parts = []
            for c in rng.choice(self.classes, size=self.cpb, replace=False):
                for j, n in enumerate(self._counts(c, rng)):
                    if n:
                        parts.append(_take((c, j), int(n), perms, cursor, rng))
            batches.append(np.concatenate(parts))
        self._cache = (epoch, batches)
        return batches

    def _counts(self, c, rng: np.random.Generator) -> np.ndarray:
        """Images of class c from each of its groups in one batch: the share's whole part, and the
        remaining images given to groups drawn (without replacement) by their fractional parts."""
        if len(self.cells[c]) == 1:  # no random draw here: one group is the plain class-balanced sampler
            return np.array([self.per_class])
        expected = self.per_class * self.shares[c]
        counts = np.floor(expected).astype(np.int64)
        left = self.per_class - int(counts.sum())
        if left:
            frac = expected - counts
            counts[rng.choice(len(counts), size=left, replace=False, p=frac / frac.sum())] += 1
        return counts


def _take(cell, n: int, perms: dict, cursor: dict, rng: np.random.Generator) -> np.ndarray:
    """The next n images of a cell's permutation, reshuffled when a pass is used up."""
    ix = perms[cell]
    if cursor[cell] + n > len(ix):
        perms[cell] = ix = rng.permutation(ix)
        cursor[cell] = 0
    take = ix[cursor[cell]: cursor[cell] + n]
    if len(take) < n:  # a cell smaller than one draw: sample with replacement
        take = rng.choice(ix, n, replace=True)
    cursor[cell] += n
    return take
