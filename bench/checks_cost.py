"""What the hardening checks cost: decode + preprocess of the same inputs by this tree and by an
older tree (default: the commit before the checks, f17ef0b), interleaved in rounds, in child
processes that each run one tree. Prints per-input medians, the spread over rounds and the ratio.

    git worktree add /tmp/cxr-old f17ef0b
    python bench/checks_cost.py --baseline /tmp/cxr-old [--rounds 7] [--repeats 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from cxr_embed import load_image, preprocess
from cxr_embed.preprocess import PreprocessConfig
cfg = PreprocessConfig(size=224, mean=0.5, std=0.5)
inputs = [open(p, "rb").read() for p in sys.argv[3:]]
out = {}
for path, data in zip(sys.argv[3:], inputs):
    preprocess(load_image(data), cfg)  # warm-up
    times = []
    for _ in range(int(sys.argv[2])):
        t = time.perf_counter()
        preprocess(load_image(data), cfg)
        times.append(1000 * (time.perf_counter() - t))
    out[path] = sorted(times)[len(times) // 2]
print(json.dumps(out))
"""


def inputs() -> list[str]:
    import data_store

    dcm = Path(data_store.__file__).parent / "data"
    nih = sorted((ROOT / "tests" / "data" / "nih").glob("*.jpg"))[:2]
    return [str(dcm / "RG1_UNCR.dcm"), str(dcm / "RG1_J2KR.dcm"), str(dcm / "RG3_UNCR.dcm"), *map(str, nih)]


def run(tree: Path, repeats: int, files: list[str]) -> dict[str, float]:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tree), str(repeats), *files], capture_output=True,
                          text=True, check=True, cwd="/")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", required=True, help="a checkout of the older tree (git worktree add ...)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    files = inputs()
    rounds = {"old": [], "new": []}
    for r in range(args.rounds):  # alternate which tree goes first: drift of a shared machine evens out
        order = [("old", Path(args.baseline)), ("new", ROOT)] if r % 2 == 0 else [("new", ROOT), ("old", Path(args.baseline))]
        for name, tree in order:
            rounds[name].append(run(tree, args.repeats, files))
    print(f"{'input':<22} {'old ms':>8} {'new ms':>8} {'new/old':>8}  spread of new/old over {args.rounds} rounds")
    totals = {"old": [], "new": []}
    for f in files:
        old = [r[f] for r in rounds["old"]]
        new = [r[f] for r in rounds["new"]]
        ratios = sorted(n / o for n, o in zip(new, old))
        print(f"{Path(f).name:<22} {statistics.median(old):8.1f} {statistics.median(new):8.1f} "
              f"{statistics.median(ratios):8.3f}  {ratios[0]:.3f}-{ratios[-1]:.3f}")
    for name in totals:
        totals[name] = [sum(r.values()) for r in rounds[name]]
    ratios = sorted(n / o for n, o in zip(totals["new"], totals["old"]))
    print(f"{'all inputs':<22} {statistics.median(totals['old']):8.1f} {statistics.median(totals['new']):8.1f} "
          f"{statistics.median(ratios):8.3f}  {ratios[0]:.3f}-{ratios[-1]:.3f}")


if __name__ == "__main__":
    main()
