"""Markdown tables of `cxr-embed curve` outputs, as BENCHMARKS.md and MODEL_CARD.md show them.

    python scripts/curve_tables.py docs/curves tb_shenzhen_mc covid_cohen nih_pneumonia rsna_opacity
    python scripts/curve_tables.py docs/curves --at 45 tb_shenzhen_mc ...   # one row per task and probe
    python scripts/curve_tables.py docs/curves --fit tb_shenzhen_mc ...     # the learning-curve fits (fit.csv)
    python scripts/curve_tables.py docs/finetune --finetune tb_shenzhen_mc ...  # probes against fine-tuning

A difference is in bold only where its 95% interval excludes 0 and its Holm-adjusted one-sided p is
below 0.05 (in the --finetune table, where the goal's 0.03 is what matters, bold marks a mean more
than 0.03 below, as its legend says). The metadata-only column is the linear metadata baseline at
the same size. Each difference is printed beside the AUCs of the two models it compares, on the
draws both have.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

NAMES = {"cxr-supcon-effnet-lite0": "shipped", "imagenet-effnet-lite0": "ImageNet"}  # --at's column heads


def _ci(r: dict, key: str = "auc") -> str:
    return f"{float(r[key + '_mean']):.3f} ({float(r[key + '_ci_low']):.3f}-{float(r[key + '_ci_high']):.3f})"


def _diff_text(c: dict) -> str:
    return f"{float(c['difference']):+.3f} ({float(c['diff_ci_low']):+.3f} to {float(c['diff_ci_high']):+.3f})"


def _diff(c: dict) -> str:
    text = _diff_text(c)
    return f"**{text}**" if float(c["p_holm"]) < 0.05 and float(c["diff_ci_low"]) > 0 else text


def load(folder: Path) -> tuple[list[dict], dict, str | None]:
    try:
        summary = list(csv.DictReader(open(folder / "summary.csv")))
        comparison = list(csv.DictReader(open(folder / "comparison.csv")))
    except OSError as exc:
        sys.exit(f"curve_tables: {folder} is not a curve output folder ({exc.strerror}: {exc.filename})")
    if not summary or not comparison:
        sys.exit(f"curve_tables: {folder} has no comparisons (a curve of two or more stores, or --extra-rows, has)")
    by = {(r["model"], r["probe"], r["size"]): r for r in summary}
    base = next((m for m in dict.fromkeys(r["model"] for r in summary) if m.startswith("metadata")), None)
    return comparison, by, base


def _auc_cell(c: dict, r: dict | None, side: str) -> str:
    """A model's AUC beside a difference: its summary (with CI) when that covers the same draws, else
    the comparison's mean over the shared draws."""
    if r is not None and r["draws"] == c["draws"]:
        return _ci(r)
    return f"{float(c['auc_' + side]):.3f} (its {c['draws']} shared draws)"


def task_table(folder: Path) -> list[str]:
    comparison, by, base = load(folder)
    first = next(iter(by.values()))
    pairs = dict.fromkeys((c["model_a"], c["model_b"]) for c in comparison)
    one = len(pairs) == 1  # two stores: the models in the header; more (or extra rows): a column names the other
    a, b = next(iter(pairs))
    head = f"{b} AUC (95% CI)" if one else "compared with | its AUC (95% CI)"
    lines = [f"#### {folder.name} (test: {first['n_test']} images, {first['n_test_patients']} patients)", "",
             f"| probe | n_train | draws | {a} AUC (95% CI) | {head} | difference (95% CI) | Holm p "
             "| metadata-only AUC (95% CI) |", "|---" * (8 if one else 9) + "|"]
    for c in comparison:
        probe_b = c.get("probe_b") or c["probe"]
        ra, rb = by.get((c["model_a"], c["probe"], c["size"])), by.get((c["model_b"], probe_b, c["size"]))
        other = "" if one else f"{c['model_b']} ({probe_b}) | "
        m = by.get((base, "linear", c["size"])) if base else None
        size = f"{c['n_train']} (full)" if c["size"] == "full" else c["n_train"]
        lines.append(f"| {c['probe']} | {size} | {c['draws']} | {_auc_cell(c, ra, 'a')} | {other}{_auc_cell(c, rb, 'b')} "
                     f"| {_diff(c)} | {float(c['p_holm']):.3g} | {_ci(m) if m else 'n/a'} |")
    return lines + [""]


