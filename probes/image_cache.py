"""A task's images decoded and preprocessed once, through the runtime's own ingestion and canonical
preprocessing, kept as float16 grey levels in an HDF5 file for the runs that train on pixels
(`cxr-embed finetune`): decoding would otherwise cost more than a forward pass, every fit.

What is stored is the canonical tensor's grey plane, x * std + mean in [0, 1] (the three channels are
equal), as float16: within 2.5e-4 of the float32 canonical input (half a float16 step below 1), which
`canonical()` restores. The file records the preprocessing identity and a hash of every image's
bytes; a cache made from other files or another preprocessing is rebuilt, never reused, and one
whose contents do not check out (shapes, type, counts, every value finite and in [0, 1]) is rebuilt
too. A file at the path that is not such a cache is refused, never overwritten. Planes are written as
they are decoded and read on demand, so memory holds only the images in use (a draw and the test
split), not the task.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm import tqdm

from cxr_embed.errors import CxrEmbedError, InputError
from cxr_embed.ingest import read_bytes
from cxr_embed.models import EmbeddingModel
from cxr_embed.runtime import Runtime, RuntimeSettings
from cxr_embed.store import atomic_replace

FORMAT = "cxr-embed-tensor-cache/1"
_SCAN = 512  # planes checked per read when a cache is opened


class CacheFileError(CxrEmbedError, ValueError):
    """A file at the cache's path that is not a cxr-embed image cache: refused, not overwritten."""


@dataclass
class TensorCache:
    """The grey planes of the images that decoded, by id; `failed` names the others and why."""

    path: Path
    ids: list[str]
    preprocess: str  # the PreprocessConfig identity the planes were made with
    failed: dict[str, str] = field(default_factory=dict)
    data_hash: str = ""  # data_hash() of the files it was made from

    def __post_init__(self):
        self._row = {image: n for n, image in enumerate(self.ids)}

    def __contains__(self, image: str) -> bool:
        return image in self._row

    def planes(self, images: list[str]) -> torch.Tensor:
        """(N, S, S) float16 grey planes in [0, 1] of `images`, in that order."""
        # h5py reads increasing, unique rows: read those, then map back to the requested order
        uniq, inverse = np.unique(np.array([self._row[i] for i in images], dtype=np.int64), return_inverse=True)
        with h5py.File(self.path, "r") as f:
            got = f["planes"][uniq]
        return torch.from_numpy(got[inverse.reshape(-1)])


