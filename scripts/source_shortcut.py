"""The source-shortcut check: how well an embedding tells which collection a pool image came from.

    python scripts/source_shortcut.py --model imagenet-effnet-lite0 --model cxr-supcon-effnet-lite0 \
        [--per-source 150] [--data ../shared/data] [--classes configs/finding-classes.yaml] [--out out/shortcut]

A seeded sample of the pretraining pool, `--per-source` images of each source collection, split as
evenly as the source allows between its classes (the `finding` column mapped by `--classes`), is
embedded by each model through the one runtime (`cxr_embed.Embedder`). A multinomial logistic
regression (standardised features, C=0.1) predicts the source, cross-validated in 5 folds grouped by
patient (images without a patient id are their own group) and stratified by source; the out-of-fold
probabilities give the balanced accuracy (chance: 1 / number of sources) and the macro one-vs-rest
AUC (chance 0.5), with 95% percentile intervals from a bootstrap of patients within each source
(the same resamples for every model, so the differences between models are paired).

A source can be recognised through its classes (pneumonia exists only in kermany_pediatric): so the
same check is repeated WITHIN each class that several sources hold (normal: covid19_radiography_db vs
kermany_pediatric; COVID-19: covid19_radiography_db vs covid_cxnet vs hannover_mhh), where only the
collection, not the disease, tells the images apart. Lower is better: an embedding that separates
collections of the same class encodes how a collection was made, which a probe can learn instead of
the disease.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever copy of cxr-embed is installed

from cxr_embed.pool import read_pool_rows, select_rows  # noqa: E402
from cxr_embed.pretrain import PretrainConfig  # noqa: E402

MIN_PER_SOURCE = 10  # images of a class a source needs to enter that class's within-class check
C = 0.1


@dataclass
class Sample:
    images: list[str]
    sources: list[str]
    classes: list[str]
    groups: list[str]  # patient id, or the image itself where the pool has none


def draw_sample(data: Path, classes_file: Path, per_source: int, seed: int = 0) -> Sample:
    """`per_source` images of each source, as evenly as possible between its classes; seeded."""
    cfg = PretrainConfig.from_dict({"labels": str(data / "pretrain.csv"), "label_columns": ["finding"],
                                    "label_map": str(classes_file)})
    rows = read_pool_rows(cfg)
    keep, keys = select_rows(rows, cfg, str(cfg.labels))
    rows = rows.take(keep)
    rng = np.random.default_rng(seed)
    source = np.array(rows.columns["source"])
    cls = np.array(keys)
    chosen: list[int] = []
    for s in sorted(set(source)):
        cells = {c: rng.permutation(np.flatnonzero((source == s) & (cls == c))) for c in sorted(set(cls[source == s]))}
        for c, n in even_split(per_source, {c: len(ix) for c, ix in cells.items()}).items():
            chosen += cells[c][:n].tolist()
    chosen.sort()
    groups = [rows.columns["patient_id"][i] or rows.images[i] for i in chosen]
    return Sample([rows.images[i] for i in chosen], source[chosen].tolist(), cls[chosen].tolist(), groups)


def even_split(total: int, available: dict[str, int]) -> dict[str, int]:
    """`total` shared as evenly as possible between cells, none given more than it has."""
    take = dict.fromkeys(available, 0)
    left = min(total, sum(available.values()))
    while left:
        open_cells = sorted((c for c in available if take[c] < available[c]), key=lambda c: (take[c], c))
        for c in open_cells[:left]:
            take[c] += 1
        left -= min(left, len(open_cells))
    return take


def embed(model: str, data: Path, images: list[str], batch_size: int = 32) -> np.ndarray:
    from cxr_embed import Embedder, configure_process

    configure_process()
    embedder = Embedder(model, batch_size=batch_size, device="cpu")
    try:
        return embedder.embed([data / image for image in images])
    finally:
        embedder.close()


def out_of_fold(x: np.ndarray, y: np.ndarray, groups: list[str], seed: int = 0, folds: int = 5) -> np.ndarray:
    """Out-of-fold class probabilities of the multinomial probe; no group is on both sides of a fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probs = np.zeros((len(y), int(y.max()) + 1))
    for train, test in StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(x, y, groups):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=3000))
        clf.fit(x[train], y[train])
        probs[np.ix_(test, clf[-1].classes_)] = clf.predict_proba(x[test])
    return probs


def scores(y: np.ndarray, probs: np.ndarray, rows: np.ndarray | None = None) -> tuple[float, float]:
    """(balanced accuracy, macro one-vs-rest AUC) of probabilities on `rows` (default: all)."""
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    rows = np.arange(len(y)) if rows is None else rows
    yy, pp = y[rows], probs[rows]
    auc = roc_auc_score(yy, pp[:, 1]) if pp.shape[1] == 2 else roc_auc_score(yy, pp, multi_class="ovr", average="macro")
    return float(balanced_accuracy_score(yy, pp.argmax(1))), float(auc)


