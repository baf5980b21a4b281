"""Choose between embedding models (snapshots, ablations) on the tasks' TRAIN splits only.

    python scripts/select_on_train.py --data ../shared/data --out out/select \
        --candidate imagenet=/tmp/stats/{task}.imagenet-effnet-lite0.h5 \
        --candidate shipped=/tmp/stats/{task}.cxr-supcon-effnet-lite0.h5 [--candidate NAME=PATTERN ...] \
        [--tasks tb_shenzhen_mc,covid_cohen,nih_pneumonia,rsna_opacity] [--size 45] [--repeats 20]

Each candidate is an embedding store per task (`{task}` in the pattern is the task's name; make them
with `cxr-embed embed --images ../shared/data/tasks/<task>.csv --image-root ../shared/data`). For each
task, the rows of its **train** split are divided once, by patient and stratified by label (seed 0),
into a selection-train part (60%) and a selection-test part (40%); the task's test split is never read
(the script refuses a labels file in which a selection row comes from it). Then `cxr-embed curve`'s
own code (`probes.curve.run_curve`) draws `--repeats` training sets of `--size` labels from the
selection-train part, fits the probe and scores the selection-test part, with the patient bootstrap
and the paired comparison of the first candidate (the reference) against every other one.

Outputs in --out: per task the derived labels CSV and the curve's outputs, and `selection.csv` /
`selection.md`: per task and candidate the mean AUC with its 95% interval, and the paired difference
candidate - reference with its interval; plus the unweighted mean over tasks (the number to choose by;
ties within the intervals are reported as such, not broken).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's code, whatever copy of cxr-embed is installed

from cxr_embed.labels import read_labels  # noqa: E402
from probes.curve import run_curve  # noqa: E402

TASKS = ("tb_shenzhen_mc", "covid_cohen", "nih_pneumonia", "rsna_opacity")
SELECTION_TEST_FRACTION = 0.4


def split_train_rows(labels_csv: Path, out_csv: Path, seed: int = 0) -> tuple[int, int]:
    """Write the train split of labels_csv, re-split by patient into train/test; return the sizes."""
    table = read_labels(labels_csv, require_split=True)
    rows = table.rows("train")
    by_patient: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        by_patient[table.patients[r] or f"__row{r}"].append(r)
    rng = np.random.default_rng(seed)
    chosen_test: set[str] = set()
    for label in (0, 1):  # stratify: a patient's class is that of most of their images
        pats = sorted(p for p, rs in by_patient.items() if int(round(np.mean(table.labels[rs]))) == label)
        rng.shuffle(pats)
        chosen_test.update(pats[: int(round(SELECTION_TEST_FRACTION * len(pats)))])
    with open(labels_csv, newline="") as fh:
        source = list(csv.DictReader(fh))
    train_images = {table.images[r] for r in rows}
    patient_of = {table.images[r]: (table.patients[r] or f"__row{r}") for r in rows}
    out_rows = []
    for rec in source:
        if rec["image"] not in train_images:
            continue  # the task's test split: never read
        rec = dict(rec, split="test" if patient_of[rec["image"]] in chosen_test else "train")
        out_rows.append(rec)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(source[0]))
        w.writeheader()
        w.writerows(out_rows)
    n_test = sum(r["split"] == "test" for r in out_rows)
    return len(out_rows) - n_test, n_test


def check_no_test_rows(labels_csv: Path, derived_csv: Path) -> None:
    """Refuse to go on if any selection row is an image of the task's test split."""
    table = read_labels(labels_csv, require_split=True)
    test_images = {table.images[r] for r in table.rows("test")}
    with open(derived_csv, newline="") as fh:
        leaked = [r["image"] for r in csv.DictReader(fh) if r["image"] in test_images]
    if leaked:
        raise SystemExit(f"{derived_csv}: {len(leaked)} row(s) come from the test split of {labels_csv}")


