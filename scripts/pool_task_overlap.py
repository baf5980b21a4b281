"""Task images (any split) that are also in the pretraining pool, as copies, crops, rescaled or rotated copies.

The rule: no task image enters pretraining. The pool's own filter (a difference hash of the full
frame and six centre crops; ../shared/data/README.md) misses copies that are cropped off-centre,
rotated or rescaled. This finds them in two steps:
1. candidates: for each task image, its `--neighbours` nearest pool images by the cosine of their
   embeddings (one model for both stores, e.g. imagenet-effnet-lite0; `cxr-embed embed` makes them),
   and every pool image with the same file name (collections that share films keep their names);
2. verification on the pixels: both images decoded by the runtime's own ingestion, grey, KP_SIDE px
   wide; ORB keypoints (scikit-image) matched both ways, and a similarity transform (shift, rotation,
   scale) fitted to the matches by RANSAC: the pair's score is its number of inliers. The same film
   gives tens to hundreds (29-183 on the Cohen films the pool holds as Hannover images); different
   films mostly 0-4 (89% of the 22,130 pairs checked on the shared data), different films of
   similar-looking patients up to about 19.

A pair is a copy at `--min-inliers` (default 20) or more: on the shared data, pairs from 20 up looked
the same film (8 of 8 checked by eye), pairs at 15 mostly did not (4 of 5). Writes `--out` (CSV: task, split,
task_image, pool_image, pool_source, cosine, inliers, copy) and prints the copies per task and split;
`--exclude-out` lists the pool images that are copies, one per line.

    python scripts/pool_task_overlap.py --pool-store pool.imagenet.h5 --task-store tb.imagenet.h5 ... \
        --tasks ../shared/data/tasks --image-root ../shared/data --out overlap.csv --exclude-out exclude.txt
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cxr_embed.errors import CxrEmbedError, InputError  # noqa: E402
from cxr_embed.ingest import load_image  # noqa: E402
from cxr_embed.resize import resize  # noqa: E402
from cxr_embed.store import Store  # noqa: E402

KP_SIDE = 256  # px of the image's width when its keypoints are found
N_KEYPOINTS = 300


def grey(path: Path, width: int) -> np.ndarray:
    """The image's grey levels (the runtime's decoding) at `width` px wide."""
    pixels = load_image(path).pixels
    h, w = pixels.shape
    return resize(pixels, max(8, int(round(h * width / w))), width).astype(np.float64)


def keypoints(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """ORB keypoints (x, y) and binary descriptors of an image; None when it has too few."""
    from skimage.feature import ORB

    orb = ORB(n_keypoints=N_KEYPOINTS, fast_threshold=0.05)
    try:
        orb.detect_and_extract(grey(path, KP_SIDE))
    except RuntimeError:  # no keypoint found (a blank image)
        return None
    if len(orb.keypoints) < 4:  # too few to fit a transform: no evidence either way
        return None
    return orb.keypoints[:, ::-1].copy(), orb.descriptors


def inliers(a, b) -> int:
    """Matches (both ways, ratio test) between two keypoint sets that one similarity transform explains."""
    from skimage.feature import match_descriptors
    from skimage.measure import ransac
    from skimage.transform import SimilarityTransform

    if a is None or b is None:
        return 0
    matches = match_descriptors(a[1], b[1], cross_check=True, max_ratio=0.8)
    if len(matches) < 4:
        return 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no inliers found" is an answer here: 0
        _, inl = ransac((a[0][matches[:, 0]], b[0][matches[:, 1]]), SimilarityTransform, min_samples=3,
                        residual_threshold=3, max_trials=200, rng=0)
    return int(inl.sum()) if inl is not None else 0


_KPS: dict = {}  # image -> keypoints, set before the matching workers fork (they inherit it)


def _inliers_of(pair: tuple[str, str]) -> int:
    return inliers(_KPS[pair[0]], _KPS[pair[1]])


def _keypoints_of(args):
    root, image = args
    try:
        return image, keypoints(root / image)
    except InputError:
        return image, None


def candidates(pool: Store, task: Store, neighbours: int) -> list[tuple[str, str, float]]:
    """(task image, pool image, cosine) for each task image's `neighbours` nearest pool images."""
    if pool.identity.model_name != task.identity.model_name or pool.identity.weights_hash != task.identity.weights_hash:
        raise CxrEmbedError(f"{pool.path} and {task.path} hold embeddings of different models; embed both with one")
    P = pool.embeddings().astype(np.float32)
    P /= np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
    T = task.embeddings().astype(np.float32)
    T /= np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)
    out = []
    for start in range(0, len(T), 256):
        sims = T[start : start + 256] @ P.T
        top = np.argsort(-sims, axis=1)[:, :neighbours]
        for r, row in enumerate(top):
            for j in row:
                out.append((task.ids[start + r], pool.ids[j], float(sims[r, j])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool-store", required=True, help="embeddings of the pool's images (pretrain.csv)")
    ap.add_argument("--task-store", action="append", required=True, help="embeddings of a task's images (repeatable)")
    ap.add_argument("--tasks", required=True, type=Path, help="folder of the task CSVs (split and task of each image)")
    ap.add_argument("--pool-labels", type=Path, help="pretrain.csv (default: beside --tasks)")
    ap.add_argument("--image-root", required=True, type=Path, help="folder the image ids are relative to")
    ap.add_argument("--neighbours", type=int, default=10, help="nearest pool images checked per task image (default 10)")
    ap.add_argument("--min-inliers", type=int, default=20, help="inliers from which a pair is a copy (default 20)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes finding keypoints")
    ap.add_argument("--out", required=True, type=Path, help="CSV of every checked pair")
    ap.add_argument("--exclude-out", type=Path, help="the pool images that are copies, one per line")
    args = ap.parse_args(argv)
    if args.neighbours < 1 or args.min_inliers < 4 or args.workers < 1:
        ap.error("--neighbours and --workers must be at least 1, --min-inliers at least 4")
    try:
        where = {}
        for f in sorted(args.tasks.glob("*.csv")):
            with open(f, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                if not {"image", "split"} <= set(reader.fieldnames or ()):
                    continue
                for row in reader:  # an image in two tasks (nih_findings, nih_pneumonia): the binary task's name
                    key = row["image"].strip()
                    if key not in where or "label" in (reader.fieldnames or ()):
                        where[key] = (f.stem, row["split"].strip().lower())
        pool_csv = args.pool_labels or args.tasks.parent / "pretrain.csv"
        with open(pool_csv, newline="", encoding="utf-8-sig") as fh:
            source = {r["image"].strip(): r.get("source", "") for r in csv.DictReader(fh)}
        by_name: dict[str, list[str]] = {}
        for image in source:
            by_name.setdefault(Path(image).name, []).append(image)
        pool = Store(args.pool_store)
        pairs: dict[tuple[str, str], float] = {}
        for path in args.task_store:
            for t, p, cos in candidates(pool, Store(path), args.neighbours):
                pairs[(t, p)] = cos
            for t in Store(path).ids:  # the same file name in another collection
                for p in by_name.get(Path(t).name, []):
                    pairs.setdefault((t, p), float("nan"))
    except (CxrEmbedError, OSError, KeyError) as exc:
        print(f"pool_task_overlap: error: {exc}", file=sys.stderr)
        return 2
    images = sorted({i for pair in pairs for i in pair})
    print(f"{len(pairs)} candidate pairs, {len(images)} images to find keypoints in", file=sys.stderr, flush=True)
    kps = {}
    with ProcessPoolExecutor(args.workers) as ex:
        for n, (image, kp) in enumerate(ex.map(_keypoints_of, [(args.image_root, i) for i in images], chunksize=16)):
            kps[image] = kp
            if n % 1000 == 0:
                print(f"keypoints: {n} of {len(images)}", file=sys.stderr, flush=True)
    _KPS.update(kps)
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("fork")) as ex:
        counts = list(ex.map(_inliers_of, list(pairs), chunksize=64))
    rows = []
    for ((t, p), cos), k in zip(pairs.items(), counts):
        task, split = where.get(t, ("?", "?"))
        rows.append({"task": task, "split": split, "task_image": t, "pool_image": p, "pool_source": source.get(p, ""),
                     "cosine": "" if np.isnan(cos) else round(cos, 4), "inliers": k, "copy": int(k >= args.min_inliers)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["task", "split", "task_image", "pool_image", "pool_source", "cosine",
                                           "inliers", "copy"])
        w.writeheader()
        w.writerows(rows)
    k = np.array([x["inliers"] for x in rows])
    print(f"{len(rows)} pairs checked; inliers: {np.mean(k == 0):.0%} none, "
          + ", ".join(f"{np.mean((k >= a) & (k < b)):.1%} {a}-{b - 1}" for a, b in ((1, 5), (5, 15), (15, 10**9))))
    copies = [x for x in rows if x["copy"]]
    by: dict[tuple[str, str], set] = {}
    for x in copies:
        by.setdefault((x["task"], x["split"]), set()).add(x["task_image"])
    for (task, split), found in sorted(by.items()):
        print(f"{task} {split}: {len(found)} task image(s) with a copy in the pool")
    pool_ids = sorted({x["pool_image"] for x in copies})
    print(f"{len(pool_ids)} pool image(s) are copies of task images ({args.min_inliers} or more inliers)")
    if args.exclude_out:
        args.exclude_out.write_text("".join(p + "\n" for p in pool_ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
