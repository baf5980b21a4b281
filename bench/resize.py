"""The letterbox's resize in numpy (`cxr_embed/resize.py`) against torch's antialiased bilinear
`F.interpolate`, which it replaced so that a slim install (no torch) preprocesses the same way.

Both run on one thread, as the decoding threads run them; interleaved, median of `--repeats` after a
warm-up; ratio = numpy time / torch time in the same run (below 1: numpy faster). Cases: the real
chest DICOM RG1_UNCR.dcm (1955x1841) shrunk to the letterbox's 224x211, a 1024x1024 image (the NIH
originals' size; made by upsampling RG1's pixels) to 224x224, an image that is already 224 px (a
no-op for both), and the chest check's 224 -> 128 px copy of a batch of 16 canonical inputs.

    python3 bench/resize.py [--repeats 50]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxr_embed import load_image, preprocess
from cxr_embed.chest import CHECK_SIZE, check_input
from cxr_embed.resize import resize


def torch_resize(a: np.ndarray, height: int, width: int) -> np.ndarray:
    t = torch.from_numpy(a)[(None,) * (4 - a.ndim)]
    return F.interpolate(t, size=(height, width), mode="bilinear", antialias=True, align_corners=False).numpy()


def timed(cases: dict, repeats: int) -> dict[str, dict[str, float]]:
    """Median milliseconds of each (numpy, torch) pair, interleaved call by call."""
    times = {name: {"numpy": [], "torch": []} for name in cases}
    for name, (ours, theirs) in cases.items():
        ours(), theirs()  # warm-up (weights cached, kernels loaded)
    for _ in range(repeats):
        for name, (ours, theirs) in cases.items():
            for which, fn in (("numpy", ours), ("torch", theirs)):
                t = time.perf_counter()
                fn()
                times[name][which].append(1000 * (time.perf_counter() - t))
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def main() -> None:
    import data_store

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rg1 = load_image(Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm").pixels
    big = resize(rg1, 1024, 1024)
    small = resize(rg1, 224, 224)
    batch = np.stack([preprocess(rg1)] * 16)
    cases = {
        "RG1 1955x1841 -> 224x211": (lambda: resize(rg1, 224, 211), lambda: torch_resize(rg1, 224, 211)),
        "1024x1024 -> 224x224": (lambda: resize(big, 224, 224), lambda: torch_resize(big, 224, 224)),
        "224x224 -> 224x224 (no-op)": (lambda: resize(small, 224, 224), lambda: torch_resize(small, 224, 224)),
        "check: 16 x 3 x 224 -> 128": (lambda: check_input(batch, CHECK_SIZE), lambda: torch_resize(batch, 128, 128)),
    }
    diff = float(np.abs(resize(rg1, 224, 211) - torch_resize(rg1, 224, 211)).max())
    print(f"torch {torch.__version__}, 1 thread, median of {args.repeats}; RG1 max abs diff {diff:.1e}\n")
    print("| case | numpy ms | torch ms | numpy / torch |\n|---|---|---|---|")
    for name, t in timed(cases, args.repeats).items():
        print(f"| {name} | {t['numpy']:.2f} | {t['torch']:.2f} | {t['numpy'] / t['torch']:.2f} |")


if __name__ == "__main__":
    main()
