"""Decode + canonical preprocessing time of RG1_UNCR.dcm (1955x1841, 15 bits stored, MONOCHROME1).

Target: under 50 ms. Reports the median of repeated runs from bytes in memory, and from the file,
against pydicom's bare `pixel_array` decode of the same bytes measured in the same run.

    python bench/dicom_decode.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import pydicom

from cxr_embed import load_image, preprocess


def timed(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return out


def main() -> None:
    import data_store

    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    data = path.read_bytes()
    rows = [
        ("pydicom dcmread + pixel_array (bare)", timed(lambda: pydicom.dcmread(io.BytesIO(data)).pixel_array, args.repeats)),
        ("load_image + preprocess, from bytes", timed(lambda: preprocess(load_image(data)), args.repeats)),
        ("load_image + preprocess, from file", timed(lambda: preprocess(load_image(path)), args.repeats)),
    ]
    for name, ms in rows:
        print(f"{name:<40} median {statistics.median(ms):6.1f} ms   p90 {sorted(ms)[int(0.9 * len(ms))]:6.1f} ms")
    med = statistics.median(rows[1][1])
    print(f"target: < 50 ms -> {'met' if med < 50 else 'NOT met'} ({med:.1f} ms); "
          f"ratio to bare pydicom decode {med / statistics.median(rows[0][1]):.2f}")


if __name__ == "__main__":
    main()
