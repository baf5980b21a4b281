"""The whole data-efficiency curve on a 15,000-image task: 2 stores x 6 sizes x 20 repeats x 2 probes.

The task: ../shared/data/pretrain.csv with its `abnormal` column as the label and a fixed 80/20
split by image (a hash of the id). Needs the two stores of that CSV (bench/embed_memory.py makes
them). Target: under 5 minutes on 2 cores; prints the time and each probe kind's share.

    python bench/curve_15k.py --store out/bench/pretrain.supcon.h5 --store out/bench/pretrain.imagenet.h5
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import time
from pathlib import Path

from probes.curve import run_curve

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--store", action="append", required=True)
    ap.add_argument("--out", default="out/bench/curve15k")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    task = out / "pretrain_abnormal.csv"
    with open(Path(args.data) / "pretrain.csv") as src, open(task, "w", newline="") as dst:
        w = csv.writer(dst)
        w.writerow(["image", "label", "patient_id", "split"])
        for r in csv.DictReader(src):
            h = int(hashlib.sha256(r["image"].encode()).hexdigest()[:8], 16)
            w.writerow([r["image"], r["abnormal"], r["patient_id"], "test" if h % 5 == 0 else "train"])
    t = time.perf_counter()
    res = run_curve(args.store, task, out, sizes=[45, 85, 170, 340, 680, "full"], repeats=args.repeats,
                    probes=["linear", "gbm"], progress=False)
    total = time.perf_counter() - t
    fits = len(res.rows)
    print(f"{fits} probe fits on {len(args.store)} stores in {total:.1f} s ({total / 60:.2f} min; target < 5 min)")
    for kind, s in res.seconds_by_probe.items():
        print(f"  {kind:<6} {s:7.1f} s  ({100 * s / total:4.1f}% of the run)")
    for r in res.summary:
        print(f"  {r['model']:<26} {r['probe']:<6} n={r['n_train']:>6} AUC {r['auc_mean']:.3f}")


if __name__ == "__main__":
    main()
