"""The learning-curve fit: an inverse power law AUC(n) = a - b * n^(-c) over the sizes a curve
measured, and how many labels it says a target AUC needs, with bootstrap uncertainty.

The form is the one of the learning-curve literature (e.g. Figueroa et al. 2012, "Predicting sample
size required for classification performance"), with a <= 1 (an AUC cannot pass 1), b >= 0 and
c in C_BOUNDS. The fit is weighted least squares on the per-size mean AUCs, each weighted by the
inverse of its bootstrap variance. It is solved by variable projection: for a fixed c the model is
linear in (a, b), so the constrained (a, b) has a closed form, and only c is searched (a log grid,
then golden-section refinement), which finds the global optimum over the bounds for every
replicate without starting values. Uncertainty: the same fit on each bootstrap replicate's per-size
means (the replicates of probes/bootstrap.py, which resample test patients and training draws
jointly across sizes), then percentile intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxr_embed.errors import CxrEmbedError

MIN_SIZES = 3  # three parameters: fewer sizes cannot determine the curve
C_BOUNDS = (0.01, 4.0)  # the exponent's search range (log grid + golden section)
FAR_FACTOR = 2.0  # an answer beyond this many times the largest measured size is flagged as a guess
_GRID = np.geomspace(*C_BOUNDS, 241)
_GOLDEN = (np.sqrt(5.0) - 1.0) / 2.0


class LearningCurveError(CxrEmbedError, ValueError):
    """The learning curve cannot be fitted to these sizes (too few, or values that are not finite)."""


@dataclass(frozen=True)
class PowerLaw:
    """AUC(n) = a - b * n^(-c)."""

    a: float
    b: float
    c: float

    def auc(self, n) -> np.ndarray:
        return self.a - self.b * np.asarray(n, dtype=np.float64) ** (-self.c)

    def labels_for(self, target: float) -> float:
        """The n at which the curve reaches `target`: inf when target >= a (never), 0 when it is flat above it."""
        return float(_labels_for(np.array([[self.a, self.b, self.c]]), target)[0])


@dataclass(frozen=True)
class LabelsNeeded:
    """The answer to "how many labels for AUC `target`?", with a 95% percentile interval."""

    target: float
    n: float  # inf: not reached within the fitted asymptote; nan: no trend (status "no trend")
    low: float
    high: float  # inf when at least 2.5% of replicates never reach the target
    p_reached: float  # share of bootstrap replicates whose asymptote is above the target
    status: str  # one of STATUSES
    note: str


STATUSES = ("no trend", "not reached", "below smallest size", "interpolated", "extrapolated", "far extrapolation")


@dataclass
class CurveFit:
    """A fitted learning curve, its bootstrap refits (B, 3: a, b, c) and the sizes it was fitted on."""

    curve: PowerLaw
    replicates: np.ndarray
    sizes: np.ndarray
    weights: np.ndarray
    max_residual: float  # the largest |mean AUC - fitted AUC| over the sizes

    def interval(self, param: str, alpha: float = 0.05) -> tuple[float, float]:
        col = self.replicates[:, "abc".index(param)]
        return float(np.quantile(col, alpha / 2)), float(np.quantile(col, 1 - alpha / 2))

    def labels_needed(self, target: float, alpha: float = 0.05) -> LabelsNeeded:
        """Labels (training images) for `target` under the fitted curve, its interval and a status."""
        if not 0.5 <= target < 1.0:
            raise LearningCurveError(f"target AUC {target}: give a value in [0.5, 1)")
        per_rep = _labels_for(self.replicates, target)
        if self.curve.b <= 0.0:  # the bound b >= 0 is active: the mean AUC did not rise with the labels
            nan = float("nan")
            return LabelsNeeded(target, nan, nan, nan, float(np.mean(np.isfinite(per_rep))), "no trend",
                                f"the fit is flat at a = {self.curve.a:.3f}: the mean AUC did not rise with the labels "
                                f"between {self.sizes.min():g} and {self.sizes.max():g} (it stayed or fell), so these "
                                f"sizes do not say how many labels reach AUC {target:g}")
        n = self.curve.labels_for(target)
        low = float(np.quantile(per_rep, alpha / 2, method="lower"))
        high = float(np.quantile(per_rep, 1 - alpha / 2, method="higher"))
        status, note = _status(n, target, self.curve.a, self.sizes.min(), self.sizes.max())
        if self.curve.a >= 1.0 - 1e-9 and status != "interpolated":
            note += ("; the fitted plateau sits at its bound a = 1, so the sizes measured do not determine it "
                     f"(c = {self.curve.c:.2g}: a slow, nearly logarithmic climb)")
        return LabelsNeeded(target, n, low, high, float(np.mean(np.isfinite(per_rep))), status, note)


def _status(n: float, target: float, a: float, n_min: float, n_max: float) -> tuple[str, str]:
    if not np.isfinite(n):
        return "not reached", f"AUC {target:g} is at or above the fitted asymptote a = {a:.3f}: more labels of this kind do not reach it"
    if n < n_min:
        return "below smallest size", f"the fit reaches AUC {target:g} before the smallest size measured ({n_min:g}); how few suffice was not measured"
    if n <= n_max:
        return "interpolated", f"within the sizes measured ({n_min:g} to {n_max:g})"
    if n <= FAR_FACTOR * n_max:
        return "extrapolated", f"beyond the largest size measured ({n_max:g}), within {FAR_FACTOR:g}x of it"
    return "far extrapolation", (f"{n / n_max:.2g}x the largest size measured ({n_max:g}): the power law's guess, "
                                 "not a measurement; measure larger sizes before relying on it")


def _labels_for(params: np.ndarray, target: float) -> np.ndarray:
    a, b, c = params[:, 0], params[:, 1], params[:, 2]
    gap = a - target
    out = np.full(len(params), np.inf)
    ok = gap > 0
    with np.errstate(over="ignore"):
        out[ok] = (b[ok] / gap[ok]) ** (1.0 / c[ok])
    return out


def _profile(c: np.ndarray, logn: np.ndarray, Y: np.ndarray, w: np.ndarray):
    """For exponents c (shape broadcastable to Y.shape[:-1]): the constrained weighted least-squares
    (a, b) of Y ~ a - b * n^(-c) with a <= 1, b >= 0, and the cost. The problem is a convex QP in
    (a, b): its optimum is the unconstrained one if feasible, else the best of the two faces."""
    x = np.exp(-np.asarray(c)[..., None] * logn)  # n^(-c)
    sw = w.sum()
    xm, ym = (w * x).sum(-1) / sw, (w * Y).sum(-1) / sw
    sxx = (w * (x - xm[..., None]) ** 2).sum(-1)
    sxy = (w * (x - xm[..., None]) * (Y - ym[..., None])).sum(-1)
    b0 = -sxy / np.where(sxx > 0, sxx, 1.0)
    a0 = ym + b0 * xm
    b1 = np.maximum(0.0, (w * x * (1.0 - Y)).sum(-1) / (w * x * x).sum(-1))  # face a = 1
    a2 = np.minimum(1.0, ym)  # face b = 0
    best = None
    for a, b, feasible in ((a0, b0, (a0 <= 1.0) & (b0 >= 0.0) & (sxx > 0)), (np.ones_like(b1), b1, True),
                           (a2, np.zeros_like(a2), True)):
        cost = (w * (Y - a[..., None] + b[..., None] * x) ** 2).sum(-1)
        cost = np.where(feasible, cost, np.inf)
        if best is None:
            best = [a, b, cost]
        else:
            better = cost < best[2]
            best = [np.where(better, a, best[0]), np.where(better, b, best[1]), np.where(better, cost, best[2])]
    return best


def _fit_many(n: np.ndarray, Y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Fit every row of Y (R, S) on sizes n (S,): (R, 3) parameters a, b, c."""
    logn = np.log(n)
    cost = _profile(_GRID[None, :], logn, Y[:, None, :], w)[2]  # (R, K)
    k = np.argmin(cost, axis=1)
    lo = np.log(_GRID[np.maximum(k - 1, 0)])
    hi = np.log(_GRID[np.minimum(k + 1, len(_GRID) - 1)])
    for _ in range(40):  # golden section on log c inside the bracket around the best grid point
        m1, m2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        f1 = _profile(np.exp(m1), logn, Y, w)[2]
        f2 = _profile(np.exp(m2), logn, Y, w)[2]
        left = f1 <= f2
        hi, lo = np.where(left, m2, hi), np.where(left, lo, m1)
    c = np.exp((lo + hi) / 2)
    c = np.where(_profile(c, logn, Y, w)[2] <= cost[np.arange(len(k)), k], c, _GRID[k])
    a, b, _ = _profile(c, logn, Y, w)
    return np.stack([a, b, c], axis=1)


