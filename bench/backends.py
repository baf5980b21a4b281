"""The `cxr-embed embed` pipeline and the bare forward pass on each backend: torch, OpenVINO f32, OpenVINO bf16.

The same images of ../shared/data/pretrain.csv (seeded draw) for every backend, in rounds; within a
round the backends run one after the other, in an order that rotates from round to round, so drift of
a shared machine falls on all of them. Prints the median of the rounds and each backend's ratio to
torch measured in the same run; for OpenVINO, the max abs difference and min cosine of its embeddings
against torch's. `--chunks` first times OpenVINO's bare forward pass on 96 of the images at several images per call.

    python3 bench/backends.py [--n 300] [--rounds 3] [--chunks 4,8,16,32] [--model cxr-supcon-effnet-lite0]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout's cxr_embed, whichever one is installed

from cxr_embed import Embedder, configure_process  # noqa: E402
from cxr_embed.batch import InputItem, embed_to_store  # noqa: E402
from cxr_embed.store import Store  # noqa: E402
BACKENDS = {"torch": ("torch", "f32"), "openvino-f32": ("openvino", "f32"), "openvino-bf16": ("openvino", "bf16")}


def bare(emb: Embedder, tensors: list[np.ndarray], batch: int) -> tuple[float, np.ndarray]:
    """Seconds and embeddings of the runtime's forward pass over already-decoded tensors."""
    t, out = time.perf_counter(), []
    for i in range(0, len(tensors), batch):
        out.append(emb.forward(np.stack(tensors[i : i + batch])))
    return time.perf_counter() - t, np.concatenate(out)


def pipeline(emb: Embedder, items: list[InputItem], folder: Path, name: str) -> tuple[float, np.ndarray]:
    """Seconds of `cxr-embed embed`'s job (decode, preprocess, forward, HDF5 store) into a new store."""
    out = folder / f"{name}.{time.monotonic_ns()}.h5"
    t = time.perf_counter()
    summary = embed_to_store(items, out, emb, progress=False)
    seconds = time.perf_counter() - t
    assert summary.embedded == len(items), summary.text()
    store = Store(out)
    return seconds, store.get([it.image_id for it in items])


def decode_alone(emb: Embedder, items: list[InputItem]) -> float:
    """Seconds to decode and preprocess every item in one thread; run in a decoding thread (torch on
    one thread there, as in the pipeline: the main thread's team would wait for a busy second core)."""
    t = time.perf_counter()
    for it in items:
        emb.prepare(it.path)
    return time.perf_counter() - t


def time_chunks(embs: dict[str, Embedder], tensors, chunks: list[int], rounds: int, batch: int) -> None:
    print(f"OpenVINO bare forward, images/s by images per call (median of {rounds}, interleaved):")
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(rounds):
        for name in [n for n in embs if n != "torch"]:
            for c in chunks[r % len(chunks):] + chunks[: r % len(chunks)]:
                embs[name].runtime.chunk = c
                rates.setdefault((name, c), []).append(len(tensors) / bare(embs[name], tensors, batch)[0])
    for name in [n for n in embs if n != "torch"]:
        row = ", ".join(f"{c}: {statistics.median(rates[(name, c)]):.1f}" for c in chunks)
        print(f"  {name:14s} {row}")
        embs[name].runtime.chunk = embs[name].runtime.settings.cpu_chunk or _default_chunk(embs[name])


def _default_chunk(emb: Embedder) -> int:
    from cxr_embed.runtime import OPENVINO_CHUNK

    return OPENVINO_CHUNK[emb.runtime.settings.precision]


def report(times: dict[str, dict[str, list[float]]], n: int, decode_s: list[float]) -> None:
    print(f"\nimages/s, median of {len(decode_s)} rounds (ratio to torch in the same run; "
          "median of the per-round ratios in brackets):")
    print(f"  decode + preprocess alone, one decoding thread: {n / statistics.median(decode_s):7.1f}")
    for what in ("bare", "pipeline"):
        base = times["torch"][what]
        for name, t in times.items():
            rate = n / statistics.median(t[what])
            per_round = statistics.median([b / s for b, s in zip(base, t[what])])
            print(f"  {what:8s} {name:14s} {rate:7.1f}  {statistics.median(base) / statistics.median(t[what]):5.2f}x"
                  f"  [{per_round:.2f}x]")


def compare(outputs: dict[str, np.ndarray]) -> None:
    ref = outputs["torch"]
    for name, e in outputs.items():
        if name == "torch":
            continue
        cos = (e * ref).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(ref, axis=1)
        print(f"  {name:14s} vs torch: max abs diff {np.abs(e - ref).max():.2e} (largest |value| "
              f"{np.abs(ref).max():.2f}), min cosine {cos.min():.6f}, mean cosine {cos.mean():.6f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--chunks", default="", help="comma-separated images per call to time OpenVINO at first")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    args = ap.parse_args()
    configure_process()  # as `cxr-embed embed` does (cxr_embed/process.py)
    data = Path(args.data)
    rows = list(csv.DictReader(open(data / "pretrain.csv")))
    items = [InputItem(rows[i]["image"], data / rows[i]["image"])
             for i in np.random.default_rng(0).choice(len(rows), args.n, replace=False)]
    embs = {name: Embedder(args.model, batch_size=args.batch_size, device="cpu", backend=BACKENDS[name][0],
                           precision=BACKENDS[name][1]) for name in args.backends.split(",")}
    first = next(iter(embs.values()))
    print(f"model {first.model.name}, {args.n} images, batch {args.batch_size}, threads {first.runtime.threads}; "
          + "; ".join(f"{n}: {e.runtime.describe()}" for n, e in embs.items()))
    tensors = [first.prepare(it.path)[0] for it in items]
    for e in embs.values():  # warm-up: first calls (thread teams, OpenVINO's shape-specific kernels) stay out
        bare(e, tensors[: 2 * args.batch_size], args.batch_size)
    if args.chunks:
        time_chunks(embs, tensors[:96], [int(c) for c in args.chunks.split(",")], args.rounds, args.batch_size)
    times = {name: {"bare": [], "pipeline": []} for name in embs}
    outputs, decode_s, names = {}, [], list(embs)
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            decode_s.append(first.runtime.decode_pool.submit(decode_alone, first, items).result())
            for name in names[r % len(names):] + names[: r % len(names)]:
                seconds, outputs[name] = bare(embs[name], tensors, args.batch_size)
                times[name]["bare"].append(seconds)
                seconds, stored = pipeline(embs[name], items, Path(tmp), name)
                times[name]["pipeline"].append(seconds)
                assert np.allclose(stored, outputs[name], atol=1e-4), f"{name}: the store differs from the bare pass"
            print(f"round {r + 1}: " + ", ".join(f"{n} bare {args.n / times[n]['bare'][-1]:.1f} pipeline "
                                                f"{args.n / times[n]['pipeline'][-1]:.1f}" for n in names), flush=True)
    report(times, args.n, decode_s)
    if "torch" in outputs:
        compare(outputs)


if __name__ == "__main__":
    main()
