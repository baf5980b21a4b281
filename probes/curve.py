"""The data-efficiency curve: probe AUC against training-set size, per store (model) and probe kind,
with a metadata-only baseline, patient-bootstrap intervals and paired, Holm-adjusted comparisons.

Statistics (probes/bootstrap.py): at each size R training draws are fitted and scored on one test
set. Every interval (the band in curve.png, every *_ci_* column) is a 95% percentile interval of
the mean over draws under B replicates that resample test patients and, independently, the draws;
at `full` there is one draw, so only the test patients vary: the same computation at every size.
Models are compared on the same draws and the same replicates (paired), one-sided (first store
better than each other store), Holm-adjusted across all comparisons of the run. Each model and
probe's mean AUCs are fitted by an inverse power law over the sizes (probes/lcfit.py), refitted on
the same replicates, and asked how many labels each --target-auc needs (fit.csv).

Fits made elsewhere on the same draws (`extra_rows`: rows files of `cxr-embed finetune`, rows.py)
join the run as models of their own: summarised like the stores, and compared with the first store's
probes on the draws both have (a curve of 20 draws against fine-tuning's first 5: those 5).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr_embed.errors import ConfigError, LabelError
from cxr_embed.labels import MIN_PER_CLASS, LabelTable, read_labels
from cxr_embed.store import Store

from .bootstrap import (Replicates, draw_resamples, mean_interval, patient_bootstrap, replicated_means, weighted_auc,
                        weighted_average_precision)
from .lcfit import LearningCurveError, fit_learning_curve, fit_rows
from .metrics import check_test_classes, holm
from .plot import plot_curve
from .probe import train_probe
from .rows import file_hash, fit_row, read_scored_rows, write_csv

METADATA_COLUMNS = ("view", "source")  # columns a metadata-only baseline may use, where they vary
OUTPUT_FILES = ("curve.csv", "summary.csv", "comparison.csv", "fit.csv", "curve.png")
DEFAULT_TARGETS = (0.8,)  # "excellent" discrimination by Hosmer & Lemeshow's rule of thumb; --target-auc sets others


def parse_sizes(text: str) -> list[int | str]:
    out: list[int | str] = []
    for part in text.split(","):
        part = part.strip().lower()
        if part == "full":
            out.append("full")
        elif part.isdigit() and int(part) > 0:
            out.append(int(part))
        else:
            raise LabelError(f"--sizes: {part!r} is neither a positive number nor 'full'")
    return check_sizes(out, f"--sizes {text!r}")


def check_sizes(sizes: list, what: str) -> list:
    """`sizes`, refused when one is given twice (its draws would be fitted and counted twice)."""
    if len(set(map(str, sizes))) != len(sizes):
        raise LabelError(f"{what}: a size is given twice (its draws would be fitted and counted twice)")
    return sizes


def check_disjoint(train: LabelTable, train_rows: list[int], test: LabelTable, test_rows: list[int]) -> None:
    """Refuse a test set that shares an image, or a patient id, with the training rows: its AUC would
    score probes on what they were trained on (e.g. --test-labels naming the training labels)."""
    images = {train.images[i] for i in train_rows} & {test.images[j] for j in test_rows}
    if images:
        raise LabelError(f"{test.path}: {len(images)} test image(s) are also training images of {train.path} "
                         f"(e.g. {sorted(images)[0]}); a test set must be held out")
    patients = ({train.patients[i] for i in train_rows} & {test.patients[j] for j in test_rows}) - {""}
    if patients:
        raise LabelError(f"{test.path}: {len(patients)} patient id(s) have images in both the training and the test "
                         f"rows of {train.path}; split by patient, so that no patient is on both sides")


def draw_training_set(labels: np.ndarray, patients: list[str], n: int, rng: np.random.Generator,
                      min_per_class: int = MIN_PER_CLASS) -> np.ndarray:
    """Indices of about n rows, stratified by class, whole patients at a time where ids exist."""
    classes, y = np.unique(labels, return_inverse=True)
    counts = np.bincount(y)
    quota = np.maximum(min_per_class, np.round(n * counts / counts.sum()).astype(int))
    chosen: list[int] = []
    for c in range(len(classes)):
        rows = np.flatnonzero(y == c)
        groups: dict[str, list[int]] = defaultdict(list)
        for r in rows:
            groups[patients[r] or f"__row{r}"].append(int(r))
        keys = list(groups)
        rng.shuffle(keys)
        taken = 0
        for k in keys:
            if taken >= quota[c]:
                break
            chosen.extend(groups[k])
            taken += len(groups[k])
    return np.array(sorted(set(chosen)))


@dataclass
class CurveData:
    """What the curve is computed on: embeddings of every model (plus the metadata baseline's
    features, last, when the labels have metadata that varies), train and test labels and patients."""

    task: str
    names: list[str]
    stores: list[str]
    train_X: list[np.ndarray]
    test_X: list[np.ndarray]
    tr_y: np.ndarray
    tr_pat: list[str]
    te_y: np.ndarray
    te_pat: list[str]
    external: bool
    baseline: str | None = None  # name of the metadata-only entry of names, if any
    tr_images: list[str] = field(default_factory=list)  # ids of the train rows (the draws index them)
    te_images: list[str] = field(default_factory=list)

    @property
    def grouped(self) -> bool:
        return any(self.tr_pat)


@dataclass
class CurveResult:
    rows: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    comparisons: list[dict] = field(default_factory=list)  # paired, per size and probe, Holm-adjusted
    fits: list[dict] = field(default_factory=list)  # fit.csv: the power law per model and probe, labels per target
    curves: dict = field(default_factory=dict)  # (model, probe) -> CurveFit, for the plot
    seconds_by_probe: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    seconds: float = 0.0


def run_curve(
    stores: list[str | os.PathLike],
    labels: str | os.PathLike,
    out_dir: str | os.PathLike,
    sizes: list[int | str] = (45, 85, 170, 340, 680, "full"),
    repeats: int = 20,
    probes: list[str] = ("linear", "gbm"),
    test_labels: str | os.PathLike | None = None,
    seed: int = 0,
    progress: bool = True,
    log=print,
    positive: str | None = None,
    bootstrap: int = 2000,
    metadata: bool = True,
    extra_rows: list[str | os.PathLike] = (),
    targets: list[float] = DEFAULT_TARGETS,
) -> CurveResult:
    """Train probes on repeated stratified draws of each size, score them on one fixed test set, fit
    the learning curves, and write curve.csv, summary.csv, comparison.csv, fit.csv and curve.png to
    out_dir (module docstring). `extra_rows`: rows files of fits made on the same draws (`cxr-embed
    finetune`), compared too."""
    start = time.perf_counter()
    if int(bootstrap) < 2 or int(repeats) < 1:
        raise ConfigError(f"the curve needs --bootstrap >= 2 and --repeats >= 1, not {bootstrap} and {repeats}")
    sizes = check_sizes(list(sizes), f"sizes {list(sizes)}")
    plot = importlib.util.find_spec("matplotlib") is not None  # a slim install has none: said now, not at the end
    if not plot:
        log("warning: matplotlib is not installed, so no curve.png (the tables are written); pip install matplotlib "
            "for the plot")
    result = CurveResult()
    data = load_curve_data(stores, labels, test_labels, positive, log, result, metadata)
    plan = plan_draws(data.tr_y, data.tr_pat, sizes, repeats, seed, log)
    scores = _fit_all(data, plan, list(probes), result, progress)
    made_from = {"labels_sha256": file_hash(labels), "positive": positive}  # the draws themselves are checked per fit
    extra = add_extra_fits(data, plan, list(extra_rows), scores, result, log, made_from)
    reps = patient_bootstrap(data.te_y, data.te_pat, bootstrap, seed)
    boot = _bootstrap_all(data, scores, reps)
    sizes_done = list(dict.fromkeys(str(s) for s, _, _ in plan))
    resample = Resampler(sizes_done, reps.B, seed)
    n_train = {(str(size), rep): len(idx) for size, rep, idx in plan}
    result.summary = _summarise(data, boot, resample, n_train, reps)
    pairs = _pairs(data, list(probes), extra)
    result.comparisons = _compare(data, boot, resample, n_train, pairs, sizes_done, reps)
    _fit_curves(data, boot, resample, n_train, sizes_done, list(targets), result, log)
    result.seconds = time.perf_counter() - start
    _write_outputs(Path(out_dir), data, result, reps, max(len(plan_of(plan, s)) for s in sizes_done), plot)
    return result


def plan_of(plan: list, size: str) -> list:
    return [p for p in plan if str(p[0]) == size]


class Resampler:
    """The resampled draws of each size (bootstrap.draw_resamples), for any number of draws there."""

    def __init__(self, sizes: list[str], B: int, seed: int):
        self.sizes, self.B, self.seed = sizes, B, seed

    def __call__(self, size: str, n_draws: int) -> np.ndarray:
        return draw_resamples(n_draws, self.B, self.seed, self.sizes.index(size))


def load_curve_data(stores, labels, test_labels, positive, log, result: CurveResult, metadata: bool) -> CurveData:
    """Read the labels and every store; keep the images that every store holds (reporting the rest)."""
    table = read_labels(labels, require_split=True, positive=positive)
    ext = read_labels(test_labels, positive=positive) if test_labels else None
    for t in (table, ext):
        if t is not None and not t.binary:
            raise LabelError(f"{t.path}: the curve is for binary tasks, and its labels have {len(t.classes)} classes "
                             f"({', '.join(map(str, t.classes[:6]))}); name one with --positive to draw it against the rest")
    opened = [Store(s) for s in stores]
    names = model_names(opened)
    test_table = ext or table
    train_rows = table.rows("train")
    test_rows = test_table.rows() if ext else table.rows("test")
    for st, name in zip(opened, names):
        miss = [table.images[i] for i in train_rows if table.images[i] not in st]
        miss += [test_table.images[j] for j in test_rows if test_table.images[j] not in st]
        if miss:
            result.missing[name] = miss
            log(f"warning: {len(miss)} labelled image(s) have no embedding in {st.path} (e.g. {miss[0]}); "
                f"they are left out for every store")
    keep_train = [i for i in train_rows if all(table.images[i] in st for st in opened)]
    keep_test = [j for j in test_rows if all(test_table.images[j] in st for st in opened)]
    if not keep_train or not keep_test:
        raise LabelError(f"{table.path}: no labelled train or test image has an embedding in every store")
    check_disjoint(table, keep_train, test_table, keep_test)
    te_y = test_table.labels[keep_test]
    check_test_classes(te_y == 1, f"{test_table.path} (test images with embeddings)")
    data = CurveData(table.task, names, [str(st.path) for st in opened],
                     [st.get([table.images[i] for i in keep_train]) for st in opened],
                     [st.get([test_table.images[j] for j in keep_test]) for st in opened],
                     table.labels[keep_train], [table.patients[i] for i in keep_train],
                     te_y, [test_table.patients[j] for j in keep_test], ext is not None,
                     tr_images=[table.images[i] for i in keep_train], te_images=[test_table.images[j] for j in keep_test])
    if metadata:
        _add_metadata_baseline(data, table, keep_train, test_table, keep_test, log)
    return data


def metadata_features(train: LabelTable, train_rows: list[int], test: LabelTable, test_rows: list[int]
                      ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One-hot features of the METADATA_COLUMNS that both tables have and that vary in training;
    categories come from the training rows (a test value never seen in training is all zeros)."""
    used, tr_cols, te_cols = [], [], []
    for col in METADATA_COLUMNS:
        if col not in train.extra or col not in test.extra:
            continue
        tr_vals = [train.extra[col][i].strip().upper() for i in train_rows]
        te_vals = [test.extra[col][j].strip().upper() for j in test_rows]
        categories = sorted(set(tr_vals))
        if len(categories) < 2:
            continue
        used.append(col)
        tr_cols += [[v == c for v in tr_vals] for c in categories]
        te_cols += [[v == c for v in te_vals] for c in categories]
    if not used:
        return [], np.zeros((len(train_rows), 0)), np.zeros((len(test_rows), 0))
    return used, np.array(tr_cols, dtype=np.float32).T, np.array(te_cols, dtype=np.float32).T


