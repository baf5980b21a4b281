"""Patient-level bootstrap of a fixed test set, crossed with a resampling of training draws.

The curve scores R probes (one per training draw) on one test set. Its uncertainty has two
sources: which training images were drawn, and which test patients happened to be sampled. One
replicate b resamples test *patients* with replacement (every image of a drawn patient comes
along, as weights) and, independently, the R draws with replacement; the statistic is the mean
over the resampled draws of the metric on the reweighted test set. The same replicates (the same
weights, the same resampled draws) are used for every model and probe of a run, so differences
between models are paired. Percentile intervals; one-sided p = (1 + #{replicates <= 0}) / (B + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr_embed.errors import LabelError


@dataclass
class Replicates:
    """B bootstrap replicates of a test set: weights[b, i] = how often image i's patient was drawn."""

    weights: np.ndarray  # (B, n_test)
    n_patients: int
    seed: int

    @property
    def B(self) -> int:
        return self.weights.shape[0]


def patient_bootstrap(y: np.ndarray, patients: list[str] | None, B: int, seed: int = 0) -> Replicates:
    """Replicates resampling patients (images without an id are their own patient), stratified by
    whether a patient has any positive image, so every replicate keeps both classes."""
    y = np.asarray(y).astype(bool)
    ids = [p or f"__image{i}" for i, p in enumerate(patients or [""] * len(y))]
    keys, cluster = np.unique(ids, return_inverse=True)
    has_pos = np.bincount(cluster, weights=y.astype(float), minlength=len(keys)) > 0
    has_neg = np.bincount(cluster, weights=(~y).astype(float), minlength=len(keys)) > 0
    if not (has_pos.any() and has_neg.any()):
        raise LabelError("the test set needs positive and negative images for a bootstrap")
    rng = np.random.default_rng([seed, 7])
    counts = np.zeros((B, len(keys)))
    for stratum in (np.flatnonzero(has_pos), np.flatnonzero(~has_pos)):
        if len(stratum):
            picks = rng.integers(0, len(stratum), size=(B, len(stratum)))
            np.add.at(counts, (np.arange(B)[:, None], stratum[picks]), 1.0)
    return Replicates(counts[:, cluster], len(keys), seed)


def weighted_auc(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of one score vector under each row of weights (ties count one half): (B,)."""
    y = np.asarray(y).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    sp, sn = s[y], s[~y]
    kernel = (sp[:, None] > sn[None, :]) + 0.5 * (sp[:, None] == sn[None, :])
    wp, wn = weights[:, y], weights[:, ~y]
    num = np.einsum("bi,bi->b", wp @ kernel, wn)
    return num / (wp.sum(1) * wn.sum(1))


def weighted_average_precision(y: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's step-wise definition, tied scores one threshold) under each
    row of weights: (B,)."""
    y = np.asarray(y).astype(bool)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    s, yy, w = np.asarray(scores)[order], y[order], weights[:, order]
    last = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]  # end of each tie group
    tp = np.cumsum(w * yy, axis=1)[:, last]
    fp = np.cumsum(w * ~yy, axis=1)[:, last]
    d_tp = np.diff(np.concatenate([np.zeros((len(w), 1)), tp], axis=1), axis=1)
    precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
    return (d_tp * precision).sum(1) / tp[:, -1]


def draw_resamples(n_draws: int, B: int, seed: int, key: int) -> np.ndarray:
    """(B, n_draws) indices of training draws, resampled with replacement (identity for one draw)."""
    if n_draws == 1:
        return np.zeros((B, 1), dtype=int)
    return np.random.default_rng([seed, 11, key]).integers(0, n_draws, size=(B, n_draws))


def replicated_means(boot: np.ndarray, resample: np.ndarray) -> np.ndarray:
    """(B,) the statistic of each replicate: the mean over its resampled draws of the metric under its
    test weights. boot: (R, B) the metric of each draw under each replicate; resample: (B, R)."""
    return boot[resample, np.arange(boot.shape[1])[:, None]].mean(axis=1)


@dataclass
class Interval:
    estimate: float
    low: float
    high: float
    p_greater: float  # one-sided p of H0: statistic <= 0 (meaningful for differences)


def mean_interval(per_draw: np.ndarray, boot: np.ndarray, resample: np.ndarray, alpha: float = 0.05) -> Interval:
    """Estimate = mean over draws of the metric on the full test set; interval = percentiles over B
    of the mean over resampled draws of the metric on the reweighted test set.
    per_draw: (R,); boot: (R, B) the metric of each draw under each replicate; resample: (B, R)."""
    stat = replicated_means(boot, resample)
    stat = stat[np.isfinite(stat)]
    lo, hi = np.percentile(stat, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    p = (1 + np.count_nonzero(stat <= 0)) / (len(stat) + 1)
    return Interval(float(np.mean(per_draw)), float(lo), float(hi), float(p))
