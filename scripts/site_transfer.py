"""Site transfer on the TB task: train a probe on every image of one site, test it on every image of the other.

    python scripts/site_transfer.py --store default.h5 --store imagenet.h5 \\
        --labels ../shared/data/tasks/tb_shenzhen_mc.csv [--probe linear --probe gbm] [--out site_transfer/]

`tb_shenzhen_mc` mixes two sites, told apart by the file name: `CHN...` Shenzhen (China), `MCU...`
Montgomery County (USA). For each store and probe kind, probes are trained (probes.train_probe,
the fit `cxr-embed probe` and `curve` use, internal CV grouped by patient): on all of Shenzhen, on all of
Montgomery, and on the task's own train split (both sites). They are scored on:

- transfer: Shenzhen -> all Montgomery images, and Montgomery -> all Shenzhen images;
- within site: the train-split probe on each site's test-split images (the task's fixed patient split),
  and, where the target site's train split is large enough (Shenzhen), probes on as many labels as the
  source site has (Montgomery: 36), drawn as the curve draws them (`--draws`, default 20);
- transfer restricted to those same test images, so that the drop (within - transfer) is paired.

Every interval is a 95% percentile interval of the patient-level bootstrap of probes/bootstrap.py (the
curve's: test patients resampled, and the draws where there are several); the same replicates serve every store and probe of
a test set, so model differences and drops are paired. The first store is compared with each other
one: one-sided p (first better), Holm-adjusted across every comparison row. Nothing is chosen on test
images: each probe's settings come from its own training images.
"""

from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever copy of cxr-embed is installed

from cxr_embed.errors import CxrEmbedError, LabelError  # noqa: E402
from cxr_embed.labels import LabelTable, read_labels  # noqa: E402
from cxr_embed.store import Store  # noqa: E402
from probes.bootstrap import draw_resamples, mean_interval, patient_bootstrap, weighted_auc  # noqa: E402
from probes.curve import draw_training_set, model_names  # noqa: E402
from probes.metrics import check_test_classes, holm  # noqa: E402
from probes.probe import train_probe  # noqa: E402

SITES = {"CHN": "Shenzhen", "MCU": "Montgomery"}  # file-name prefix -> site


def site_of(image: str) -> str:
    """The site an image comes from, by its file name's prefix (SITES); LabelError for any other name."""
    name = Path(image).name
    for prefix, site in SITES.items():
        if name.upper().startswith(prefix):
            return site
    raise LabelError(f"{image}: the file name starts with none of {', '.join(SITES)}, so its site is unknown; "
                     "site transfer needs the Shenzhen/Montgomery file names (CHNCXR_..., MCUCXR_...)")


@dataclass(frozen=True)
class Evaluation:
    """One test: the probes trained on the draws of fit `fit` (a key of the fits), scored on rows `test`."""

    name: str
    kind: str  # one of KINDS
    fit: str
    target: str  # the test images' site
    test: tuple[int, ...]


KINDS = ("transfer", "within site", "within site, same labels", "transfer, test images")


def plan(table: LabelTable, draws: int = 20, seed: int = 0) -> tuple[dict[str, list[list[int]]], list[Evaluation]]:
    """The training sets (name -> its draws, each a list of rows) and the evaluations. Transfer and
    the train split are one fit each; where the target site's train split holds more images than the
    source site, the same number of labels is also drawn from it (`draws` stratified draws, the
    curve's), so the drop can be read without the change in training-set size."""
    site = [site_of(im) for im in table.images]
    rows = {s: [i for i in range(len(site)) if site[i] == s] for s in SITES.values()}
    fits = {f"all {s}": [rows[s]] for s in rows} | {"train split": [table.rows("train")]}
    evals = []
    for source, target in (("Shenzhen", "Montgomery"), ("Montgomery", "Shenzhen")):
        test = tuple(i for i in rows[target] if table.splits[i] == "test")
        evals += [Evaluation(f"{source} -> {target}", "transfer", f"all {source}", target, tuple(rows[target])),
                  Evaluation(f"train split -> {target} test", "within site", "train split", target, test),
                  Evaluation(f"{source} -> {target} test", "transfer, test images", f"all {source}", target, test)]
        pool = [i for i in rows[target] if table.splits[i] == "train"]
        n = len(rows[source])
        if n < len(pool):
            name = f"{target} train, {n} labels"
            fits[name] = [[pool[j] for j in draw_training_set(table.y[pool], [table.patients[i] for i in pool], n,
                                                                np.random.default_rng([seed, n, r]))]
                          for r in range(draws)]
            evals.append(Evaluation(f"{name} -> {target} test", "within site, same labels", name, target, test))
    return fits, evals