def group_resamples(y: np.ndarray, groups: list[str], boot: int, seed: int) -> list[np.ndarray]:
    """Bootstrap row sets: the groups (patients) of each source drawn with replacement, all their rows along."""
    rng = np.random.default_rng([seed, 11])
    members: dict = {}
    for i, (label, g) in enumerate(zip(y.tolist(), groups)):
        members.setdefault(label, {}).setdefault(g, []).append(i)
    strata = [list(by_group.values()) for _, by_group in sorted(members.items())]
    return [np.concatenate([np.concatenate([s[j] for j in rng.integers(0, len(s), len(s))]) for s in strata])
            for _ in range(boot)]


def check(sample: Sample, embeddings: dict[str, np.ndarray], rows: np.ndarray, boot: int, seed: int) -> list[dict]:
    """One subset of the sample (all, or one class): each model's scores with intervals, paired differences."""
    names = sorted({sample.sources[i] for i in rows})
    y = np.array([names.index(sample.sources[i]) for i in rows])
    groups = [sample.groups[i] for i in rows]
    resamples = group_resamples(y, groups, boot, seed)
    results, first = [], None
    for model, emb in embeddings.items():
        probs = out_of_fold(emb[rows], y, groups, seed)
        boot_scores = np.array([scores(y, probs, r) for r in resamples])
        row = {"model": model, "sources": {n: int((y == k).sum()) for k, n in enumerate(names)},
               "patients": len(set(groups)), "chance_balanced_accuracy": round(1 / len(names), 3)}
        for k, metric in enumerate(("balanced_accuracy", "macro_auc")):
            row[metric] = [round(scores(y, probs)[k], 3), *np.round(np.percentile(boot_scores[:, k], [2.5, 97.5]), 3).tolist()]
        if first is None:
            first = boot_scores
        else:
            diff = boot_scores - first
            row["macro_auc_minus_first"] = [round(row["macro_auc"][0] - results[0]["macro_auc"][0], 3),
                                            *np.round(np.percentile(diff[:, 1], [2.5, 97.5]), 3).tolist()]
        results.append(row)
    return results


def subsets(sample: Sample) -> dict[str, np.ndarray]:
    """All images, and each class held by two or more sources (with MIN_PER_SOURCE images each)."""
    out = {"all classes": np.arange(len(sample.images))}
    cls, src = np.array(sample.classes), np.array(sample.sources)
    for c in sorted(set(sample.classes)):
        counts = {s: int(((cls == c) & (src == s)).sum()) for s in set(src[cls == c])}
        keep = [s for s, n in counts.items() if n >= MIN_PER_SOURCE]
        if len(keep) >= 2:
            out[f"within {c}"] = np.flatnonzero((cls == c) & np.isin(src, keep))
    return out


def markdown(report: dict) -> str:
    def ci(v):
        return f"{v[0]:.3f} ({v[1]:.3f} to {v[2]:.3f})"

    lines = ["| images | sources (images) | model | balanced accuracy | chance | macro AUC | AUC minus first model |",
             "|---|---|---|---|---|---|---|"]
    for subset, rows in report["checks"].items():
        for r in rows:
            src = ", ".join(f"{s} {n}" for s, n in r["sources"].items())
            diff = ci(r["macro_auc_minus_first"]) if "macro_auc_minus_first" in r else ""
            lines.append(f"| {subset} | {src} | {r['model']} | {ci(r['balanced_accuracy'])} "
                         f"| {r['chance_balanced_accuracy']} | {ci(r['macro_auc'])} | {diff} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", required=True, help="model name or .safetensors (repeat to compare)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder of pretrain.csv and its images")
    p.add_argument("--classes", default=str(ROOT / "configs" / "finding-classes.yaml"), help="label_map of `finding`")
    p.add_argument("--per-source", type=int, default=150, help="images drawn from each source (default %(default)s)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap replicates (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="folder for report.json and report.md (default: print only)")
    args = p.parse_args(argv)
    sample = draw_sample(Path(args.data), Path(args.classes), args.per_source, args.seed)
    embeddings, seconds = {}, {}
    for model in args.model:
        t0 = time.perf_counter()
        embeddings[model] = embed(model, Path(args.data), sample.images)
        seconds[model] = round(time.perf_counter() - t0, 1)
        print(f"embedded {len(sample.images)} images with {model} in {seconds[model]} s", file=sys.stderr)
    report = {"per_source": args.per_source, "seed": args.seed, "boot": args.boot, "embed_seconds": seconds,
              "checks": {name: check(sample, embeddings, rows, args.boot, args.seed) for name, rows in subsets(sample).items()}}
    print(markdown(report))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "report.json").write_text(json.dumps(report, indent=1))
        (Path(args.out) / "report.md").write_text(markdown(report) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
