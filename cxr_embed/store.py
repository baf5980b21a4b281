"""The HDF5 embedding store.

Layout (h5py):
  /ids            (N,) utf-8 strings: the image id (path relative to the image root, or CSV value)
  /embeddings     (N, dim) float32, chunked, resizable
  /metadata       (N,) utf-8 JSON: the CSV's other columns and what ingestion found
  /failed/ids     (M,) utf-8 strings;  /failed/errors (M,) utf-8 "code: message"
  attributes: format, model_name, weights_hash, preprocess_version, dim, created_at, updated_at

Crash safety: the file on disk is only ever replaced whole. A commit copies the current file to
`STORE.h5.tmp`, appends there, fsyncs and renames it over the store (atomic on POSIX). A SIGKILL at
any moment therefore leaves either the previous or the new complete store, and a batch is reported
done only after the commit that holds it.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .errors import ModelMismatch, StoreError

FORMAT = "cxr-embed-store/1"
IDENTITY_KEYS = ("model_name", "weights_hash", "preprocess_version", "dim")
_STR = h5py.string_dtype("utf-8")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class Store:
    """Read access to a store: ids, embeddings, metadata, failures and the model identity."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise StoreError(f"{self.path} is not a cxr-embed store (format {f.attrs.get('format')!r})")
                self.attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
                self.ids = _decode(f["ids"][:])
                self._meta_raw = _decode(f["metadata"][:])
                self.failed = dict(zip(_decode(f["failed/ids"][:]), _decode(f["failed/errors"][:])))
        except OSError as exc:
            raise StoreError(f"cannot open store {self.path}: {exc}") from exc
        self._row = {i: n for n, i in enumerate(self.ids)}

    @property
    def identity(self) -> dict:
        return {k: self.attrs[k] for k in IDENTITY_KEYS}

    @property
    def model_name(self) -> str:
        return str(self.attrs["model_name"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self._row

    def row(self, image_id: str) -> int:
        try:
            return self._row[image_id]
        except KeyError:
            raise KeyError(f"image id {image_id!r} is not in store {self.path}") from None

    def embeddings(self, rows: Sequence[int] | None = None) -> np.ndarray:
        """All embeddings, or those of `rows` (in the order given)."""
        with h5py.File(self.path, "r") as f:
            ds = f["embeddings"]
            if rows is None:
                return ds[:].astype(np.float32, copy=False)
            rows = np.asarray(rows, dtype=np.int64)
            if len(rows) == 0:
                return np.zeros((0, self.dim), np.float32)
            # h5py reads a sorted, duplicate-free selection; restore the caller's order afterwards
            uniq, inverse = np.unique(rows, return_inverse=True)
            return ds[uniq].astype(np.float32, copy=False)[inverse]

    def get(self, ids: Iterable[str]) -> np.ndarray:
        return self.embeddings([self.row(i) for i in ids])

    def metadata(self, image_id_or_row: str | int) -> dict:
        n = image_id_or_row if isinstance(image_id_or_row, int) else self.row(image_id_or_row)
        return json.loads(self._meta_raw[n])

    def summary(self) -> str:
        lines = [
            f"store:              {self.path}",
            f"images:             {len(self)}",
            f"failed:             {len(self.failed)}",
            f"model:              {self.attrs['model_name']}",
            f"weights hash:       {self.attrs['weights_hash']}",
            f"preprocessing:      {self.attrs['preprocess_version']}",
            f"dimension:          {self.attrs['dim']}",
            f"created:            {self.attrs.get('created_at')}",
            f"updated:            {self.attrs.get('updated_at')}",
        ]
        if self.ids:
            keys = sorted(json.loads(self._meta_raw[0]).keys())
            lines.append(f"metadata fields:    {', '.join(keys)}")
        for image_id, err in list(self.failed.items())[:10]:
            lines.append(f"  failed {image_id}: {err}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more failures")
        return "\n".join(lines)


def check_identity(expected: dict, found: dict, what: str) -> None:
    diffs = [f"{k}: {found.get(k)!r} != {expected.get(k)!r}" for k in IDENTITY_KEYS if str(found.get(k)) != str(expected.get(k))]
    if diffs:
        raise ModelMismatch(f"{what} was made by a different model or preprocessing ({'; '.join(diffs)})")


@dataclass
class StoreWriter:
    """Appends embeddings to a store with atomic commits. Refuses a store of another model."""

    path: Path
    identity: dict
    _ids: list[str] = field(default_factory=list)
    _embs: list[np.ndarray] = field(default_factory=list)
    _meta: list[str] = field(default_factory=list)
    _failed: dict[str, str] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    _resolved: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.path = Path(self.path)
        stale = self.path.with_name(self.path.name + ".tmp")
        if stale.exists():  # a commit killed before its rename: the real store is intact
            stale.unlink()
        if self.path.exists():
            existing = Store(self.path)
            check_identity(self.identity, existing.identity, f"store {self.path}")
            self._done = set(existing.ids)
            self.previous_failures = dict(existing.failed)
        else:
            self.previous_failures = {}

    @property
    def done_ids(self) -> set[str]:
        return self._done

    @property
    def saved(self) -> int:
        """Images embedded and committed (durable in the file)."""
        return len(self._done) - len(self._ids)

    @property
    def pending(self) -> int:
        return len(self._ids) + len(self._failed) + len(self._resolved)

    def add(self, image_id: str, embedding: np.ndarray, metadata: dict) -> None:
        if image_id in self._done:
            return
        self._ids.append(image_id)
        self._embs.append(np.asarray(embedding, dtype=np.float32))
        self._meta.append(json.dumps(metadata, sort_keys=True, default=str))
        self._done.add(image_id)
        if image_id in self.previous_failures:
            self._resolved.add(image_id)

    def fail(self, image_id: str, error: str) -> None:
        self._failed[image_id] = error

    def commit(self) -> None:
        """Make everything added so far durable (atomic replace). Cheap to call when nothing is pending."""
        if not self.pending and self.path.exists():
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.path.exists():
            shutil.copyfile(self.path, tmp)
            mode = "a"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            mode = "w"
        dim = int(self.identity["dim"])
        with h5py.File(tmp, mode) as f:
            if mode == "w":
                f.attrs["format"] = FORMAT
                for k in IDENTITY_KEYS:
                    f.attrs[k] = self.identity[k]
                f.attrs["created_at"] = _now()
                f.create_dataset("ids", (0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
                f.create_dataset(
                    "embeddings", (0, dim), maxshape=(None, dim), dtype="f4", chunks=(max(1, min(256, 2**20 // (4 * dim))), dim)
                )
                f.create_dataset("metadata", (0,), maxshape=(None,), dtype=_STR, chunks=(1024,))
                g = f.create_group("failed")
                g.create_dataset("ids", (0,), maxshape=(None,), dtype=_STR, chunks=(256,))
                g.create_dataset("errors", (0,), maxshape=(None,), dtype=_STR, chunks=(256,))
            n0, k = f["ids"].shape[0], len(self._ids)
            if k:
                for name in ("ids", "metadata"):
                    f[name].resize((n0 + k,))
                f["embeddings"].resize((n0 + k, dim))
                f["ids"][n0:] = self._ids
                f["metadata"][n0:] = self._meta
                f["embeddings"][n0:] = np.stack(self._embs)
            failed = dict(zip(_decode(f["failed/ids"][:]), _decode(f["failed/errors"][:])))
            failed.update(self._failed)
            for image_id in self._resolved:
                failed.pop(image_id, None)
            for name, values in (("ids", list(failed)), ("errors", list(failed.values()))):
                f["failed"][name].resize((len(values),))
                if values:
                    f["failed"][name][:] = values
            f.attrs["updated_at"] = _now()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        self.previous_failures = failed
        self._ids, self._embs, self._meta, self._failed, self._resolved = [], [], [], {}, set()


def merge_stores(inputs: Sequence[str | os.PathLike], out: str | os.PathLike) -> Store:
    """Merge shard stores (same model) into one store; an id present twice is kept once."""
    if not inputs:
        raise StoreError("no stores to merge")
    stores = [Store(p) for p in inputs]
    for s in stores[1:]:
        check_identity(stores[0].identity, s.identity, f"store {s.path}")
    writer = StoreWriter(Path(out), stores[0].identity)
    for s in stores:
        embs = s.embeddings()
        for n, image_id in enumerate(s.ids):
            writer.add(image_id, embs[n], json.loads(s._meta_raw[n]))
        for image_id, err in s.failed.items():
            if image_id not in writer.done_ids:
                writer.fail(image_id, err)
        writer.commit()
    return Store(out)
