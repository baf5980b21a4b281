"""The model's forward pass beside Python threads: eager torch against the runtime's TorchScript copy
(`RuntimeSettings.torchscript`), measured in the same run.

An eager forward pass gives Python's GIL up and takes it back around each of its ~200 ops; when another
thread runs Python (decoding, a DICOM listener's network threads), each take-back can wait for that
thread's switch interval (5 ms). The frozen TorchScript copy runs the whole pass in C++. For each, the
wall and CPU time of one image's forward pass on one thread: alone, and beside `--busy` threads
running pure Python. Prints the ratios eager / scripted.

    python bench/gil_forward.py [--busy 1] [--n 20] [--model imagenet-effnet-lite0]
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from cxr_embed.runtime import Runtime, RuntimeSettings


def timed(runtime: Runtime, x: np.ndarray, n: int, busy: int) -> tuple[float, float]:
    """Median wall and mean thread-CPU ms of one forward pass, with `busy` Python threads spinning."""
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            sum(range(2000))

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(busy)]
    for t in threads:
        t.start()
    try:
        runtime.forward(x)
        walls, cpu0 = [], time.thread_time()
        for _ in range(n):
            t0 = time.perf_counter()
            runtime.forward(x)
            walls.append(time.perf_counter() - t0)
        cpu = (time.thread_time() - cpu0) / n
    finally:
        stop.set()
        for t in threads:
            t.join()
    return float(np.median(walls)) * 1e3, cpu * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="imagenet-effnet-lite0")
    ap.add_argument("--n", type=int, default=20, help="forward passes per measurement")
    ap.add_argument("--busy", type=int, default=1, help="Python threads spinning beside the model")
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    results = {}
    for script in (False, True):
        runtime = Runtime(RuntimeSettings(model=args.model, torchscript=script, model_threads=1, cpu_workers=1))
        try:
            for busy in (0, args.busy):
                results[script, busy] = timed(runtime, x, args.n, busy)
        finally:
            runtime.close()
    print("one image, one thread; ms per forward pass: wall (median) / CPU of the model's thread")
    for busy in (0, args.busy):
        (we, ce), (ws, cs) = results[False, busy], results[True, busy]
        print(f"  beside {busy} busy Python thread(s): eager {we:7.1f} / {ce:6.1f}   torchscript {ws:7.1f} / {cs:6.1f}"
              f"   eager/torchscript wall {we / ws:5.2f}x, CPU {ce / cs:5.2f}x")


if __name__ == "__main__":
    main()
