"""Antialiased bilinear resizing in numpy: torch's algorithm, without torch.

The canonical preprocessing (`preprocess.py`) and the chest check's 128 px copy both resize with
this one function. It computes what `torch.nn.functional.interpolate(x, size, mode="bilinear",
antialias=True, align_corners=False)` computes (PIL's triangle filter, widened by the scale when
shrinking, weights normalised per output pixel), in float32, as two sparse products: tests check it
against torch within 1e-6 on real radiographs (tests/test_resize.py). Rows are resized before
columns (torch does columns first): the same sums in another order, so the results differ only in
float rounding, and a large image shrinks about as fast as torch's own kernel (BENCHMARKS.md).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.sparse as sparse


@lru_cache(maxsize=64)  # a few hundred kB at most each: images come in a handful of sizes
def resize_weights(n_in: int, n_out: int) -> sparse.csr_matrix:
    """The (n_out, n_in) matrix of one axis: row i holds output pixel i's weights over the input."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"cannot resize an axis of {n_in} pixels to {n_out}")
    one, half = np.float32(1.0), np.float32(0.5)
    scale = np.float32(n_in / n_out)
    support = scale if scale >= one else one  # shrinking widens the triangle: that is the antialiasing
    invscale = one / scale if scale >= one else one
    center = scale * (np.arange(n_out, dtype=np.float32) + half)
    lo = np.maximum((center - support + half).astype(np.int64), 0)  # truncation, as torch's int64 cast
    hi = np.minimum((center + support + half).astype(np.int64), n_in)
    idx = lo[:, None] + np.arange(int((hi - lo).max()))[None, :]
    w = np.maximum(0.0, one - np.abs(((idx - center[:, None]).astype(np.float32) + half) * invscale)).astype(np.float32)
    w[idx >= hi[:, None]] = 0.0
    w /= w.sum(axis=1, keepdims=True)
    rows = np.repeat(np.arange(n_out), idx.shape[1])
    m = sparse.csr_matrix((w.ravel(), (rows, np.minimum(idx, n_in - 1).ravel())), shape=(n_out, n_in), dtype=np.float32)
    m.eliminate_zeros()
    return m


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """A 2-D float image resized to (height, width), antialiased bilinear; float32, C-contiguous."""
    out = np.asarray(image, dtype=np.float32)
    if out.ndim != 2:
        raise ValueError(f"resize expects a 2-D image, got shape {out.shape}")
    h, w = out.shape
    if height != h:
        out = resize_weights(h, height) @ np.ascontiguousarray(out)
    if width != w:
        out = (resize_weights(w, width) @ np.ascontiguousarray(out.T)).T
    return np.ascontiguousarray(out, dtype=np.float32)