def at_size_table(root: Path, tasks: list[str], size: str) -> list[str]:
    lines, pair = [], None
    for task in tasks:
        comparison, by, base = load(root / task)
        for c in (c for c in comparison if c["size"] == size):
            pair = pair or (c["model_a"], c["model_b"])
            if (c["model_a"], c["model_b"]) != pair:
                sys.exit(f"curve_tables: --at shows one pair of models; {root / task} also compares "
                         f"{c['model_a']} with {c['model_b']}: use the per-task table")
            m = by.get((base, "linear", size)) if base else None
            meta = f"{float(m['auc_mean']):.3f}" if m else "n/a"
            lines.append(f"| {task} | {c['probe']} | {c['n_train']} | {float(c['auc_a']):.3f} | {float(c['auc_b']):.3f} "
                         f"| {_diff(c)} | {float(c['p_holm']):.3g} | {meta} |")
    a, b = (NAMES.get(m, m) for m in (pair or ("model a", "model b")))
    head = [f"| task | probe | n_train | {a} AUC | {b} AUC | difference (95% CI) | Holm p | metadata-only |",
            "|---|---|---|---|---|---|---|---|"]
    return head + lines + [""]


FINETUNED = (("full, ours", "finetune-full:cxr-supcon-effnet-lite0"),
             ("full, ImageNet", "finetune-full:imagenet-effnet-lite0"),
             ("last-block", "finetune-last-block:cxr-supcon-effnet-lite0"))
GOAL = 0.03  # issue 18: the linear probe at most this far below full fine-tuning


def finetune_table(root: Path, tasks: list[str]) -> list[str]:
    """One row per task and size: the first store's probes and each fine-tuned model (mean AUC over the
    draws), and the linear probe minus each fine-tuned model on the same draws (95% CI)."""
    names = [n for n, _ in FINETUNED]
    lines = ["| task | labels | draws | linear probe | GBM probe | " + " | ".join(names) + " | "
             + " | ".join(f"linear minus {n}" for n in names) + " |", "|---" * (5 + 2 * len(names)) + "|"]
    for task in tasks:
        comparison, by, _ = load(root / task)
        first = comparison[0]["model_a"]
        for size in dict.fromkeys(c["size"] for c in comparison):
            diffs = {c["model_b"]: c for c in comparison if c["size"] == size and c["probe"] == "linear"}
            aucs = [by.get((m, "finetune", size)) for _, m in FINETUNED]
            lin = by[(first, "linear", size)]
            cells = [("not run" if r is None else f"{float(r['auc_mean']):.3f}"
                      + ("" if r["draws"] == lin["draws"] else f" ({r['draws']} draws)")) for r in aucs]
            gaps = []
            for _, m in FINETUNED:
                c = diffs.get(m)
                if c is None:
                    gaps.append("not run")
                    continue
                text = _diff_text(c)
                gaps.append(f"**{text}**" if float(c["difference"]) < -GOAL else text)
            gbm = by.get((first, "gbm", size))
            gbm_cell = f"{float(gbm['auc_mean']):.3f}" if gbm else "n/a"
            lines.append(" | ".join([f"| {task}", lin["n_train"], lin["draws"], f"{float(lin['auc_mean']):.3f}", gbm_cell,
                                     *cells, *gaps]) + " |")
    return lines + ["", f"In bold: the linear probe's mean more than {GOAL} below the fine-tuned model's.", ""]


def _count(text: str) -> str:
    if text == "":
        return "n/a"  # status "no trend": no number
    v = float(text)
    return "inf" if v == float("inf") else (f"{v:.0f}" if v < 1e5 else f"{v:.0e}".replace("+0", "").replace("+", ""))


def _p(text: str) -> str:
    return f"{float(text):.2f}" if text != "" else "n/a"


def fit_table(root: Path, tasks: list[str]) -> list[str]:
    lines = ["| task | model | probe | plateau a (95% CI) | c | max residual | target | labels needed (95% CI) "
             "| p reached | status | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for task in tasks:
        path = root / task / "fit.csv"
        if not path.exists():
            continue
        for r in csv.DictReader(open(path)):
            lines.append(f"| {task} | {r['model']} | {r['probe']} | {float(r['a']):.3f} ({float(r['a_ci_low']):.3f}-"
                         f"{float(r['a_ci_high']):.3f}) | {float(r['c']):.2f} | {float(r['max_residual']):.3f} "
                         f"| {r['target_auc']} | {_count(r['labels_needed'])} ({_count(r['labels_ci_low'])}-"
                         f"{_count(r['labels_ci_high'])}) | {_p(r['p_reached'])} | {r['status'] or 'no target'} "
                         f"| {r.get('note', '')} |")
    return lines + [""]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", type=Path, help="the folder holding one curve output folder per task")
    ap.add_argument("tasks", nargs="+")
    ap.add_argument("--at", help="one size only (e.g. 45): one row per task and probe")
    ap.add_argument("--fit", action="store_true", help="the learning-curve fits of fit.csv")
    ap.add_argument("--finetune", action="store_true", help="the probes against the fine-tuned models, per size")
    args = ap.parse_args(argv)
    if args.finetune:
        print("\n".join(finetune_table(args.root, args.tasks)))
        return
    if args.fit:
        print("\n".join(fit_table(args.root, args.tasks)))
        return
    if args.at:
        print("\n".join(at_size_table(args.root, args.tasks, args.at)))
        return
    for task in args.tasks:
        print("\n".join(task_table(args.root / task)))


if __name__ == "__main__":
    main()