def _add_metadata_baseline(data: CurveData, table, keep_train, test_table, keep_test, log) -> None:
    used, Xtr, Xte = metadata_features(table, keep_train, test_table, keep_test)
    if not used:
        log(f"note: no metadata baseline: none of the columns {', '.join(METADATA_COLUMNS)} varies in the training rows")
        return
    data.baseline = f"metadata only ({', '.join(used)})"
    data.names.append(data.baseline)
    data.stores.append("")
    data.train_X.append(Xtr)
    data.test_X.append(Xte)


def plan_draws(tr_y: np.ndarray, tr_pat: list[str], sizes, repeats: int, seed: int, log=print) -> list[tuple]:
    """(size, repeat, training indices) for every fit; the same draws for every model. Draw k at size n
    depends only on (seed, n, k) and the train rows, so a run with fewer repeats makes a prefix of
    another's, and `cxr-embed finetune` on the same labels makes the same draws."""
    n_all = len(tr_y)
    plan = []
    for size in sizes:
        n = n_all if size == "full" else int(size)
        if n > n_all:
            log(f"warning: size {size} is larger than the {n_all} training images; skipped")
            continue
        if n == n_all and any(p[0] == "full" for p in plan):
            continue  # a number equal to the train split is 'full'; fit it once
        least = MIN_PER_CLASS * len(np.unique(tr_y))
        if n < min(least, n_all):
            log(f"warning: size {size} is below the {least} images a draw needs ({MIN_PER_CLASS} of each class): "
                f"its draws hold {least} (the n_train column says so)")
        reps = 1 if n == n_all else repeats  # draws of the full set are all equal
        for rep in range(reps):
            rng = np.random.default_rng([seed, n, rep])
            idx = np.arange(n_all) if n == n_all else draw_training_set(tr_y, tr_pat, n, rng)
            plan.append(("full" if n == n_all else size, rep, idx))
    if not plan:
        raise LabelError(f"no size of {list(sizes)} fits in the {n_all} training images")
    return plan