def run_task(task: str, candidates: list[tuple[str, str]], args) -> list[dict]:
    labels_csv = Path(args.data) / "tasks" / f"{task}.csv"
    derived = Path(args.out) / task / f"{task}.selection.csv"
    n_train, n_test = split_train_rows(labels_csv, derived)
    check_no_test_rows(labels_csv, derived)
    print(f"{task}: selection-train {n_train} images, selection-test {n_test} (from the train split only)")
    stores = [pattern.format(task=task) for _, pattern in candidates]
    result = run_curve(stores, derived, Path(args.out) / task, sizes=[args.size], repeats=args.repeats,
                       probes=[args.probe], progress=not args.no_progress, bootstrap=args.bootstrap,
                       metadata=False, log=print)
    if len(result.summary) != len(candidates) or len(result.comparisons) != len(candidates) - 1:
        raise SystemExit(f"{task}: expected one summary row per candidate; got {len(result.summary)}")
    out = []  # run_curve keeps the order of the stores: summary per store, comparisons per other store
    for s, (name, _) in zip(result.summary, candidates):
        out.append({"task": task, "candidate": name, "model": s["model"], "auc": s["auc_mean"],
                    "auc_ci_low": s["auc_ci_low"], "auc_ci_high": s["auc_ci_high"], "difference": "",
                    "diff_ci_low": "", "diff_ci_high": "", "n_train": s["n_train"], "n_test": s["n_test"]})
    for c, row in zip(result.comparisons, out[1:]):
        # the curve compares its first store with each other one (first - other); here: candidate - reference
        row.update(difference=-c["difference"], diff_ci_low=-c["diff_ci_high"], diff_ci_high=-c["diff_ci_low"])
        if abs(row["difference"] - (row["auc"] - out[0]["auc"])) > 1e-3:
            raise SystemExit(f"{task}: the paired difference of {row['candidate']} does not match its AUCs")
    return out


def write_outputs(rows: list[dict], out: Path, candidates: list[tuple[str, str]], args) -> None:
    with open(out / "selection.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ref = candidates[0][0]
    lines = [f"Linear probe on {args.size} labels from each task's train split ({args.repeats} draws), scored on "
             f"the held-apart 40% of that train split; difference = candidate - {ref} (paired, 95% interval "
             "over draws and test patients).", "",
             "| task | " + " | ".join(n for n, _ in candidates) + " |", "|---|" + "---|" * len(candidates)]
    by_task: dict[str, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        by_task[r["task"]][r["candidate"]] = r
    for task, cells in by_task.items():
        shown = [f"{c['auc']:.3f}" + (f" ({c['difference']:+.3f}, {c['diff_ci_low']:+.3f} to {c['diff_ci_high']:+.3f})"
                                      if c["difference"] != "" else "") for c in (cells[n] for n, _ in candidates)]
        lines.append(f"| {task} | " + " | ".join(shown) + " |")
    means = [np.mean([by_task[t][n]["auc"] for t in by_task]) for n, _ in candidates]
    lines.append("| mean over tasks | " + " | ".join(f"{m:.3f}" for m in means) + " |")
    (out / "selection.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidate", action="append", required=True, metavar="NAME=PATTERN",
                    help="a model's stores, {task} in the path (repeat; the first is the reference)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--size", type=int, default=45)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--probe", choices=("linear", "gbm"), default="linear")
    ap.add_argument("--bootstrap", type=int, default=2000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    candidates = []
    for c in args.candidate:
        name, sep, pattern = c.partition("=")
        if not sep or "{task}" not in pattern:
            ap.error(f"--candidate {c!r}: write NAME=PATH with {{task}} in the path")
        candidates.append((name, pattern))
    if len(candidates) < 2:
        ap.error("give at least two candidates (the first is the reference)")
    rows = [r for task in args.tasks.split(",") for r in run_task(task.strip(), candidates, args)]
    write_outputs(rows, Path(args.out), candidates, args)


if __name__ == "__main__":
    main()
