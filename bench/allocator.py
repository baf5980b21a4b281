"""Page faults and time of CPU model calls with and without the malloc settings of allocator.py.

The work is the service's under load: two threads, each running torch on one thread, each doing
main-model calls on 4 images and chest-check calls on 6 (real model weights, random inputs). Each
setting runs in its own process (malloc settings are process-wide), alternating, `--rounds` times;
per iteration: minor page faults, kernel (sys) and user CPU time of the thread, and wall time.

    python bench/allocator.py [--rounds 4] [--iters 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, threading, time, torch
from cxr_embed.allocator import keep_freed_memory
applied = keep_freed_memory()
from cxr_embed.chest import CHECK_MODEL, check_embeddings
from cxr_embed.models import create_model, inference_model
iters = int(sys.argv[1])
cpu = torch.device("cpu")
main = inference_model(create_model(None, device=cpu), cpu)
check = inference_model(create_model(CHECK_MODEL, device=cpu), cpu)
x = torch.randn(12, 3, 224, 224).contiguous(memory_format=torch.channels_last)
out = []

def work():
    torch.set_num_threads(1)
    with torch.inference_mode():
        def once():
            main(x[:4]); main(x[4:8]); check_embeddings(check, x[:6], size=128)
        for _ in range(3):
            once()
        r0, t = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter()
        for _ in range(iters):
            once()
        r1, wall = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter() - t
        out.append({"faults": (r1.ru_minflt - r0.ru_minflt) / iters, "sys_ms": 1000 * (r1.ru_stime - r0.ru_stime) / iters,
                    "user_ms": 1000 * (r1.ru_utime - r0.ru_utime) / iters, "wall_ms": 1000 * wall / iters})

threads = [threading.Thread(target=work) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(json.dumps({"applied": applied, "threads": out}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    settings = {"glibc defaults": "0", "allocator.py settings": "1"}
    rows = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, value in settings.items():
            res = subprocess.run([sys.executable, "-c", CHILD, str(args.iters)], capture_output=True, text=True,
                                 env={**os.environ, "CXR_EMBED_MALLOC_TUNING": value}, check=True)
            report = json.loads(res.stdout.strip().splitlines()[-1])
            assert report["applied"] == (value == "1"), report
            rows[name] += report["threads"]
    print(f"per iteration and thread (2 threads x {args.rounds} rounds; median, min-max); "
          "an iteration = main model on 2 x 4 images + chest check on 6")
    med = {}
    for name, r in rows.items():
        cols = []
        for key in ("faults", "sys_ms", "user_ms", "wall_ms"):
            v = [t[key] for t in r]
            med[name, key] = statistics.median(v)
            cols.append(f"{key} {statistics.median(v):8.1f} ({min(v):.1f}-{max(v):.1f})")
        print(f"  {name:<22} " + "  ".join(cols))
    print(f"  wall time, tuned / default: {med['allocator.py settings', 'wall_ms'] / med['glibc defaults', 'wall_ms']:.2f}")


if __name__ == "__main__":
    main()
