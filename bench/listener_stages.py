"""Where an instance's time goes in `cxr-embed listen`, and why 4 associations cannot use both cores.

DCMTK's `storescu` (like a modality or most PACS) sends one C-STORE and waits for its answer before the
next, so with A associations at most A instances are in the listener at a time, and by Little's law the
rate is A / (the time from one answer to the next on an association). This runs the listener in this
process, feeds it with A `storescu` processes (every instance RG1_UNCR.dcm, 7 MB), and times each
instance's stages on its association's thread:

- `network`: from the previous answer on that association to the handler's start (the sender reads
  the file and sends it; pynetdicom receives its PDUs; the answer goes back);
- `header`: the header read and checks, up to the decode;
- `prepare`: decode and preprocess (in the runtime's decoding pool, competing for the cores);
- `model wait`: queued for the batcher and the forward pass of its batch;
- `commit wait`: the group commit (journal append and fsync) that makes it durable;
- the rest (chest check, scores, status).

It prints each stage's mean and median, the sum, A / sum against the measured rate, the machine's busy
fraction and the batches the model ran (their sizes, ms per image). Measurement only: the stages are
timed by wrapping the listener's engine and committer calls in this process.

    python bench/listener_stages.py [--n 96] [--associations 4] [--model imagenet-effnet-lite0]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from listener_throughput import busy_since, dcmtk_storescu, machine_cpu, sender_commands, source_file  # noqa: E402

WARM = 4  # instances sent before the measurement (model warm-up), not timed


class Timed:
    """A future whose `result` marks the thread's timeline before and after the wait."""

    def __init__(self, future, mark, before: str, after: str):
        self.future, self.mark, self.before, self.after = future, mark, before, after

    def result(self, timeout=None):
        self.mark(self.before)
        try:
            return self.future.result(timeout)
        finally:
            self.mark(self.after)


def instrument(listener, marks: dict, batches: list) -> None:
    from pynetdicom import evt

    def mark(name: str) -> None:
        marks[threading.get_ident()].append((name, time.perf_counter()))

    engine, committer = listener.engine, listener.committer
    prepare, submit, commit, on_store, forward = (engine.prepare, engine.submit, committer.submit, listener._on_store,
                                                  engine.runtime.forward)

    def timed_prepare(data):
        mark("prepare0")
        try:
            return prepare(data)
        finally:
            mark("prepare1")

    def timed_store(event):
        mark("store0")
        try:
            return on_store(event)
        finally:
            mark("store1")

    def timed_forward(x, wants, **kw):
        t = time.perf_counter()
        out = forward(x, wants, **kw)
        batches.append((len(x), time.perf_counter() - t))
        return out

    engine.prepare = timed_prepare
    engine.submit = lambda p: Timed(submit(p), mark, "model0", "model1")
    committer.submit = lambda r: Timed(commit(r), mark, "commit0", "commit1")
    engine.runtime.forward = timed_forward
    listener._server.unbind(evt.EVT_C_STORE, on_store)
    listener._server.bind(evt.EVT_C_STORE, timed_store)


def stages(marks: dict) -> dict[str, list[float]]:
    out = collections.defaultdict(list)
    spans = {"header": ("store0", "prepare0"), "prepare": ("prepare0", "prepare1"), "model wait": ("model0", "model1"),
             "commit wait": ("commit0", "commit1")}
    for events in marks.values():
        last_end, current = None, {}
        for name, t in events:
            if name == "store0":
                if last_end is not None:
                    out["network"].append(t - last_end)
                current = {}
            current[name] = t
            if name != "store1":
                continue
            last_end = t
            if not all(k in current for k in ("store0", "prepare0", "prepare1", "model0", "model1", "commit0", "commit1")):
                continue  # refused before the model: not in this benchmark's images
            for stage, (a, b) in spans.items():
                out[stage].append(current[b] - current[a])
            out["rest"].append((t - current["store0"]) - sum(current[b] - current[a] for a, b in spans.values()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=96, help="instances (default %(default)s)")
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--model", default="imagenet-effnet-lite0")
    args = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cxr_embed.process import configure_process
    from service.listener import Listener, ListenerSettings, listener_service_settings

    configure_process(blas_threads=1)  # as `cxr-embed listen`
    storescu = dcmtk_storescu()
    with tempfile.TemporaryDirectory() as tmp:
        settings = ListenerSettings(out=Path(tmp) / "S.h5", service=listener_service_settings(model=args.model), port=0)
        with Listener(settings) as listener:
            warm = [storescu, "-aec", "CXREMBED", "-R", "+II", "--repeat", str(WARM), "127.0.0.1", str(listener.port),
                    str(source_file())]
            subprocess.run(warm, check=True, capture_output=True)
            marks, batches = collections.defaultdict(list), []
            instrument(listener, marks, batches)
            cmds = sender_commands("dcmtk", listener.port, args.n, args.associations, Path(os.devnull))
            machine0, t0 = machine_cpu(), time.perf_counter()
            procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for c in cmds]
            if any(p.wait() for p in procs):
                raise SystemExit("a storescu failed")
            elapsed, busy = time.perf_counter() - t0, busy_since(machine0)
            stored = listener.statuses.get(0, 0)
            listener_workers = listener.engine.model_workers
    spans = stages(marks)
    print(f"{args.n} instances over {args.associations} associations: {args.n / elapsed:.1f} instances/s, "
          f"machine {busy:.0%} busy, {stored - WARM} stored")
    total = 0.0
    for name in ("network", "header", "prepare", "model wait", "commit wait", "rest"):
        v = np.array(spans[name]) * 1000
        total += v.mean()
        print(f"  {name:12s} mean {v.mean():6.1f} ms   median {np.median(v):6.1f} ms   (n={len(v)})")
    print(f"  one instance, answer to answer: {total:.1f} ms; {args.associations} in flight / that = "
          f"{args.associations / total * 1000:.1f} instances/s (Little's law) against {args.n / elapsed:.1f} measured")
    sizes = collections.Counter(b for b, _ in batches)
    images, seconds = sum(b for b, _ in batches), sum(s for _, s in batches)
    print(f"  model: {len(batches)} batches, sizes {dict(sorted(sizes.items()))}, {seconds / images * 1000:.1f} ms "
          f"per image, busy {seconds / elapsed:.0%} of the time (summed over its {listener_workers} worker(s))")


if __name__ == "__main__":
    main()
