"""The data-efficiency curve: probe AUC against training-set size, per store (model) and probe kind."""

from __future__ import annotations

import csv
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cxr_embed.errors import LabelError
from cxr_embed.labels import MIN_PER_CLASS, read_labels
from cxr_embed.store import Store

from .metrics import auc_ci, delong_test
from .probe import train_probe

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
    return out


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
class CurveResult:
    rows: list[dict] = field(default_factory=list)
    summary: list[dict] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    comparisons: list[dict] = field(default_factory=list)  # paired DeLong tests on the full training split
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
) -> CurveResult:
    """Train probes on repeated stratified draws of each size and score them on one fixed test set."""
    start = time.perf_counter()
    table = read_labels(labels, require_split=True, positive=positive)
    ext = read_labels(test_labels, positive=positive) if test_labels else None
    for t in (table, ext):
        if t is not None and not t.binary:
            raise LabelError(f"{t.path}: the curve is for binary tasks, and its labels have {len(t.classes)} classes "
                             f"({', '.join(map(str, t.classes[:6]))}); name one with --positive to draw it against the rest")
    opened = [Store(s) for s in stores]
    names = _model_names(opened)

    train_rows = [i for i, s in enumerate(table.splits) if s == "train"]
    if ext is None:
        test_ids = [table.images[i] for i, s in enumerate(table.splits) if s == "test"]
        test_y = np.array([table.labels[i] for i, s in enumerate(table.splits) if s == "test"])
    else:
        test_ids, test_y = ext.images, ext.labels
    # One test set for every store: the ids that every store holds. What is missing is reported.
    result = CurveResult()
    keep_train = [i for i in train_rows if all(table.images[i] in st for st in opened)]
    keep_test = [j for j, image in enumerate(test_ids) if all(image in st for st in opened)]
    for st, name in zip(opened, names):
        miss = [table.images[i] for i in train_rows if table.images[i] not in st]
        miss += [image for image in test_ids if image not in st]
        if miss:
            result.missing[name] = miss
            log(f"warning: {len(miss)} labelled image(s) have no embedding in {st.path} (e.g. {miss[0]}); "
                f"they are left out for every store")
    if not keep_train or not keep_test:
        raise LabelError("no labelled train or test image has an embedding in every store")
    tr_images = [table.images[i] for i in keep_train]
    tr_y = table.labels[keep_train]
    tr_pat = [table.patients[i] for i in keep_train]
    te_images = [test_ids[j] for j in keep_test]
    te_y = test_y[keep_test]
    classes = np.unique(np.concatenate([tr_y, te_y]))
    if len(np.unique(te_y)) < 2:
        raise LabelError("the test set holds a single class: AUC is undefined")
    positive = 1  # y is 0/1 with 1 the positive class (cxr_embed.labels)
    multiclass = len(classes) > 2

    train_X = [st.get(tr_images) for st in opened]
    test_X = [st.get(te_images) for st in opened]
    identities = [st.identity for st in opened]

    plan = []
    for size in sizes:
        n = len(tr_images) if size == "full" else int(size)
        if n > len(tr_images):
            log(f"warning: size {size} is larger than the {len(tr_images)} training images; skipped")
            continue
        reps = 1 if (size == "full" or n == len(tr_images)) else repeats  # draws of the full set are all equal
        for rep in range(reps):
            rng = np.random.default_rng([seed, n, rep])
            idx = np.arange(len(tr_images)) if n == len(tr_images) else draw_training_set(tr_y, tr_pat, n, rng)
            plan.append((size, rep, idx))

    total = len(plan) * len(opened) * len(probes)
    bar = tqdm(total=total, unit="probe", desc=f"curve {table.task}", disable=not progress, file=sys.stderr, mininterval=1.0)
    scores_by_key: dict[tuple, list[float]] = defaultdict(list)
    full_scores: dict[tuple, np.ndarray] = {}
    try:
        for size, rep, idx in plan:
            for s_i, name in enumerate(names):
                for kind in probes:
                    t0 = time.perf_counter()
                    probe = train_probe(train_X[s_i][idx], tr_y[idx], kind=kind, identity=identities[s_i], random_state=rep)
                    proba = probe.predict_proba(test_X[s_i])
                    if multiclass:
                        from sklearn.metrics import roc_auc_score

                        auc = float(roc_auc_score(te_y, proba, multi_class="ovr", labels=probe.classes_))
                    else:
                        auc = auc_ci(te_y == positive, proba[:, list(probe.classes_).index(positive)]).auc
                    result.seconds_by_probe[kind] += time.perf_counter() - t0
                    row = {"task": table.task, "model": name, "store": str(opened[s_i].path), "probe": kind,
                           "size": str(size), "repeat": rep, "n_train": int(len(idx)), "auc": round(auc, 5)}
                    result.rows.append(row)
                    scores_by_key[(name, kind, str(size))].append(auc)
                    if size == "full" or len(idx) == len(tr_images):
                        if not multiclass:
                            full_scores[(name, kind)] = proba[:, list(probe.classes_).index(positive)]
                        ci = auc_ci(te_y == positive, proba[:, list(probe.classes_).index(positive)]) if not multiclass else None
                        scores_by_key[(name, kind, str(size), "ci")] = [ci.ci_low, ci.ci_high] if ci else [auc, auc]
                    bar.update(1)
    finally:
        bar.close()
    for name in names:
        for kind in probes:
            for size in dict.fromkeys(str(s) for s, _, _ in plan):
                aucs = np.array(scores_by_key[(name, kind, size)])
                n_train = [r["n_train"] for r in result.rows if r["model"] == name and r["probe"] == kind and r["size"] == size]
                if len(aucs) > 1:
                    lo, hi = np.percentile(aucs, [2.5, 97.5])
                    method = f"2.5-97.5 percentile over {len(aucs)} training draws"
                else:
                    lo, hi = scores_by_key[(name, kind, size, "ci")]
                    method = "DeLong 95% CI (single fit on the full training split)"
                result.summary.append({
                    "task": table.task, "model": name, "probe": kind, "size": size,
                    "n_train": int(round(float(np.mean(n_train)))), "repeats": len(aucs),
                    "auc_mean": round(float(aucs.mean()), 4), "auc_ci_low": round(float(lo), 4),
                    "auc_ci_high": round(float(hi), 4), "ci_method": method,
                })
    for kind in probes:  # the first store against each other one, same test set: paired DeLong
        for other in names[1:]:
            if (names[0], kind) in full_scores and (other, kind) in full_scores:
                t = delong_test(te_y == positive, full_scores[(names[0], kind)], full_scores[(other, kind)])
                result.comparisons.append({"task": table.task, "probe": kind, "model_a": names[0], "model_b": other,
                                           "n_train": len(tr_images), "auc_a": round(t.auc_a, 4),
                                           "auc_b": round(t.auc_b, 4), "difference": round(t.difference, 4),
                                           "delong_p": float(f"{t.p_value:.4g}")})
    result.seconds = time.perf_counter() - start
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "curve.csv", result.rows)
    _write_csv(out / "summary.csv", result.summary)
    _write_csv(out / "comparison.csv", result.comparisons)
    plot_curve(result.summary, out / "curve.png", title=f"{table.task}: AUC vs. labelled training images "
               f"(test n={len(te_y)}{', external' if ext else ''})")
    return result


def _model_names(stores: list[Store]) -> list[str]:
    names = [s.model_name for s in stores]
    if len(set(names)) == len(names):
        return names
    return [f"{s.model_name} ({s.path.stem})" for s in stores]


def _write_csv(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def plot_curve(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    styles = {"linear": "-", "gbm": "--"}
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = list(dict.fromkeys(r["model"] for r in summary))
    for m_i, model in enumerate(models):
        for kind in dict.fromkeys(r["probe"] for r in summary):
            rows = sorted((r for r in summary if r["model"] == model and r["probe"] == kind), key=lambda r: r["n_train"])
            if not rows:
                continue
            x = [r["n_train"] for r in rows]
            colour = colours[m_i % len(colours)]
            ax.plot(x, [r["auc_mean"] for r in rows], styles.get(kind, ":"), marker="o", ms=4, color=colour,
                    label=f"{model} / {kind}")
            ax.fill_between(x, [r["auc_ci_low"] for r in rows], [r["auc_ci_high"] for r in rows], color=colour,
                            alpha=0.12 if kind == "linear" else 0.07)
    ax.set_xscale("log")
    ticks = sorted({r["n_train"] for r in summary})
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled training images (log scale)")
    ax.set_ylabel("test AUC (mean; band: 95% range)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