def balance(table: LabelTable) -> list[dict]:
    """Images, positives and prevalence per site and split, and how many labels disagree with the
    file name's own label suffix (`_1` TB, `_0` normal, as the NLM sets name them)."""
    out = []
    for s in SITES.values():
        for split in ("train", "test", "all"):
            idx = [i for i, im in enumerate(table.images) if site_of(im) == s and split in ("all", table.splits[i])]
            y = table.y[idx]
            suffix = [Path(table.images[i]).stem.rsplit("_", 1)[-1] for i in idx]
            out.append({"site": s, "split": split, "images": len(idx), "positive": int(y.sum()),
                        "prevalence": round(float(y.mean()), 3) if idx else float("nan"),
                        "label_differs_from_file_name": sum(f != str(int(v)) for f, v in zip(suffix, y))})
    return out


def fit_and_score(X: np.ndarray, table: LabelTable, fits: dict, evals: list[Evaluation], kind: str) -> dict:
    """Evaluation name -> (draws, n_test) scores of the probes trained on its fit's draws."""
    probes = {}
    for name, draws in fits.items():
        probes[name] = []
        for r, rows in enumerate(draws):
            groups = [table.patients[i] for i in rows] if all(table.patients[i] for i in rows) else None
            probes[name].append(train_probe(X[rows], table.y[rows], kind=kind, groups=groups, random_state=r))
    return {e.name: np.stack([p.predict_proba(X[list(e.test)])[:, list(p.classes_).index(1)] for p in probes[e.fit]])
            for e in evals}


@dataclass
class Result:
    models: list[str]  # the first is compared with each other one
    balance: list[dict]
    aucs: list[dict]  # evaluation x probe x model
    differences: list[dict]  # evaluation x probe x other model: first - other, Holm-adjusted
    drops: list[dict]  # within-site evaluation x probe x model: within site - transfer on the same test images


def _fmt(iv, tested: bool = True) -> dict:
    out = {"estimate": round(iv.estimate, 4), "ci_low": round(iv.low, 4), "ci_high": round(iv.high, 4)}
    return {**out, "p_one_sided": float(f"{iv.p_greater:.4g}")} if tested else out  # an AUC is not tested against 0


def run_site_transfer(stores: list[str], labels: str, probes=("linear",), B: int = 2000, seed: int = 0,
                      draws: int = 20) -> Result:
    """Train and score every (store, probe, training set); AUCs, paired differences and drops with intervals."""
    table = read_labels(labels, require_split=True)
    if not table.binary:
        raise LabelError(f"{labels}: site transfer needs a binary label")
    fits, evals = plan(table, draws, seed)
    opened = [Store(s) for s in stores]
    names = model_names(opened)
    for st in opened:
        missing = [i for i in table.images if i not in st]
        if missing:
            raise LabelError(f"{len(missing)} labelled image(s) of {labels} have no embedding in {st.path} (e.g. "
                             f"{missing[0]}): embed every image of the task into every store")
    X = [st.get(table.images) for st in opened]
    reps = {}
    for e in evals:  # one set of replicates per test set: paired across models, probes and fits
        y = table.y[list(e.test)] == 1
        check_test_classes(y, f"{labels}: {e.name}")
        if e.test not in reps:
            reps[e.test] = patient_bootstrap(y, [table.patients[i] for i in e.test], B, seed).weights
    resample = {name: draw_resamples(len(d), B, seed, k) for k, (name, d) in enumerate(fits.items())}
    auc = {}  # (evaluation, probe, model) -> (per-draw AUC (R,), per-draw AUC under each replicate (R, B))
    for m, name in enumerate(names):
        for kind in probes:
            for e, scores in zip(evals, fit_and_score(X[m], table, fits, evals, kind).values()):
                y = table.y[list(e.test)] == 1
                auc[(e.name, kind, name)] = (np.array([weighted_auc(y, s, np.ones((1, len(y))))[0] for s in scores]),
                                             np.stack([weighted_auc(y, s, reps[e.test]) for s in scores]))
    ctx = (evals, probes, names, auc, resample)
    return Result(names, balance(table), _auc_rows(table, fits, *ctx), _difference_rows(*ctx), _drop_rows(*ctx))


def _auc_rows(table, fits, evals, probes, names, auc, resample) -> list[dict]:
    rows = []
    for e in evals:
        tr, te = fits[e.fit], list(e.test)
        for kind in probes:
            for name in names:
                rows.append({"evaluation": e.name, "type": e.kind, "probe": kind, "model": name, "draws": len(tr),
                             "n_train": len(tr[0]), "train_positive": int(round(np.mean([table.y[d].sum() for d in tr]))),
                             "n_test": len(te), "test_positive": int(table.y[te].sum()),
                             **_fmt(mean_interval(*auc[(e.name, kind, name)], resample[e.fit]), tested=False)})
    return rows


def _difference_rows(evals, probes, names, auc, resample) -> list[dict]:
    rows = []
    for e in evals:
        for kind in probes:
            a = auc[(e.name, kind, names[0])]
            for other in names[1:]:
                b = auc[(e.name, kind, other)]
                rows.append({"evaluation": e.name, "type": e.kind, "probe": kind, "model_a": names[0], "model_b": other,
                             **_fmt(mean_interval(a[0] - b[0], a[1] - b[1], resample[e.fit]))})
    for r, p in zip(rows, holm([r["p_one_sided"] for r in rows])):
        r["p_holm"] = float(f"{p:.4g}")
    return rows


