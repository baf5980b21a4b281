"""Peak memory of `cxr-embed embed` as the input grows: it must stay flat, not grow with the count.

Runs the real command on ../shared/data/pretrain.csv (15,231 images) in a subprocess and samples its
resident memory (VmRSS/VmHWM from /proc) and the store's image count every second.

    python bench/embed_memory.py --model cxr-supcon-effnet-lite0 --out out/bench/pretrain.supcon.h5
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def proc_mem_mb(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields.get("VmRSS", 0.0), fields.get("VmHWM", 0.0)


def store_count(path: Path) -> int:
    if not path.exists():
        return 0
    from cxr_embed.errors import StoreError
    from cxr_embed.store import Store

    try:
        return len(Store(path))
    except StoreError:  # mid-commit or not yet written
        return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--model", default="cxr-supcon-effnet-lite0")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=0, help="only the first N rows of pretrain.csv")
    args = ap.parse_args()
    data = Path(args.data)
    csv_path = data / "pretrain.csv"
    if args.limit:
        lines = csv_path.read_text().splitlines()[: args.limit + 1]
        csv_path = Path(args.out).with_suffix(".input.csv")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        csv_path.write_text("\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cxr_embed", "embed", "--images", str(csv_path), "--image-root", str(data),
           "--out", str(out), "--model", args.model, "--no-progress"]
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    marks, next_mark, peak = [], 1000, 0.0
    while proc.poll() is None:
        time.sleep(1.0)
        try:
            rss, hwm = proc_mem_mb(proc.pid)
        except FileNotFoundError:
            break
        peak = max(peak, hwm)
        n = store_count(out)
        while n >= next_mark:
            marks.append((next_mark, rss, peak, time.time() - start))
            next_mark += 1000
    print(proc.stdout.read().strip())
    print(f"{'images':>8} {'RSS MB':>8} {'peak MB':>8} {'seconds':>8}")
    for n, rss, pk, t in marks:
        print(f"{n:>8} {rss:>8.0f} {pk:>8.0f} {t:>8.0f}")
    if len(marks) >= 2:
        first, last = marks[0], marks[-1]
        print(f"peak memory at {first[0]} images: {first[2]:.0f} MB; at {last[0]} images: {last[2]:.0f} MB; "
              f"ratio {last[2] / first[2]:.2f} (flat = 1.0)")


if __name__ == "__main__":
    main()