def _fit_all(data: CurveData, plan: list, probes: list[str], result: CurveResult, progress: bool) -> dict:
    """Fit every (draw, model, probe); returns test-set scores keyed (model, probe, size) -> [per draw]."""
    jobs = [(m, k) for m in range(len(data.names)) for k in probes if not (data.names[m] == data.baseline and k != "linear")]
    bar = tqdm(total=len(plan) * len(jobs), unit="probe", desc=f"curve {data.task}", disable=not progress,
               file=sys.stderr, mininterval=1.0)
    scores: dict[tuple, dict[int, np.ndarray]] = defaultdict(dict)
    try:
        for size, rep, idx in plan:
            groups = [data.tr_pat[i] for i in idx] if data.grouped else None
            for m, kind in jobs:
                t0 = time.perf_counter()
                probe = train_probe(data.train_X[m][idx], data.tr_y[idx], kind=kind, groups=groups, random_state=rep)
                p = probe.predict_proba(data.test_X[m])[:, list(probe.classes_).index(1)]
                result.seconds_by_probe[kind] += time.perf_counter() - t0
                scores[(data.names[m], kind, str(size))][rep] = p
                chosen = f"C={probe.C_:g}" if kind == "linear" else f"rounds={probe.n_rounds_}"
                result.rows.append(fit_row(data.task, data.names[m], data.stores[m], kind, size, rep, len(idx), data.te_y,
                                           p, chosen))
                bar.update(1)
    finally:
        bar.close()
    return scores


