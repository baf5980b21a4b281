"""Few-label probes on frozen embeddings, shaped like scikit-learn estimators.

`Probe(kind="linear")`: standardisation + L2 logistic regression; the strength C is the one of
LINEAR_CS with the lowest cross-validated log-loss of the raw scores (grid 1e-4 to 10 in half
decades: the old grid stopped at 0.1, and small TB draws often chose that edge).
`Probe(kind="gbm")`: LightGBM with small trees, a small learning rate, a minimum leaf size scaled to
the data; the number of rounds is chosen by early stopping on an inner split of each training fold,
so the out-of-fold scores come from a fold that chose nothing.
Both: balanced class weights; binary probes get Platt-calibrated probabilities fitted on
cross-validated (out-of-fold) scores and an operating threshold chosen on those same scores.
`fit(X, y, groups=patient_ids)` keeps each patient's images in one fold (StratifiedGroupKFold) for
every one of those choices.
The fitted state is plain numbers (and LightGBM's text model), so a probe saves to JSON: no pickle.
GBM probes predict with our numpy reading of that text (trees.py), the same after fitting and after
loading: LightGBM trains, and its native parser never reads a model text from a file.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from cxr_embed.errors import LabelError, ModelMismatch
from cxr_embed.identity import ModelIdentity
from cxr_embed.labels import MIN_PER_CLASS

from .metrics import choose_threshold
from .trees import parse_lightgbm_model

KINDS = ("linear", "gbm")
LINEAR_CS = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
LINEAR_CS_LARGE = (1e-4, 1e-3, 0.01, 0.1, 1.0, 10.0)  # above 2000 rows: fewer fits


def _row_space(Z: np.ndarray) -> np.ndarray | None:
    """Orthonormal basis (rows) of the span of Z's rows when there are fewer rows than columns. An L2
    logistic regression's weights lie in that span, so fitting on Z @ basis.T is the same problem in
    n instead of d dimensions (exact; 45 x 1280 becomes 45 x 45)."""
    if Z.shape[0] >= Z.shape[1]:
        return None
    _, s, vt = np.linalg.svd(Z, full_matrices=False)
    return vt[s > s[0] * 1e-10]


def _project(Z: np.ndarray, basis: np.ndarray | None) -> np.ndarray:
    return Z if basis is None else Z @ basis.T


def _folds(y: np.ndarray, groups, n_splits: int, seed: int):
    """Stratified folds; by group (patient) when groups are given. Each test fold holds both classes
    when the data allow it."""
    if groups is None:
        return list(StratifiedKFold(n_splits, shuffle=True, random_state=seed).split(y, y))
    groups = np.asarray(groups)
    n_splits = int(min(n_splits, len(np.unique(groups))))
    return list(StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed).split(y, y, groups))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


class Probe(ClassifierMixin, BaseEstimator):
    """A calibrated classifier on embeddings. Hyper-parameters in __init__, learned state ends in _."""

    def __init__(
        self,
        kind: str = "linear",
        Cs: tuple[float, ...] | None = None,
        cv: int = 5,
        threshold_method: str = "youden",
        target_sensitivity: float = 0.9,
        gbm_learning_rate: float = 0.1,
        gbm_num_leaves: int = 7,
        gbm_max_rounds: int = 300,
        gbm_colsample: float = 0.3,
        identity: dict | None = None,
        random_state: int = 0,
        n_jobs: int = 1,
    ):
        self.kind = kind
        self.Cs = Cs
        self.cv = cv
        self.threshold_method = threshold_method
        self.target_sensitivity = target_sensitivity
        self.gbm_learning_rate = gbm_learning_rate
        self.gbm_num_leaves = gbm_num_leaves
        self.gbm_max_rounds = gbm_max_rounds
        self.gbm_colsample = gbm_colsample
        self.identity = identity
        self.random_state = random_state
        self.n_jobs = n_jobs

    # --- fitting -------------------------------------------------------------------------------

    def fit(self, X, y, groups=None) -> "Probe":
        """Fit on embeddings X and labels y; `groups` (one patient id per row) keeps each patient's
        images in one fold of every internal cross-validation."""
        from threadpoolctl import threadpool_limits

        # One thread by default: on small (2-core) machines OpenMP/BLAS thread teams cost more than
        # they give on probe-sized problems (measured: LightGBM 5x slower with 2 threads than 1).
        with threadpool_limits(limits=self.n_jobs or 1):
            return self._fit(X, y, groups)

    def _fit(self, X, y, groups=None) -> "Probe":
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {self.kind!r}")
        X = np.asarray(X, dtype=np.float32)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise LabelError(f"embeddings {X.shape} and labels ({len(y)},) do not line up")
        if not np.isfinite(X).all():
            raise LabelError("embeddings hold NaN or infinite values")
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        counts = np.bincount(y_idx)
        if len(self.classes_) < 2:
            raise LabelError(f"need at least two classes, got only {self.classes_.tolist()}")
        if counts.min() < MIN_PER_CLASS:
            detail = ", ".join(f"{c!r}: {n}" for c, n in zip(self.classes_.tolist(), counts.tolist()))
            raise LabelError(f"each class needs at least {MIN_PER_CLASS} examples to train and cross-validate ({detail})")
        if groups is not None and len(groups) != len(y):
            raise LabelError(f"groups ({len(groups)},) and labels ({len(y)},) do not line up")
        self.n_features_in_ = X.shape[1]
        folds = int(min(self.cv, counts.min(), 5 if len(X) <= 2000 else 3))
        self.splits_ = _folds(y_idx, groups, folds, self.random_state)
        weights = (len(y_idx) / (len(counts) * counts))[y_idx]  # balanced class weights
        if self.kind == "linear":
            oof = self._fit_linear(X, y_idx)
        else:
            oof = self._fit_gbm(X, y_idx, weights, groups)
        del self.splits_
        self._fit_calibration(oof, y_idx)
        return self

    def _fit_linear(self, X: np.ndarray, y: np.ndarray) -> np.ndarray:
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        scale[scale < 1e-8] = 1.0
        Z = (X - mean) / scale
        Cs = sorted(self.Cs or (LINEAR_CS if len(X) <= 2000 else LINEAR_CS_LARGE))
        n_classes = len(self.classes_)
        oofs = np.zeros((len(Cs), len(X), n_classes if n_classes > 2 else 1))
        for tr, te in self.splits_:
            basis = _row_space(Z[tr])
            clf = self._logreg(Cs[0], warm_start=True)
            for c_i, C in enumerate(Cs):  # weak to strong: each fit starts from the previous one
                clf.set_params(C=C).fit(_project(Z[tr], basis), y[tr])
                oofs[c_i, te] = clf.decision_function(_project(Z[te], basis)).reshape(len(te), -1)
        losses = [self._cv_loss(oof, y) for oof in oofs]
        best = int(np.argmin(losses))
        self.C_ = float(Cs[best])
        basis = _row_space(Z)
        clf = self._logreg(self.C_).fit(_project(Z, basis), y)
        # Back to embedding space, and fold the standardisation in: scores = X @ coef.T + intercept
        coef = (clf.coef_ if basis is None else clf.coef_ @ basis) / scale
        # C order, as a loaded probe has it: BLAS may add in another order for another layout
        self.linear_ = {"coef": np.ascontiguousarray(coef, dtype=np.float64),
                        "intercept": (clf.intercept_ - coef @ mean).astype(np.float64)}
        return oofs[best]

    def _logreg(self, C: float, warm_start: bool = False) -> LogisticRegression:
        return LogisticRegression(C=C, class_weight="balanced", max_iter=300, tol=1e-3, warm_start=warm_start)

    @staticmethod
    def _cv_loss(oof: np.ndarray, y: np.ndarray) -> float:
        """Cross-validated log-loss of the raw scores: picks the strength that ranks and scales best."""
        if oof.shape[1] == 1:
            p = np.clip(_sigmoid(oof[:, 0]), 1e-7, 1 - 1e-7)
            return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
        p = np.clip(_softmax(oof), 1e-7, 1.0)
        return float(-np.mean(np.log(p[np.arange(len(y)), y])))

    def _gbm_params(self, n: int) -> dict[str, Any]:
        n_classes = len(self.classes_)
        return {
            "objective": "binary" if n_classes == 2 else "multiclass",
            **({} if n_classes == 2 else {"num_class": n_classes}),
            "learning_rate": self.gbm_learning_rate,
            "num_leaves": self.gbm_num_leaves,
            "max_depth": 3,
            "min_data_in_leaf": int(max(3, min(50, n // 15))),
            "min_sum_hessian_in_leaf": 1e-3,
            "feature_fraction": self.gbm_colsample,
            "bagging_fraction": 0.8 if n >= 100 else 1.0,
            "bagging_freq": 1 if n >= 100 else 0,
            "lambda_l2": 1.0,
            "max_bin": 31,
            "verbosity": -1,
            "seed": self.random_state,
            "deterministic": True,
            "force_row_wise": True,
            "feature_pre_filter": False,
            "num_threads": self.n_jobs or 1,
        }

    def _fit_gbm(self, X: np.ndarray, y: np.ndarray, w: np.ndarray, groups=None) -> np.ndarray:
        from cxr_embed.optional import require

        lgb = require("lightgbm", "training a GBM probe")  # not in a slim install (GBM probes score without it)
        params = self._gbm_params(len(X))
        n_classes = len(self.classes_)
        oof = np.zeros((len(X), n_classes if n_classes > 2 else 1))
        rounds = []
        # Bin the features once; the folds are subsets that reuse those bins (binning 1280 columns
        # dominates the cost of a fit on a few hundred rows).
        full = lgb.Dataset(X, y, weight=w, params=params, free_raw_data=False).construct()
        outer = _folds(y, groups, int(min(3, np.bincount(y).min())), self.random_state)
        for tr, te in outer:
            # early stopping on an inner split of the training fold only: the held-out fold te
            # chooses nothing, so its out-of-fold scores are honest for calibration and threshold
            fit, stop = self._inner_split(y, groups, tr)
            booster = lgb.train(params, full.subset(fit), self.gbm_max_rounds, valid_sets=[full.subset(stop)],
                                callbacks=[lgb.early_stopping(20, verbose=False)])
            rounds.append(booster.best_iteration or self.gbm_max_rounds)
            oof[te] = booster.predict(X[te], raw_score=True, num_iteration=rounds[-1]).reshape(len(te), -1)
        self.n_rounds_ = int(max(10, np.mean(rounds)))
        booster = lgb.train(params, full, self.n_rounds_)
        self.gbm_model_ = booster.model_to_string()
        self.trees_ = parse_lightgbm_model(self.gbm_model_, X.shape[1], n_classes)
        return oof

    def _inner_split(self, y: np.ndarray, groups, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """About a quarter of `rows` (by patient when grouped, stratified) for early stopping."""
        k = int(max(2, min(4, np.bincount(y[rows]).min())))
        inner = _folds(y[rows], None if groups is None else np.asarray(groups)[rows], k, self.random_state + 1)
        fit, stop = inner[0]
        return rows[fit], rows[stop]

    def _fit_calibration(self, oof: np.ndarray, y: np.ndarray) -> None:
        if len(self.classes_) == 2:
            s = oof[:, 0:1]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                platt = LogisticRegression(C=1e4).fit(s, y)
            self.calibration_ = {"a": float(platt.coef_[0, 0]), "b": float(platt.intercept_[0])}
            if self.calibration_["a"] <= 0:
                # A decreasing sigmoid would reverse the probe's ranking on the word of out-of-fold
                # scores without signal (cross-validation near the null is biased below chance):
                # keep the ranking, and give about the base rate.
                a = 1e-6 / max(float(np.std(s)), 1e-12)
                self.calibration_ = {"a": a, "b": float(np.log(y.mean() / (1 - y.mean())) - a * np.mean(s))}
            probs = _sigmoid(self.calibration_["a"] * s[:, 0] + self.calibration_["b"])
            self.threshold_ = choose_threshold(y, probs, self.threshold_method, self.target_sensitivity)
            self.threshold_info_ = {
                "method": self.threshold_method,
                **({"target_sensitivity": self.target_sensitivity} if self.threshold_method == "sensitivity" else {}),
                "chosen_on": f"out-of-fold calibrated probabilities of {len(y)} training examples",
            }
        else:
            self.calibration_ = None
            self.threshold_ = None
            self.threshold_info_ = {"method": "argmax", "chosen_on": "multi-class: the most probable class"}

    # --- prediction ------------------------------------------------------------------------------

    def _check(self, X) -> np.ndarray:
        if not hasattr(self, "classes_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("this Probe is not fitted yet")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim == 1:
            X = X[None]
        if X.shape[1] != self.n_features_in_:
            raise ModelMismatch(f"embeddings have dimension {X.shape[1]}, the probe was trained on {self.n_features_in_}")
        return X

    def decision_function(self, X) -> np.ndarray:
        """Raw scores: (n,) for binary probes (positive class = classes_[1]), (n, k) otherwise."""
        X = self._check(X)
        if self.kind == "linear":
            z = X.astype(np.float64) @ self.linear_["coef"].T + self.linear_["intercept"]
        else:
            z = self.trees_.raw_score(X)
        return z[:, 0] if z.shape[1] == 1 else z

    def predict_proba(self, X) -> np.ndarray:
        z = self.decision_function(X)
        if len(self.classes_) == 2:
            p = _sigmoid(self.calibration_["a"] * z + self.calibration_["b"])
            return np.stack([1 - p, p], axis=1)
        return _softmax(z)

    def predict(self, X) -> np.ndarray:
        proba = self.predict_proba(X)
        if len(self.classes_) == 2:
            return self.classes_[(proba[:, 1] >= self.threshold_).astype(int)]
        return self.classes_[proba.argmax(axis=1)]

    def check_model(self, identity: dict) -> None:
        """Refuse embeddings from a model other than the one this probe was trained on."""
        if self.identity is None:
            return
        ModelIdentity.coerce(self.identity).check(identity, "these embeddings")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        return tags


def train_probe(embeddings, labels, kind: str = "linear", identity: dict | None = None, groups=None,
                **params) -> Probe:
    """Fit a calibrated probe (linear or gbm) on embeddings; `identity` (a ModelIdentity or its dict)
    ties it to its embedding model; `groups` (patient ids) groups its internal cross-validation."""
    identity = None if identity is None else ModelIdentity.coerce(identity).to_dict()  # plain JSON in probe files
    return Probe(kind=kind, identity=identity, **params).fit(embeddings, labels, groups=groups)
