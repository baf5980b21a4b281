"""How well the "is this a frontal CXR?" image check separates CXRs from other images.

Reference: the 500 CXRs of `pretrain.csv` the shipped reference set was built from (seed 0).
Positives: 512 CXRs drawn (seed 1) from the downstream tasks (never in the reference set).
Negatives: every single-frame image of pydicom-data and pydicom's test files that decodes, except
the chest RG1_* (CT, MR, ultrasound, the tibia RG3, secondary captures, a face), and photographs
and drawings of scikit-image. A feature separates when no negative reaches the threshold (the
lowest leave-one-out nearest-neighbour similarity among the references) and few positives fall
below it.

Compared: the shipped check (ImageNet EfficientNet-Lite0 at 128 px, `cxr_embed.chest`), and, to
see whether the check could ride along in the main model's forward pass for free, features of the
shipped SupCon model itself (its embedding, and pooled mean/std of intermediate stages).

    python bench/chest_check.py [--data ../shared/data]
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
from pathlib import Path

import numpy as np
import torch

from cxr_embed.chest import CHECK_SIZE, ReferenceSet, check_embeddings
from cxr_embed.errors import InputError
from cxr_embed.ingest import load_image
from cxr_embed.models import create_model, inference_model
from cxr_embed.preprocess import preprocess

ROOT = Path(__file__).resolve().parents[1]


def negatives() -> dict[str, bytes]:
    import data_store
    from PIL import Image
    from pydicom.data import get_testdata_files
    from skimage import data as sk

    out = {}
    folder = Path(data_store.__file__).parent / "data"
    for f in sorted(os.listdir(folder)):
        if not f.startswith("RG1"):
            out["pydicom-data/" + f] = (folder / f).read_bytes()
    for f in get_testdata_files("*.dcm"):
        if not Path(f).name.startswith("RG1"):
            out["pydicom/" + Path(f).name] = Path(f).read_bytes()
    for name in ["astronaut", "brick", "camera", "cat", "coffee", "coins", "clock", "colorwheel", "grass",
                 "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "rocket", "text",
                 "retina", "microaneurysms", "shepp_logan_phantom", "checkerboard"]:
        try:
            a = getattr(sk, name)()
        except Exception:  # some need an optional download
            continue
        if a.dtype != np.uint8:
            a = (255 * (a - a.min()) / (np.ptp(a) + 1e-9)).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        out["skimage/" + name] = buf.getvalue()
    return out


def tensors(sources, cfg):
    kept, xs = [], []
    for key, src in sources:
        try:
            xs.append(preprocess(load_image(src), cfg))
            kept.append(key)
        except InputError:
            pass  # multi-frame, no pixel data, too small...: never reaches the check
    return torch.from_numpy(np.stack(xs)), kept


@torch.inference_mode()
def supcon_features(model, x: torch.Tensor) -> dict[str, np.ndarray]:
    bb = model.backbone
    out: dict[str, list] = {}
    for i in range(0, len(x), 32):
        h = bb.bn1(bb.conv_stem(x[i : i + 32]))
        for n, block in enumerate(bb.blocks):
            h = block(h)
            if n in (3, 5, 6):
                out.setdefault(f"stage {n} mean+std", []).append(torch.cat([h.mean((2, 3)), h.std((2, 3))], 1))
        out.setdefault("embedding", []).append(bb.forward_head(bb.bn2(bb.conv_head(h))))
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def report(name, ref, pos, neg, neg_keys):
    def unit(e):
        return e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)

    r = unit(ref)
    sims = r @ r.T
    np.fill_diagonal(sims, -np.inf)
    thr = sims.max(axis=1).min()
    sp, sn = (unit(pos) @ r.T).max(axis=1), (unit(neg) @ r.T).max(axis=1)
    worst = neg_keys[int(np.argmax(sn))]
    print(f"| {name} | {thr:.3f} | {int((sp < thr).sum())} of {len(sp)} (min {sp.min():.3f}) | "
          f"{int((sn >= thr).sum())} of {len(sn)} | {sn.max():.3f} ({worst}) |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    args = ap.parse_args()
    data = Path(args.data)
    pool = [r["image"] for r in csv.DictReader(open(data / "pretrain.csv"))]
    ref_paths = [pool[i] for i in sorted(np.random.default_rng(0).choice(len(pool), 500, replace=False))]
    task = sorted({r["image"] for t in glob.glob(str(data / "tasks" / "*.csv")) for r in csv.DictReader(open(t))})
    pos_paths = [task[i] for i in sorted(np.random.default_rng(1).choice(len(task), 512, replace=False))]

    check = inference_model(create_model("imagenet-effnet-lite0"), "cpu")
    supcon = create_model("cxr-supcon-effnet-lite0").eval()
    R, _ = tensors([(p, data / p) for p in ref_paths], check.preprocess)
    P, _ = tensors([(p, data / p) for p in pos_paths], check.preprocess)
    N, neg_keys = tensors(list(negatives().items()), check.preprocess)
    print(f"{len(R)} reference CXRs, {len(P)} task CXRs, {len(N)} non-CXR images that decode\n")
    print("| feature | threshold | task CXRs below it | non-CXRs at or above it | highest non-CXR |")
    print("|---|---|---|---|---|")
    shipped = ReferenceSet.for_model(check)

    def ck(x):
        return np.concatenate([check_embeddings(check, x[i : i + 32], CHECK_SIZE) for i in range(0, len(x), 32)])

    print(f"(shipped reference set: threshold {shipped.threshold:.3f})")
    report(f"shipped check: ImageNet Lite0 at {CHECK_SIZE} px", ck(R), ck(P), ck(N), neg_keys)
    fr, fp, fn = supcon_features(supcon, R), supcon_features(supcon, P), supcon_features(supcon, N)
    for key in fr:
        report(f"shipped SupCon model, {key} (224 px)", fr[key], fp[key], fn[key], neg_keys)


if __name__ == "__main__":
    main()
