"""AUC with DeLong confidence intervals (patient-clustered where ids are given, on the logit scale),
the paired DeLong test, Holm's adjustment, and operating-point metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from cxr_embed.errors import LabelError

MIN_TEST_PER_CLASS = 2  # a variance term needs two of each class; with one it would silently be zero


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


def check_test_classes(y: np.ndarray, where: str = "the test set") -> None:
    """Refuse an AUC interval or test when a class has fewer than MIN_TEST_PER_CLASS images."""
    m, n = int(y.sum()), int((~y).sum())
    if min(m, n) < MIN_TEST_PER_CLASS:
        raise LabelError(f"{where} holds {m} positive and {n} negative image(s): an AUC interval needs at least "
                         f"{MIN_TEST_PER_CLASS} of each class")


def _delong(y_true: np.ndarray, scores: np.ndarray, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014): AUCs of k score rows and their covariance matrix. With `groups`
    (patient ids), images of one patient are one cluster (Obuchowski 1997): the covariance is
    K/(K-1) * sum over the K clusters of the outer product of their summed influence values."""
    y = np.asarray(y_true).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    check_test_classes(y)
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    k = scores.shape[0]
    tx = np.stack([_midrank(pos[r]) for r in range(k)])
    ty = np.stack([_midrank(neg[r]) for r in range(k)])
    tz = np.stack([_midrank(np.concatenate([pos[r], neg[r]])) for r in range(k)])
    aucs = tz[:, :m].sum(axis=1) / m / n - (m + 1.0) / 2.0 / n
    v01 = (tz[:, :m] - tx) / n          # placement of each positive among the negatives
    v10 = 1.0 - (tz[:, m:] - ty) / m    # placement of each negative among the positives
    if groups is None:
        cov = np.atleast_2d(np.cov(v01)) / m + np.atleast_2d(np.cov(v10)) / n
        return aucs, cov
    g = np.asarray(groups)
    _, cluster = np.unique(np.concatenate([g[y], g[~y]]), return_inverse=True)
    infl = np.concatenate([(v01 - aucs[:, None]) / m, (v10 - aucs[:, None]) / n], axis=1)  # k x (m + n)
    per_cluster = np.zeros((k, cluster.max() + 1))
    for r in range(k):
        per_cluster[r] = np.bincount(cluster, weights=infl[r], minlength=per_cluster.shape[1])
    n_clusters = per_cluster.shape[1]
    return aucs, per_cluster @ per_cluster.T * n_clusters / max(n_clusters - 1, 1)


@dataclass
class AUC:
    auc: float
    ci_low: float
    ci_high: float
    n_pos: int
    n_neg: int
    n_clusters: int | None = None  # patients, when the interval is clustered
    method: str = "DeLong, logit scale"
    se: float = 0.0  # DeLong standard error of the AUC (raw scale)


def logit_interval(auc: float, se: float, alpha: float = 0.05, n_pairs: int | None = None) -> tuple[float, float]:
    """Wald interval on the logit scale, mapped back (stays in (0, 1) and widens toward 1 at high AUC).
    An AUC of exactly 0 or 1 is moved half a pair inside the range so the transform is finite."""
    z = stats.norm.ppf(1 - alpha / 2)
    a = float(auc if n_pairs is None else np.clip(auc, 0.5 / n_pairs, 1 - 0.5 / n_pairs))
    half = z * se / (a * (1 - a))
    lo, hi = np.log(a / (1 - a)) - half, np.log(a / (1 - a)) + half
    return float(1 / (1 + np.exp(-lo))), float(1 / (1 + np.exp(-hi)))


def auc_ci(y_true, scores, alpha: float = 0.05, groups=None) -> AUC:
    """ROC AUC with a DeLong (1 - alpha) interval on the logit scale; patient-clustered when `groups`
    (one patient id per image) is given. Raises LabelError with fewer than 2 images of a class."""
    y = np.asarray(y_true).astype(bool)
    aucs, cov = _delong(y, scores, groups)
    auc, se = float(aucs[0]), float(np.sqrt(max(cov[0, 0], 0.0)))
    m, n = int(y.sum()), int((~y).sum())
    lo, hi = logit_interval(auc, se, alpha, m * n)
    if se == 0.0 and min(auc, 1 - auc) < 1e-9:
        # perfect separation: DeLong's variance is 0. Bound it as a binomial with no failure in
        # min(m, n) independent comparisons (exact one-sided, conservative for the AUC)
        edge = (alpha / 2) ** (1 / min(m, n))
        lo, hi = (edge, 1.0) if auc > 0.5 else (0.0, 1 - edge)
    lo, hi = min(lo, auc), max(hi, auc)
    n_clusters = None if groups is None else len(set(np.asarray(groups).tolist()))
    method = "DeLong, logit scale" + (f", clustered by patient ({n_clusters})" if groups is not None else "")
    return AUC(auc, lo, hi, int(y.sum()), int((~y).sum()), n_clusters, method, se)


@dataclass
class PairedAUC:
    auc_a: float
    auc_b: float
    difference: float
    p_value: float


def delong_test(y_true, scores_a, scores_b, groups=None) -> PairedAUC:
    """Two-sided DeLong test that two models' AUCs on the same test set are equal (clustered by
    patient when `groups` is given)."""
    aucs, cov = _delong(np.asarray(y_true), np.vstack([scores_a, scores_b]), groups)
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = float(aucs[0] - aucs[1])
    p = 1.0 if var <= 0 else float(2 * stats.norm.sf(abs(diff) / np.sqrt(var)))
    return PairedAUC(float(aucs[0]), float(aucs[1]), diff, p)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjustment: family-wise error control for any dependence between the tests."""
    p = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(p, kind="mergesort")
    m = len(p)
    stepped = np.maximum.accumulate((m - np.arange(m)) * p[order])
    out = np.empty(m)
    out[order] = np.minimum(stepped, 1.0)
    return out


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