def _check(n: np.ndarray, auc: np.ndarray) -> None:
    if n.ndim != 1 or auc.shape[-1] != len(n):
        raise LearningCurveError(f"{len(n)} sizes but AUC values of shape {auc.shape}")
    if len(np.unique(n)) < MIN_SIZES:
        raise LearningCurveError(f"a power-law learning curve has 3 parameters and needs at least {MIN_SIZES} "
                                 f"different training-set sizes; got {len(np.unique(n))} "
                                 f"({', '.join(f'{v:g}' for v in n)}): measure more sizes (--sizes)")
    if not (np.all(np.isfinite(n)) and np.all(n > 0) and np.all(np.isfinite(auc))):
        raise LearningCurveError("the sizes must be positive and the AUCs finite to fit a learning curve")


def fit_power_law(n, auc, weights=None) -> PowerLaw:
    """Weighted least-squares fit of AUC(n) = a - b * n^(-c) (a <= 1, b >= 0, c in C_BOUNDS)."""
    n, auc = np.asarray(n, dtype=np.float64), np.asarray(auc, dtype=np.float64)
    _check(n, auc)
    w = np.ones_like(n) if weights is None else np.asarray(weights, dtype=np.float64)
    a, b, c = _fit_many(n, auc[None, :], w / w.sum())[0]
    return PowerLaw(float(a), float(b), float(c))


