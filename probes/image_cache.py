"""A task's images decoded and preprocessed once, through the runtime's own ingestion and canonical
preprocessing, kept as float16 grey levels in an HDF5 file for the runs that train on pixels
(`cxr-embed finetune`): decoding would otherwise cost more than a forward pass, every fit.

What is stored is the canonical tensor's grey plane, x * std + mean in [0, 1] (the three channels are
equal), as float16: within 2.5e-4 of the float32 canonical input (half a float16 step below 1), which
`canonical()` restores. The file records the preprocessing identity and a hash of every image's
bytes; a cache made from other files or another preprocessing is rebuilt, never reused. Rows are
read on demand, so memory holds only the images in use (a draw and the test split), not the task.
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

from cxr_embed.errors import InputError
from cxr_embed.ingest import read_bytes
from cxr_embed.models import EmbeddingModel
from cxr_embed.runtime import Runtime, RuntimeSettings

FORMAT = "cxr-embed-tensor-cache/1"


@dataclass
class TensorCache:
    """The grey planes of the images that decoded, by id; `failed` names the others and why."""

    path: Path
    ids: list[str]
    preprocess: str  # the PreprocessConfig identity the planes were made with
    failed: dict[str, str] = field(default_factory=dict)

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
    wanted = data_hash(root, images)
    identity = model.preprocess.identity
    cache = _open(path, wanted, identity)
    if cache is not None:
        return cache
    if path.exists():
        log(f"note: {path} was made from other images or another preprocessing; rebuilding it")
    return _build(path, images, root, model, wanted, progress)


def _open(path: Path, wanted: str, identity: str) -> TensorCache | None:
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT or f.attrs.get("data_hash") != wanted \
                    or f.attrs.get("preprocess") != identity or "planes" not in f:
                return None
            ids = [x.decode() if isinstance(x, bytes) else str(x) for x in f["ids"][:]]
            failed = dict(zip([x.decode() if isinstance(x, bytes) else str(x) for x in f["failed_ids"][:]],
                              [x.decode() if isinstance(x, bytes) else str(x) for x in f["failed_why"][:]]))
    except (OSError, KeyError):  # a damaged cache is rebuilt, not trusted
        return None
    return TensorCache(path, ids, identity, failed)


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
    planes = np.zeros((len(images), cfg.size, cfg.size), np.float16)
    ok = np.zeros(len(images), bool)
    failed: dict[str, str] = {}
    bar = tqdm(total=len(images), unit="img", desc="decoding images once", disable=not progress, file=sys.stderr,
               mininterval=2.0)
    try:
        for n, prepared in enumerate(_prepared(runtime, [root / image for image in images])):
            bar.update(1)
            if prepared.error is not None:
                failed[images[n]] = f"{prepared.error.code}: {prepared.error}"
                continue
            planes[n] = (np.asarray(prepared.tensor[0]) * cfg.std + cfg.mean).astype(np.float16)
            ok[n] = True
    finally:
        bar.close()
        runtime.close()
    keep = np.flatnonzero(ok)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs.update(format=FORMAT, data_hash=wanted, preprocess=cfg.identity)
        f.create_dataset("planes", data=planes[keep], chunks=(1, cfg.size, cfg.size))
        f.create_dataset("ids", data=[images[n] for n in keep], dtype=h5py.string_dtype())
        f.create_dataset("failed_ids", data=list(failed), dtype=h5py.string_dtype())
        f.create_dataset("failed_why", data=list(failed.values()), dtype=h5py.string_dtype())
    os.replace(tmp, path)
    return TensorCache(path, [images[n] for n in keep], cfg.identity, failed)