def _drop_rows(evals, probes, names, auc, resample) -> list[dict]:
    """Within site minus transfer, both on the target site's test images (paired: the same replicates;
    a within-site fit with several draws against the one transfer fit); and, per other model, the
    first model's drop minus its drop."""
    rows = []
    for within in (e for e in evals if e.kind.startswith("within site")):
        transfer = next(e for e in evals if e.kind == "transfer, test images" and e.test == within.test)
        for kind in probes:
            drop = {}
            for name in names:
                w, t = auc[(within.name, kind, name)], auc[(transfer.name, kind, name)]
                drop[name] = (w[0] - t[0], w[1] - t[1])
                rows.append({"within": within.name, "transfer": transfer.name, "probe": kind, "model": name,
                             "auc_within": round(float(w[0].mean()), 4), "auc_transfer": round(float(t[0][0]), 4),
                             **_fmt(mean_interval(*drop[name], resample[within.fit]))})
            for other in names[1:]:
                d = (drop[names[0]][0] - drop[other][0], drop[names[0]][1] - drop[other][1])
                rows.append({"within": within.name, "transfer": transfer.name, "probe": kind,
                             "model": f"{names[0]} - {other}", "auc_within": "", "auc_transfer": "",
                             **_fmt(mean_interval(*d, resample[within.fit]))})
    return rows


def _ci_text(r: dict, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(r['estimate'])} ({f.format(r['ci_low'])} to {f.format(r['ci_high'])})"


def markdown(res: Result) -> str:
    """The tables MODEL_CARD.md shows: balance per site, AUCs with the paired difference (first and
    second model), drops."""
    names = res.models
    out = ["| site | split | images | TB | prevalence | label differs from file name |", "|---|---|---|---|---|---|"]
    out += [f"| {b['site']} | {b['split']} | {b['images']} | {b['positive']} | {b['prevalence']:.3f} | "
            f"{b['label_differs_from_file_name']} |" for b in res.balance]
    diff = {(d["evaluation"], d["probe"]): d for d in res.differences if d["model_b"] == names[1]}
    out += ["", f"| evaluation | probe | train (TB) | test (TB) | {names[0]} AUC (95% CI) | {names[1]} AUC (95% CI) "
                "| difference (95% CI) | Holm p |", "|---|---|---|---|---|---|---|---|"]
    by = {(a["evaluation"], a["probe"], a["model"]): a for a in res.aucs}
    for (ev, kind), d in diff.items():
        a, b = by[(ev, kind, names[0])], by[(ev, kind, names[1])]
        draws = f", {a['draws']} draws" if a["draws"] > 1 else ""
        out.append(f"| {ev} ({a['type']}) | {kind} | {a['n_train']} ({a['train_positive']}{draws}) | {a['n_test']} "
                   f"({a['test_positive']}) | {_ci_text(a)} | {_ci_text(b)} | {_ci_text(d, True)} | {d['p_holm']:.3g} |")
    out += ["", "| within site | transfer | probe | model | AUC within | AUC transfer | drop: within - transfer (95% CI) |",
            "|---|---|---|---|---|---|---|"]
    for r in res.drops:
        w, t = ("", "") if r["auc_within"] == "" else (f"{r['auc_within']:.3f}", f"{r['auc_transfer']:.3f}")
        out.append(f"| {r['within']} | {r['transfer']} | {r['probe']} | {r['model']} | {w} | {t} | {_ci_text(r, True)} |")
    return "\n".join(out)


def _write(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", action="append", required=True,
                    help="embedding store of the task (twice or more: the first is compared with each other one)")
    ap.add_argument("--labels", required=True, help="the tb_shenzhen_mc label CSV (image, label, patient_id, split)")
    ap.add_argument("--probe", action="append", choices=["linear", "gbm"], help="probe kind (repeatable; default linear)")
    ap.add_argument("--bootstrap", type=int, default=2000, help="patient bootstrap replicates (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the draws and the bootstrap (default %(default)s)")
    ap.add_argument("--draws", type=int, default=20,
                    help="draws of the same-number-of-labels within-site reference (default %(default)s)")
    ap.add_argument("--out", help="folder for balance.csv, aucs.csv, differences.csv and drops.csv")
    args = ap.parse_args(argv)
    if len(args.store) < 2:
        ap.error("give two or more --store: the first is compared with each other one")
    if args.draws < 1 or args.bootstrap < 2:
        ap.error(f"--draws must be at least 1 and --bootstrap at least 2, not {args.draws} and {args.bootstrap}")
    try:
        res = run_site_transfer(args.store, args.labels, args.probe or ["linear"], args.bootstrap, args.seed, args.draws)
    except CxrEmbedError as exc:  # a store or labels file that does not fit: its message, not a traceback
        print(f"site_transfer: error: {exc}", file=sys.stderr)
        return 2
    print(markdown(res))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for name in ("balance", "aucs", "differences", "drops"):
            _write(Path(args.out) / f"{name}.csv", getattr(res, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