def add_extra_fits(data: CurveData, plan: list, paths: list, scores: dict, result: CurveResult, log,
                   made_from: dict | None = None) -> list[tuple]:
    """Fits of rows files (rows.py) on this curve's draws join `scores` and `result.rows` (their AUCs
    recomputed on this curve's test images); returns their (model, probe) pairs. Refuses a fit drawn
    on other images or lacking a score for a test image; leaves out (and says so) draws not planned here."""
    draws = {(str(size), rep): idx for size, rep, idx in plan}
    added, skipped = [], 0
    for path in paths:
        for fit in read_scored_rows(path):
            row = fit.row
            key = (str(row["size"]), int(row["repeat"]))
            if row["task"] != data.task or row["model"] in data.names:
                raise LabelError(f"{path}: fits of task {row['task']!r}, model {row['model']!r} cannot join a curve of "
                                 f"task {data.task!r} with models {', '.join(data.names)}")
            differ = [k for k, v in (made_from or {}).items() if fit.run is not None and k in fit.run and fit.run[k] != v]
            if differ:  # e.g. the other class as --positive: its scores would be read the wrong way round
                raise LabelError(f"{path}: {row['model']} was made with another {', '.join(differ)} than this curve "
                                 "(labels_sha256: the labels file's contents): make both from the same labels and --positive")
            if key not in draws:
                skipped += 1
                continue
            if (row["model"], row["probe"], key[0]) in scores and key[1] in scores[(row["model"], row["probe"], key[0])]:
                raise LabelError(f"{path}: {row['model']} draw {key[1]} at size {key[0]} is given twice")
            p = _extra_scores(path, fit, data, draws[key])
            scores[(row["model"], row["probe"], key[0])][key[1]] = p
            result.rows.append(fit_row(data.task, row["model"], str(path), row["probe"], key[0], key[1],
                                       len(draws[key]), data.te_y, p, row["chosen"]))
            added.append((row["model"], row["probe"]))
    if skipped:
        log(f"note: {skipped} fit(s) of the extra rows are at sizes or draws this curve does not make; left out")
    return list(dict.fromkeys(added))