def fit_learning_curve(n, mean_auc, replicates) -> CurveFit:
    """Fit the per-size mean AUCs, weighting each size by 1 / the variance of its bootstrap
    replicates, and refit every replicate (replicates: (B, S), replicate b's mean AUC per size)."""
    n, mean_auc = np.asarray(n, dtype=np.float64), np.asarray(mean_auc, dtype=np.float64)
    reps = np.asarray(replicates, dtype=np.float64)
    _check(n, mean_auc)
    if reps.ndim != 2 or reps.shape[1] != len(n) or len(reps) < 2 or not np.all(np.isfinite(reps)):
        raise LearningCurveError(f"replicates must be finite, (B >= 2, {len(n)}); got shape {reps.shape}")
    var = np.maximum(reps.var(axis=0, ddof=1), 1e-10)  # floor: a size whose mean never moves
    w = (1.0 / var) / (1.0 / var).sum()
    curve = fit_power_law(n, mean_auc, w)
    return CurveFit(curve, _fit_many(n, reps, w), n, w, float(np.max(np.abs(mean_auc - curve.auc(n)))))


def parse_targets(text: str) -> list[float]:
    """--target-auc: comma-separated AUCs in [0.5, 1), or 'none'."""
    if text.strip().lower() == "none":
        return []
    try:
        targets = [float(t) for t in text.split(",")]
    except ValueError:
        raise LearningCurveError(f"--target-auc {text!r}: give AUC values like 0.8 or 0.8,0.9, or 'none'") from None
    bad = [t for t in targets if not 0.5 <= t < 1.0]
    if bad:
        raise LearningCurveError(f"--target-auc {text!r}: {bad[0]:g} is not an AUC in [0.5, 1)")
    return targets


def fit_rows(fit: CurveFit, targets: list[float]) -> list[dict]:
    """fit.csv's rows for one curve: one per target (one with empty target columns when none)."""
    (a_lo, a_hi), (c_lo, c_hi) = fit.interval("a"), fit.interval("c")
    base = {"sizes": ";".join(f"{n:g}" for n in fit.sizes), "n_sizes": len(fit.sizes),
            "a": round(fit.curve.a, 4), "a_ci_low": round(a_lo, 4), "a_ci_high": round(a_hi, 4),
            "b": float(f"{fit.curve.b:.4g}"), "c": round(fit.curve.c, 4), "c_ci_low": round(c_lo, 4),
            "c_ci_high": round(c_hi, 4), "max_residual": round(fit.max_residual, 4)}
    empty = dict.fromkeys(("target_auc", "labels_needed", "labels_ci_low", "labels_ci_high", "p_reached",
                           "status", "note"), "")
    rows = []
    for target in targets or [None]:
        row = dict(base, **empty, bootstrap=len(fit.replicates))
        if target is not None:
            need = fit.labels_needed(target)
            row.update({"target_auc": target, "labels_needed": _whole(need.n), "labels_ci_low": _whole(need.low),
                        "labels_ci_high": _whole(need.high), "p_reached": round(need.p_reached, 4),
                        "status": need.status, "note": need.note})
        rows.append(row)
    return rows


def _whole(n: float) -> int | float | str:
    """Labels are whole images: round up (inf stays inf; no number, for "no trend", is an empty cell)."""
    if np.isnan(n):
        return ""
    return int(np.ceil(n)) if np.isfinite(n) else float("inf")
