"""AUC with DeLong confidence intervals, the paired DeLong test, and operating-point metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


def _midrank(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    n = len(x)
    ranks = np.empty(n, dtype=np.float64)
    i = 0
    while i < n:
        j = i
        while j < n and xs[j] == xs[i]:
            j += 1
        ranks[i:j] = 0.5 * (i + j - 1) + 1
        i = j
    out = np.empty(n, dtype=np.float64)
    out[order] = ranks
    return out


def _delong(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs of k score rows and their covariance matrix."""
    y = np.asarray(y_true).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m == 0 or n == 0:
        raise ValueError("AUC needs at least one positive and one negative example")
    k = scores.shape[0]
    tx = np.stack([_midrank(pos[r]) for r in range(k)])
    ty = np.stack([_midrank(neg[r]) for r in range(k)])
    tz = np.stack([_midrank(np.concatenate([pos[r], neg[r]])) for r in range(k)])
    aucs = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / 2.0 / n
    v01 = (tz[:, :m] - tx) / n
    v10 = 1.0 - (tz[:, m:] - ty) / m
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((k, k))
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((k, k))
    return aucs, sx / m + sy / n


@dataclass
class AUC:
    auc: float
    ci_low: float
    ci_high: float
    n_pos: int
    n_neg: int


def auc_ci(y_true, scores, alpha: float = 0.05) -> AUC:
    """ROC AUC with a DeLong (1 - alpha) confidence interval, clipped to [0, 1]."""
    y = np.asarray(y_true).astype(bool)
    aucs, cov = _delong(y, scores)
    auc, se = float(aucs[0]), float(np.sqrt(max(cov[0, 0], 0.0)))
    z = stats.norm.ppf(1 - alpha / 2)
    return AUC(auc, float(max(0.0, auc - z * se)), float(min(1.0, auc + z * se)), int(y.sum()), int((~y).sum()))


@dataclass
class PairedAUC:
    auc_a: float
    auc_b: float
    difference: float
    p_value: float


def delong_test(y_true, scores_a, scores_b) -> PairedAUC:
    """Two-sided DeLong test that two models' AUCs on the same test set are equal."""
    aucs, cov = _delong(np.asarray(y_true), np.vstack([scores_a, scores_b]))
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    p = 1.0 if var <= 0 else float(2 * stats.norm.sf(abs(diff) / np.sqrt(var)))
    return PairedAUC(float(aucs[0]), float(aucs[1]), diff, p)


def sensitivity_specificity(y_true, scores, threshold: float) -> tuple[float, float]:
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(scores) >= threshold
    sens = float((pred & y).sum() / max(1, y.sum()))
    spec = float((~pred & ~y).sum() / max(1, (~y).sum()))
    return sens, spec


def choose_threshold(y_true, probs, method: str = "youden", target_sensitivity: float = 0.9) -> float:
    """Operating threshold on probabilities: Youden's J, or the highest one reaching a sensitivity."""
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(np.asarray(y_true).astype(int), probs)
    thr = np.clip(thr, 0.0, 1.0)
    if method == "youden":
        i = int(np.argmax(tpr - fpr))
    elif method == "sensitivity":
        ok = np.flatnonzero(tpr >= target_sensitivity)
        i = int(ok[0]) if len(ok) else len(thr) - 1
    else:
        raise ValueError(f"threshold method must be 'youden' or 'sensitivity', not {method!r}")
    return float(thr[i])


@dataclass
class AUPRC:
    auprc: float
    ci_low: float
    ci_high: float
    prevalence: float


def auprc_ci(y_true, scores, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0) -> AUPRC:
    """Area under the precision-recall curve (scikit-learn's average precision) with a stratified
    bootstrap (1 - alpha) percentile interval: positives and negatives resampled separately, so
    every resample keeps the test set's prevalence."""
    from sklearn.metrics import average_precision_score

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUPRC needs at least one positive and one negative example")
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boots[b] = average_precision_score(y[idx], s[idx])
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return AUPRC(float(average_precision_score(y, s)), float(low), float(high), float(y.mean()))


def confusion_counts(y_true, scores, threshold: float) -> dict[str, int]:
    """True/false positives/negatives when `scores >= threshold` is called positive."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(scores) >= threshold
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()), "tn": int((~pred & ~y).sum()),
            "fn": int((~pred & y).sum())}
