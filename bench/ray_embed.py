"""The `cxr-embed embed` job in one process, and on a local Ray instance with 1 and 2 model actors.

The same images of ../shared/data/pretrain.csv (seeded draw) for every configuration. Each runs the
whole job twice, into new stores: on `--warm` images (what does not depend on n: loading the model,
starting Ray and its actors, merging the shards) and on all `--n`. Printed per configuration: images/s
of the whole n-image job, that fixed cost, and the marginal rate (n - warm) / (t_n - t_warm); the
ratios are against the single process measured in the same run. Each Ray store is checked against the
single-process one (same ids, embeddings within 1e-5).

    python3 bench/ray_embed.py [--n 400] [--warm 8] [--actors 1,2] [--runtime torch|openvino]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # measure this checkout's cxr_embed, whichever one is installed

from cxr_embed import Embedder, configure_process  # noqa: E402
from cxr_embed.batch import InputItem, embed_to_store  # noqa: E402
from cxr_embed.distributed import RayPlan, embed_on_ray  # noqa: E402
from cxr_embed.runtime import RuntimeSettings  # noqa: E402
from cxr_embed.store import Store  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def draw(n: int, seed: int) -> list[InputItem]:
    rows = list(csv.DictReader(open(SHARED / "pretrain.csv", encoding="utf-8")))
    pick = np.random.default_rng(seed).choice(len(rows), size=n, replace=False)
    return [InputItem(rows[i]["image"], SHARED / rows[i]["image"]) for i in sorted(pick)]


def single(items: list[InputItem], out: Path, settings: RuntimeSettings) -> float:
    """Seconds of the whole single-process job, model loading included (as `cxr-embed embed`)."""
    t = time.perf_counter()
    embedder = Embedder(settings=settings, batch_size=32)
    summary = embed_to_store(items, out, embedder, progress=False)
    embedder.close()
    assert summary.embedded == len(items), summary.text()
    return time.perf_counter() - t


def on_ray(items: list[InputItem], out: Path, settings: RuntimeSettings, actors: int) -> float:
    """Seconds of the whole job on a local Ray instance started for it (`--ray local --ray-actors N`)."""
    t = time.perf_counter()
    summary = embed_on_ray(items, out, settings, RayPlan("local", actors=actors), batch_size=32, progress=False)
    assert summary.embedded == len(items), summary.text()
    return time.perf_counter() - t


def measure(name: str, run, items: list[InputItem], warm: int, folder: Path) -> dict:
    t_warm = run(items[:warm], folder / f"{name}.warm.h5")
    t_n = run(items, folder / f"{name}.h5")
    return {"name": name, "n_rate": len(items) / t_n, "fixed_s": t_warm,
            "marginal": (len(items) - warm) / max(t_n - t_warm, 1e-9), "store": folder / f"{name}.h5"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--warm", type=int, default=8)
    ap.add_argument("--actors", default="1,2", help="comma-separated actor counts")
    ap.add_argument("--runtime", default="torch", choices=["torch", "openvino"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    configure_process()
    settings = RuntimeSettings(backend=args.runtime)
    items = draw(args.n, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        rows = [measure("single process", lambda it, out: single(it, out, settings), items, args.warm, folder)]
        for k in (int(a) for a in args.actors.split(",")):
            rows.append(measure(f"Ray local, {k} actor(s)", lambda it, out, k=k: on_ray(it, out, settings, k),
                                items, args.warm, folder))
        base, ref = rows[0], Store(rows[0]["store"])
        print(f"{args.n} images of pretrain.csv (seed {args.seed}), runtime {args.runtime}, warm-up job {args.warm} images")
        print("| | whole job, images/s | fixed cost, s | marginal images/s | max abs diff vs single |")
        print("|---|---|---|---|---|")
        for r in rows:
            store = Store(r["store"])
            assert sorted(store.ids) == sorted(ref.ids)
            diff = float(np.abs(store.get(ref.ids) - ref.get(ref.ids)).max())
            assert diff <= 1e-5, diff
            print(f"| {r['name']} | {r['n_rate']:.1f} ({r['n_rate'] / base['n_rate']:.2f}x) | {r['fixed_s']:.1f} | "
                  f"{r['marginal']:.1f} ({r['marginal'] / base['marginal']:.2f}x) | {diff:.1e} |")


if __name__ == "__main__":
    main()
