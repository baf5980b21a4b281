"""What one store commit costs, as the store grows: this tree's StoreWriter against a baseline tree's,
in child processes that take turns, in the same run.

A store of S rows (1280-d embeddings, listener-like metadata of about 1 KB) is built with one commit
per 500 rows, then R commits of 1 row each are timed (wall clock, fsyncs included: what a C-STORE
waits for) and their median printed, for each size S.

    git worktree add /tmp/cxr-old 7467e36      # before the journal
    python bench/store_commit.py --baseline /tmp/cxr-old [--sizes 0 1000 10000] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np
from cxr_embed.store import StoreWriter
sizes, repeats = json.loads(sys.argv[1]), int(sys.argv[2])
identity = {"model_name": "bench", "weights_hash": "0" * 16, "preprocess_version": "cxr-pre-v1", "dim": 1280}
meta = {"dicom": {"StudyInstanceUID": "1.2.826.0.1." + "7" * 40, "Modality": "CR", "Rows": 1955}, "findings": {"note": "x" * 700},
        "scores": {}, "calling_ae_title": "BENCH"}
rng, out = np.random.default_rng(0), {}
with tempfile.TemporaryDirectory() as d:
    for size in sizes:
        writer = StoreWriter(Path(d) / f"s{size}.h5", identity)
        writer.commit()
        for n in range(size):
            writer.add(f"row-{n}", rng.standard_normal(1280).astype(np.float32), meta)
            if (n + 1) % 500 == 0:
                writer.commit()
        writer.commit()
        times = []
        for n in range(repeats):
            writer.add(f"new-{n}", rng.standard_normal(1280).astype(np.float32), meta)
            t = time.perf_counter()
            writer.commit()
            times.append(time.perf_counter() - t)
        out[size] = float(np.median(times))
print(json.dumps(out))
"""


def run(tree: Path, sizes: list[int], repeats: int) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(sizes), str(repeats)], capture_output=True, text=True,
                         cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, check=True)
    return {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", type=Path, required=True, help="a source tree to compare with")
    ap.add_argument("--sizes", nargs="+", type=int, default=[0, 1000, 10000])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for r in range(args.rounds):
        base, now = run(args.baseline.resolve(), args.sizes, args.repeats), run(ROOT, args.sizes, args.repeats)
        for size in args.sizes:
            print(f"round {r + 1}, store of {size:>6} rows: one-row commit {base[size] * 1000:7.1f} ms before, "
                  f"{now[size] * 1000:6.1f} ms now ({now[size] / base[size]:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