def _extra_scores(path, fit, data: CurveData, idx: np.ndarray) -> np.ndarray:
    """The fit's scores on this curve's test images, after checking it was trained on this draw."""
    row = fit.row
    mine = {data.tr_images[i] for i in idx}
    if set(fit.train_images) != mine:
        raise LabelError(f"{path}: {row['model']} draw {row['repeat']} at size {row['size']} was trained on other images "
                         f"than this curve draws ({len(mine ^ set(fit.train_images))} differ): make both from the same "
                         "labels with the same --seed, and embed every train image into every store")
    missing = [i for i in data.te_images if i not in fit.scores]
    if missing:
        raise LabelError(f"{path}: {row['model']} has no test score for {len(missing)} of this curve's test images "
                         f"(e.g. {missing[0]}); it was scored on another test set")
    return np.array([fit.scores[i] for i in data.te_images], dtype=np.float64)


def _bootstrap_all(data: CurveData, scores: dict, reps: Replicates) -> dict:
    """(model, probe, size) -> {"reps": draw numbers, "auc"|"auprc": (per-draw values (R,), replicate
    values (R, B))}, draws in increasing order."""
    y = data.te_y == 1
    ones = np.ones((1, len(y)))
    out = {}
    for key, by_rep in scores.items():
        draws = sorted(by_rep)
        vectors = [by_rep[r] for r in draws]
        out[key] = {"reps": draws}
        for metric, fn in (("auc", weighted_auc), ("auprc", weighted_average_precision)):
            out[key][metric] = (np.array([fn(y, v, ones)[0] for v in vectors]),
                                np.stack([fn(y, v, reps.weights) for v in vectors]))
    return out


def _mean_n(n_train: dict, size: str, draws: list[int]) -> int:
    return int(round(np.mean([n_train[(size, r)] for r in draws])))


def _summarise(data: CurveData, boot: dict, resample: Resampler, n_train: dict, reps: Replicates) -> list[dict]:
    method = (f"95% CI of the mean over draws: {reps.B} replicates resampling {reps.n_patients} test patients "
              "and the training draws (percentile)")
    rows = []
    for (model, kind, size), entry in boot.items():
        metrics = {m: entry[m] for m in ("auc", "auprc")}
        row = {"task": data.task, "model": model, "probe": kind, "size": size, "n_train": _mean_n(n_train, size, entry["reps"]),
               "draws": len(entry["reps"]), "n_test": len(data.te_y), "n_test_patients": reps.n_patients}
        for metric, (per_draw, values) in metrics.items():
            iv = mean_interval(per_draw, values, resample(size, len(per_draw)))
            row.update({f"{metric}_mean": round(iv.estimate, 4), f"{metric}_ci_low": round(iv.low, 4),
                        f"{metric}_ci_high": round(iv.high, 4)})
        lo, hi = np.percentile(metrics["auc"][0], [2.5, 97.5])
        row.update({"auc_draws_low": round(float(lo), 4), "auc_draws_high": round(float(hi), 4), "ci_method": method})
        rows.append(row)
    return rows


def _pairs(data: CurveData, probes: list[str], extra: list[tuple]) -> list[tuple]:
    """What comparison.csv compares: ((model, probe) a, (model, probe) b): the first store against each
    other store with the same probe, and the first store's probes against each extra (fine-tuned) model."""
    models = [n for n in data.names if n != data.baseline]
    pairs = [((models[0], k), (other, k)) for k in probes for other in models[1:]]
    return pairs + [((models[0], k), e) for k in probes for e in extra]


