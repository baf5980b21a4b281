"""Embedding throughput of the `cxr-embed embed` pipeline against a bare forward pass of its model.

Both in the same run on the same 1,000 images of ../shared/data/pretrain.csv: the bare rate is the
model alone on already-decoded tensors; the pipeline rate is decode + preprocess + forward + HDF5
store with its durable commits. Target: pipeline >= 0.8 x bare on 2 cores.

    python bench/embed_throughput.py [--n 1000] [--model cxr-supcon-effnet-lite0]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cxr_embed import Embedder, configure_process, load_image, preprocess
from cxr_embed.batch import InputItem, embed_to_store
from cxr_embed.models import create_model

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--model", default=None)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    configure_process()  # as `cxr-embed embed` and `serve` do (cxr_embed/process.py)
    data = Path(args.data)
    rows = list(csv.DictReader(open(data / "pretrain.csv")))
    pick = np.random.default_rng(0).choice(len(rows), args.n, replace=False)
    items = [InputItem(rows[i]["image"], data / rows[i]["image"]) for i in pick]
    emb = Embedder(args.model, batch_size=args.batch_size)
    print(f"model {emb.model.name}, {args.n} images, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

    # warm-up both paths so that one-off costs stay out of the numbers
    emb.embed([it.path for it in items[:args.batch_size]])

    t = time.perf_counter()
    tensors = [preprocess(load_image(it.path), emb.model.preprocess) for it in items]
    decode_s = time.perf_counter() - t
    def bare_pass() -> float:
        t = time.perf_counter()
        for i in range(0, len(tensors), args.batch_size):
            emb.forward(np.stack(tensors[i : i + args.batch_size]))
        return time.perf_counter() - t

    bare_first = bare_pass()

    # the model as timm builds it (BatchNorm not folded) on whole batches: what folding and CPU chunks buy
    plain = create_model(emb.model.name, device=emb.device)
    if emb.device.type == "cpu":
        plain = plain.to(memory_format=torch.channels_last)
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(tensors), args.batch_size):
            x = torch.from_numpy(np.stack(tensors[i : i + args.batch_size])).to(emb.device)
            plain(x.contiguous(memory_format=torch.channels_last) if emb.device.type == "cpu" else x)
    plain_s = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        summary = embed_to_store(items, Path(tmp) / "bench.h5", emb, progress=False)
        pipe_s = time.perf_counter() - t
    assert summary.embedded == args.n, summary.text()
    bare_s = (bare_first + bare_pass()) / 2  # before and after the pipeline: drift of a shared machine evens out

    bare, pipe = args.n / bare_s, args.n / pipe_s
    print(f"decode+preprocess alone: {args.n / decode_s:7.1f} img/s ({1000 * decode_s / args.n:.1f} ms/img, one thread)")
    print(f"plain timm forward:      {args.n / plain_s:7.1f} img/s (BatchNorm unfolded, whole batches)")
    print(f"bare forward:            {bare:7.1f} img/s (the Embedder's model: BatchNorm folded, CPU chunks; "
          f"{plain_s / bare_s:.2f}x plain)")
    print(f"cxr-embed embed:         {pipe:7.1f} img/s")
    print(f"ratio pipeline / bare:   {pipe / bare:7.2f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