def canonical(planes: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """The model input (N, 3, S, S) float32 from stored grey planes: what `preprocess` gives."""
    return ((planes.float() - mean) / std).unsqueeze(1).expand(-1, 3, -1, -1)


def data_hash(root: Path, images: list[str]) -> str:
    """SHA-256 over (id, SHA-256 of the file's bytes) of every image; unreadable files hash as such."""
    h = hashlib.sha256()
    for image in images:
        try:
            digest = hashlib.sha256(read_bytes(root / image)).hexdigest()
        except InputError as exc:
            digest = f"unreadable: {exc}"
        h.update(f"{image}\t{digest}\n".encode())
    return h.hexdigest()[:16]


def open_or_build(path: str | os.PathLike, images: list[str], root: str | os.PathLike, model: EmbeddingModel,
                  progress: bool = True, log=print) -> TensorCache:
    """The cache of `images` (paths relative to `root`) at `path`: reused when it was made from the same
    files with the same preprocessing, else (re)built with the runtime's ingestion and preprocessing."""
    path, root = Path(path), Path(root)
    _refuse_foreign(path)
    wanted = data_hash(root, images)
    identity = model.preprocess.identity
    cache, why = _open(path, wanted, identity, model.preprocess.size)
    if cache is not None:
        return cache
    if path.exists():
        log(f"note: {path} {why}; rebuilding it")
    return _build(path, images, root, model, wanted, progress)


def _refuse_foreign(path: Path) -> None:
    """A file at `path` that no cxr-embed cache run wrote (a store, the labels, a typo) is not overwritten."""
    if not path.exists():
        return
    if not path.is_file():
        raise CacheFileError(f"the image cache path {path} is not a file; name another --cache")
    try:
        with h5py.File(path, "r") as f:
            ours = _text(f.attrs.get("format")) == FORMAT
    except Exception:  # not HDF5, or HDF5 that h5py cannot open: either way not a cache we wrote whole
        ours = False
    if not ours:
        raise CacheFileError(f"{path} is not a cxr-embed image cache ({FORMAT}); it is left as it is: name another "
                             "--cache (or move the file away)")


def _text(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) else None


def _strings(ds) -> list[str]:
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "OSU" or len(ds) > 10_000_000:
        raise ValueError("a list of strings expected")
    return [x.decode("utf-8") if isinstance(x, bytes) else str(x) for x in ds[:]]


def _open(path: Path, wanted: str, identity: str, size: int) -> tuple[TensorCache | None, str]:
    """The cache, or None and why it cannot be reused."""
    if not path.is_file():
        return None, "does not exist"
    try:
        with h5py.File(path, "r") as f:
            if _text(f.attrs.get("data_hash")) != wanted or _text(f.attrs.get("preprocess")) != identity:
                return None, "was made from other images or another preprocessing"
            ids, failed_ids, failed_why = _strings(f["ids"]), _strings(f["failed_ids"]), _strings(f["failed_why"])
            planes = f["planes"]
            if not isinstance(planes, h5py.Dataset) or planes.dtype != np.float16 \
                    or planes.shape != (len(ids), size, size):
                raise ValueError(f"planes: ({len(ids)}, {size}, {size}) float16 expected")
            if len(set(ids)) != len(ids) or len(failed_ids) != len(failed_why):
                raise ValueError("ids: each image once, and a reason for each failure, expected")
            for i in range(0, len(ids), _SCAN):
                block = planes[i : i + _SCAN]
                if not (np.isfinite(block).all() and block.min(initial=0) >= 0 and block.max(initial=0) <= 1):
                    raise ValueError("a plane has values that are not finite or not in [0, 1]")
    except Exception as exc:  # a damaged or tampered cache is rebuilt, not trusted
        return None, f"does not check out as a cache ({type(exc).__name__}: {str(exc)[:120]})"
    return TensorCache(path, ids, identity, dict(zip(failed_ids, failed_why)), wanted), ""


def _prepared(runtime: Runtime, paths: list[Path], ahead: int = 8):
    """runtime.prepare of each path, in order, decoded in the runtime's pool at most `ahead` at a time
    (a canonical float32 tensor is 600 KB: a task's worth at once would not be bounded)."""
    pending: deque = deque()
    for p in paths:
        pending.append(runtime.decode_pool.submit(runtime.prepare, p))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _build(path: Path, images: list[str], root: Path, model: EmbeddingModel, wanted: str, progress: bool) -> TensorCache:
    runtime = Runtime(RuntimeSettings(device="cpu", image_check="never"), model=model)
    cfg = model.preprocess
    kept: list[str] = []
    failed: dict[str, str] = {}
    bar = tqdm(total=len(images), unit="img", desc="decoding images once", disable=not progress, file=sys.stderr,
               mininterval=2.0)
    try:  # whole or not at all (fsync, rename); each plane written as it is decoded: memory holds a few, not the task
        with atomic_replace(path, "image cache") as tmp, h5py.File(tmp, "w") as f:
            planes = f.create_dataset("planes", shape=(0, cfg.size, cfg.size), maxshape=(None, cfg.size, cfg.size),
                                      dtype=np.float16, chunks=(1, cfg.size, cfg.size))
            for n, prepared in enumerate(_prepared(runtime, [root / image for image in images])):
                bar.update(1)
                if prepared.error is not None:
                    failed[images[n]] = f"{prepared.error.code}: {prepared.error}"
                    continue
                planes.resize(len(kept) + 1, axis=0)
                planes[len(kept)] = (np.asarray(prepared.tensor[0]) * cfg.std + cfg.mean).astype(np.float16)
                kept.append(images[n])
            f.create_dataset("ids", data=kept, dtype=h5py.string_dtype())
            f.create_dataset("failed_ids", data=list(failed), dtype=h5py.string_dtype())
            f.create_dataset("failed_why", data=list(failed.values()), dtype=h5py.string_dtype())
            f.attrs.update(format=FORMAT, data_hash=wanted, preprocess=cfg.identity)  # last: a whole file only
    finally:
        bar.close()
        runtime.close()
    return TensorCache(path, kept, cfg.identity, failed, wanted)