def _compare(data: CurveData, boot: dict, resample: Resampler, n_train: dict, pairs: list, sizes: list[str],
             reps: Replicates) -> list[dict]:
    """Per pair and size, on the draws both have: paired difference of mean AUC, its interval, a
    one-sided p (a better), Holm-adjusted across every row."""
    rows = []
    for (model_a, kind), (model_b, kind_b) in pairs:
        for size in sizes:
            a, b = boot.get((model_a, kind, size)), boot.get((model_b, kind_b, size))
            common = [r for r in a["reps"] if r in b["reps"]] if a and b else []
            if not common:
                continue
            ia, ib = [a["reps"].index(r) for r in common], [b["reps"].index(r) for r in common]
            da, db = a["auc"][0][ia], b["auc"][0][ib]
            iv = mean_interval(da - db, a["auc"][1][ia] - b["auc"][1][ib], resample(size, len(common)))
            rows.append({"task": data.task, "probe": kind, "size": size, "n_train": _mean_n(n_train, size, common),
                         "draws": len(common), "model_a": model_a, "model_b": model_b, "probe_b": kind_b,
                         "auc_a": round(float(da.mean()), 4), "auc_b": round(float(db.mean()), 4),
                         "difference": round(iv.estimate, 4), "diff_ci_low": round(iv.low, 4),
                         "diff_ci_high": round(iv.high, 4), "p_one_sided": float(f"{iv.p_greater:.4g}"),
                         "n_test": len(data.te_y), "n_test_patients": reps.n_patients, "bootstrap": reps.B})
    for row, p in zip(rows, holm([r["p_one_sided"] for r in rows])):
        row["p_holm"] = float(f"{p:.4g}")
    return rows


def _fit_curves(data: CurveData, boot: dict, resample: Resampler, n_train: dict, sizes_done: list[str],
                targets: list[float], result: CurveResult, log) -> None:
    """The power-law fit of every model's (not the baseline's) mean AUC over its sizes, refitted on
    each bootstrap replicate; a model with fewer than 3 sizes gets a note and no fit."""
    for model, kind in dict.fromkeys((m, k) for m, k, _ in boot if m != data.baseline):
        sizes = [s for s in sizes_done if (model, kind, s) in boot]
        entries = [boot[(model, kind, s)] for s in sizes]
        reps = np.stack([replicated_means(e["auc"][1], resample(s, len(e["reps"]))) for e, s in zip(entries, sizes)],
                        axis=1)
        try:
            fit = fit_learning_curve([_mean_n(n_train, s, e["reps"]) for e, s in zip(entries, sizes)],
                                     [e["auc"][0].mean() for e in entries], reps[np.all(np.isfinite(reps), axis=1)])
        except LearningCurveError as e:
            log(f"note: no learning-curve fit for {model} / {kind} (not in fit.csv): {e}")
            continue
        result.curves[(model, kind)] = fit
        result.fits += [{"task": data.task, "model": model, "probe": kind, **row} for row in fit_rows(fit, targets)]


def model_names(stores: list[Store]) -> list[str]:
    """Each store's model name, told apart by the file's name, then its place, where names repeat
    (two snapshots of one model): results are keyed by these names."""
    names = [s.model_name for s in stores]
    if len(set(names)) == len(names):
        return names
    names = [f"{s.model_name} ({s.path.stem})" for s in stores]
    if len(set(names)) == len(names):
        return names
    return [f"{s.model_name} ({s.path.parent.name}/{s.path.stem}, store {i + 1})" for i, s in enumerate(stores)]


def _write_outputs(out: Path, data: CurveData, result: CurveResult, reps: Replicates, draws: int,
                   plot: bool = True) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("curve.csv", result.rows), ("summary.csv", result.summary),
                       ("comparison.csv", result.comparisons), ("fit.csv", result.fits)):
        if rows:
            write_csv(out / name, rows)
        else:  # nothing of this kind in this run: a file left by an earlier run would be read as this one's
            (out / name).unlink(missing_ok=True)
    if not plot:
        (out / "curve.png").unlink(missing_ok=True)  # an earlier run's plot is not this run's
        return
    n_pos = int((data.te_y == 1).sum())
    title = (f"{data.task}: test n={len(data.te_y)} ({n_pos} positive, {reps.n_patients} patients"
             f"{', external' if data.external else ''}); {draws} training draws per size, 1 at full")
    grids = {key: np.geomspace(fit.sizes.min(), fit.sizes.max(), 100) for key, fit in result.curves.items()}
    fitted = {key: (x, result.curves[key].curve.auc(x)) for key, x in grids.items()}
    plot_curve(result.summary, result.comparisons, out / "curve.png", title=title, baseline=data.baseline,
               prevalence=n_pos / len(data.te_y), fitted=fitted)
