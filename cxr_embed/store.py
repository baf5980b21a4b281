"""The HDF5 embedding store.

Layout (h5py, format cxr-embed-store/3):
  /ids            text column: the image id (path relative to the image root, or CSV value)
  /embeddings     (N, dim) float32, chunked, resizable
  /metadata       text column: utf-8 JSON, the CSV's other columns and what ingestion found
  /failed/ids, /failed/errors   text columns: failed image ids and their "code: message"
  a text column is a group of two datasets: utf8 (all strings' bytes, uint8) and ends (N,) int64
  attributes: format, model_name, weights_hash, preprocess_version, dim, created_at, updated_at,
              checksum ("sha256:..." over every other attribute and the four text columns)
  beside it, while a writer has commits not yet folded in: STORE.h5.journal (`journal.py`); and
  STORE.h5.lock, an empty file that a writer holds locked (flock) while it may change the store

Integrity: every dataset carries HDF5's fletcher32 filter (checked on every read), the file's own
structure HDF5's metadata checksums (libver v110), and the text and attributes a SHA-256 checked
whenever a Store opens; every journal frame its own SHA-256. Text is not stored as variable-length
strings: HDF5 cannot filter those, and a damaged global heap makes HDF5 loop or allocate without bound
instead of failing. Any mismatch raises StoreCorrupt; damaged bytes are never returned as data. Stores
of format /1 (vlen strings, no checksums) still open, with an UncheckedStoreWarning; `upgrade_store`
rewrites them. Format /2 is /3 without a journal; a writer rewrites /1 and /2 stores as /3 with its
first commit, so that a cxr-embed that does not know journals refuses the store (StoreTooNew) rather
than miss the rows in its journal.

Crash safety: the HDF5 file is only ever replaced whole (a copy `STORE.h5.tmp`, appended to, fsynced
and renamed over the store: atomic on POSIX), and the journal only appended to (fsynced per commit).
A commit appends its batch to the journal (its cost: the batch, not the store); the journal is folded
into the HDF5 file by such a replacement once it reaches a quarter of the file (32 MiB to 512 MiB) and
when the writer closes. A SIGKILL at any moment leaves every acknowledged commit readable: a torn last
journal frame was never acknowledged; a journal left beside a file that a fold has since replaced names
the old file's checksum and is ignored. In-place HDF5 appends cannot give this: a process killed with
the file open leaves it unopenable ("file is already open for write") or inconsistent. A batch is
reported done only after the commit that holds it; a failed commit leaves the store as it was.

One writer at a time: `StoreWriter`, `remove_images` and `upgrade_store` hold STORE.h5.lock (an
exclusive flock, let go by `close` or when the process ends, however it ends) and a second one is
refused with StoreBusy. Two writers would each fold the journal from what they hold, drop each
other's commits and leave a journal whose frames no longer match (measured: two `embed` runs on one
store damaged it for good). Readers (`Store`) take no lock: they see the last complete commit.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import h5py
import numpy as np

from .identity import ModelIdentity
from .journal import (Batch, Journal, append_frame, encode_batch, fsync_dir, journal_path, read_journal, remove_journal,
                      start_journal)
from .errors import (
    InvalidEmbedding,
    ModelMismatch,
    StoreBusy,
    StoreCorrupt,
    StoreError,
    StoreTooNew,
    StoreWriteFailed,
    UnknownImageIds,
)

FORMAT_VERSION = 3
FORMAT = f"cxr-embed-store/{FORMAT_VERSION}"
LEGACY_FORMAT = "cxr-embed-store/1"  # written before checksums (up to f17ef0b)
FORMATS = {LEGACY_FORMAT: 1, "cxr-embed-store/2": 2, FORMAT: FORMAT_VERSION}  # /2: before journals
FOLD_MIN_BYTES, FOLD_MAX_BYTES = 32 * 2**20, 512 * 2**20  # the journal is folded in at a quarter of the file, within these
IDENTITY_KEYS = ModelIdentity.keys_()  # the attributes a store records its model by
COLUMNS = ("ids", "metadata", "failed/ids", "failed/errors")
_LIBVER = ("v110", "v110")  # object headers and chunk indexes with checksums; readable by HDF5 >= 1.10
_BLOCK = 4096  # rows per read when a whole store is copied
# what h5py raises on a damaged file: HDF5 errors (OSError, KeyError for a lost object), bad UTF-8
_READ_ERRORS = (OSError, KeyError, ValueError, RuntimeError)


class UncheckedStoreWarning(UserWarning):
    """A store written before checksums: damage to it would go unnoticed until it is upgraded."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


def _corrupt(path: Path, detail: str) -> StoreCorrupt:
    return StoreCorrupt(
        f"store {path} is damaged ({detail}); nothing was read from it. Restore it from a backup, "
        "or embed the images again into a new store"
    )


def _framed(items: Sequence[str]) -> bytes:
    """Length-prefixed bytes, so that no two different lists hash alike."""
    parts = [len(items).to_bytes(8, "little")]
    for item in items:
        b = item.encode("utf-8")
        parts += (len(b).to_bytes(8, "little"), b)
    return b"".join(parts)


def content_checksum(attrs: dict, columns: dict[str, list[str]]) -> str:
    """SHA-256 over a store's attributes (all but the checksum itself) and its string columns."""
    h = hashlib.sha256(_framed([f"{k}\0{attrs[k]}" for k in sorted(attrs) if k != "checksum"]))
    for name in COLUMNS:
        h.update(_framed(columns[name]))
    return "sha256:" + h.hexdigest()


def _read_text(f: h5py.File, name: str) -> list[str]:
    if isinstance(f[name], h5py.Dataset):  # format /1: variable-length strings
        return _decode(f[name][:])
    blob, ends = f[name]["utf8"][:].tobytes(), f[name]["ends"][:]
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    if len(ends) and (ends[-1] != len(blob) or (ends < starts).any()):
        raise ValueError(f"text column {name} does not add up")
    return [blob[a:b].decode("utf-8") for a, b in zip(starts.tolist(), ends.tolist())]


def _id_at(f: h5py.File, n: int) -> str:
    """The image id of row n, read alone."""
    if isinstance(f["ids"], h5py.Dataset):  # format /1
        return _decode([f["ids"][n]])[0]
    ends = f["ids"]["ends"]
    start = int(ends[n - 1]) if n else 0
    return f["ids"]["utf8"][start : int(ends[n])].tobytes().decode("utf-8")


def _append_text(f: h5py.File, name: str, values: Sequence[str]) -> None:
    utf8, ends = f[name]["utf8"], f[name]["ends"]
    if not values:
        return
    data = [v.encode("utf-8") for v in values]
    n0, b0 = ends.shape[0], utf8.shape[0]
    new_ends = b0 + np.cumsum([len(d) for d in data], dtype=np.int64)
    utf8.resize((int(new_ends[-1]),))
    utf8[b0:] = np.frombuffer(b"".join(data), np.uint8)
    ends.resize((n0 + len(values),))
    ends[n0:] = new_ends


def _attr(value):
    """An attribute as Python: fixed-length strings (format /2) come back from h5py as bytes."""
    value = value.item() if hasattr(value, "item") else value
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _set_attr(f: h5py.File, key: str, value) -> None:
    # fixed-length, so that it lives in the checksummed object header, not in the global heap
    f.attrs[key] = np.bytes_(value.encode("utf-8")) if isinstance(value, str) else value


def _read_contents(f: h5py.File) -> tuple[dict, dict[str, list[str]]]:
    attrs = {k: _attr(v) for k, v in f.attrs.items()}
    return attrs, {name: _read_text(f, name) for name in COLUMNS}


def _datasets(f: h5py.File) -> list[h5py.Dataset]:
    found: list[h5py.Dataset] = []
    f.visititems(lambda _, obj: found.append(obj) if isinstance(obj, h5py.Dataset) else None)
    return found


def _format_version(f: h5py.File, path: Path) -> int:
    fmt = _attr(f.attrs.get("format"))
    if fmt in FORMATS:
        return FORMATS[fmt]
    m = re.fullmatch(r"cxr-embed-store/(\d+)", str(fmt))
    if m and int(m.group(1)) > FORMAT_VERSION:
        raise StoreTooNew(f"store {path} has format {fmt}: it was written by a newer cxr-embed; upgrade cxr-embed to read it")
    if "ids" in f and "embeddings" in f:
        raise _corrupt(path, f"unreadable format attribute {fmt!r}")
    raise StoreError(f"{path} is not a cxr-embed store (format {fmt!r})")


class Store:
    """Read access to a store: ids, embeddings, metadata, failures and the model identity; the HDF5 file
    and the commits of its journal not yet folded in, as one."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise StoreError(f"no store at {self.path}")
        try:
            with h5py.File(self.path, "r") as f:
                self.version = _format_version(f, self.path)
                self.attrs, columns = _read_contents(f)
                shape = f["embeddings"].shape
                filtered = all(d.fletcher32 for d in _datasets(f))
        except _READ_ERRORS as exc:
            raise _corrupt(self.path, f"{type(exc).__name__}: {exc}") from exc
        self.checksum = content_checksum(self.attrs, columns)
        self._verify(columns, shape, filtered)
        self.ids = columns["ids"]
        self._meta_raw = columns["metadata"]
        self.failed = dict(zip(columns["failed/ids"], columns["failed/errors"]))
        self._in_file = len(self.ids)  # rows in the HDF5 file; those after them come from the journal
        self._extra = np.zeros((0, self.dim), np.float32)
        self.journal: Journal | None = None
        if self.version >= 3:
            self._add_journal(read_journal(journal_path(self.path), self.attrs["checksum"], self.dim))
        self._row = {i: n for n, i in enumerate(self.ids)}

    def _add_journal(self, journal: Journal | None) -> None:
        """The journal's commits after the file's rows; the checksum then names both."""
        self.journal = journal
        if journal is None or not journal.batches:
            return
        self.ids, self._meta_raw = list(self.ids), list(self._meta_raw)
        for batch in journal.batches:
            self.ids.extend(batch.ids)
            self._meta_raw.extend(batch.metadata)
        self.failed = merge_failures(self.failed, journal.batches)
        self._extra = np.concatenate([b.embeddings for b in journal.batches])
        if len(set(self.ids)) != len(self.ids):
            raise _corrupt(journal_path(self.path), "an image id is stored twice")
        self.checksum = "sha256:" + hashlib.sha256(f"{self.checksum}\0{journal.digest}".encode()).hexdigest()

    def _verify(self, columns: dict[str, list[str]], shape: tuple, filtered: bool) -> None:
        if self.version < 2:
            warnings.warn(
                f"store {self.path} ({self.attrs['format']}) carries no checksum: damage to it cannot be "
                "detected. Rewrite it with cxr_embed.store.upgrade_store",
                UncheckedStoreWarning, stacklevel=3,
            )
        elif self.attrs.get("checksum") != self.checksum:
            raise _corrupt(self.path, "checksum mismatch: its ids, metadata, failures or attributes changed after writing")
        elif not filtered:
            raise _corrupt(self.path, "a dataset lost its fletcher32 checksum")
        n = len(columns["ids"])
        if any(k not in self.attrs for k in IDENTITY_KEYS) or shape != (n, int(self.attrs["dim"])):
            raise _corrupt(self.path, f"{n} ids but embeddings of shape {shape}, or a missing model identity")
        if len(columns["metadata"]) != n or len(columns["failed/ids"]) != len(columns["failed/errors"]):
            raise _corrupt(self.path, "its columns have different lengths")
        if len(set(columns["ids"])) != n:
            raise _corrupt(self.path, "an image id is stored twice")

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity.coerce({k: self.attrs[k] for k in IDENTITY_KEYS}, f"store {self.path}")

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
        if rows is None:
            return np.concatenate([self._file_embeddings(None), self._extra]) if len(self._extra) else self._file_embeddings(None)
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        in_file = rows < self._in_file
        out[in_file] = self._file_embeddings(rows[in_file])
        out[~in_file] = self._extra[rows[~in_file] - self._in_file]
        return out

    def _file_embeddings(self, rows: np.ndarray | None) -> np.ndarray:
        if rows is not None:
            if len(rows) == 0:
                return np.zeros((0, self.dim), np.float32)
            # h5py reads a sorted, duplicate-free selection; restore the caller's order afterwards
            uniq, inverse = np.unique(rows, return_inverse=True)
        try:
            with h5py.File(self.path, "r") as f:
                ds = self._file_rows(f)
                return ds[: self._in_file].astype(np.float32, copy=False) if rows is None else ds[uniq].astype(np.float32, copy=False)[inverse]
        except _READ_ERRORS as exc:  # fletcher32 mismatch, or the file changed under us
            raise _corrupt(self.path, f"embeddings unreadable: {exc}") from exc

    def _file_rows(self, f: h5py.File) -> h5py.Dataset:
        """The embeddings dataset, once sure that its first rows are still the ones this Store opened: a
        fold since then only appended (a writer's, e.g. the listener's), a removal or merge rewrote it."""
        if self._in_file and (f["embeddings"].shape[0] < self._in_file or _id_at(f, self._in_file - 1) != self.ids[self._in_file - 1]):
            raise StoreError(f"store {self.path} was rewritten since it was opened (images removed?); open it again")
        return f["embeddings"]

    def blocks(self, size: int = _BLOCK) -> Iterator[np.ndarray]:
        """All embeddings in row order, at most `size` rows at a time (bounded memory for a large store)."""
        try:
            with h5py.File(self.path, "r") as f:
                ds = self._file_rows(f)
                for start in range(0, self._in_file, size):
                    yield ds[start : min(start + size, self._in_file)]
        except _READ_ERRORS as exc:
            raise _corrupt(self.path, f"embeddings unreadable: {exc}") from exc
        for start in range(0, len(self._extra), size):
            yield self._extra[start : start + size]

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
            f"format:             {self.attrs['format']}" + ("" if self.version > 1 else " (no checksum: upgrade it)"),
        ]
        if self.journal is not None and self.journal.batches:
            lines.append(f"journal:            {len(self._extra)} image(s) in {journal_path(self.path).name}, committed "
                         "and not yet folded into the HDF5 file (Store reads both; copy both)")
        if self.ids:
            keys = sorted(json.loads(self._meta_raw[0]).keys())
            lines.append(f"metadata fields:    {', '.join(keys)}")
        for image_id, err in list(self.failed.items())[:10]:
            lines.append(f"  failed {image_id}: {err}")
        if len(self.failed) > 10:
            lines.append(f"  ... and {len(self.failed) - 10} more failures")
        return "\n".join(lines)


def check_identity(expected, found, what: str) -> None:
    """Raise ModelMismatch unless `found` is the `expected` model identity (ModelIdentity.check)."""
    ModelIdentity.coerce(expected, what).check(found, what)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


@contextmanager
def atomic_replace(path: Path, what: str = "store") -> Iterator[Path]:
    """Yields a temporary path beside `path` that atomically becomes `path` (fsync + rename) if the
    block succeeds; on any failure the temporary file is removed and `path` is left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_quietly(tmp)  # left by a killed commit: never append to it
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, (OSError, RuntimeError)):  # h5py reports a failed flush or close as RuntimeError
            raise _write_failed(path, exc, what) from exc
        raise
    fsync_dir(path.parent)


def _write_through(path: Path) -> Path:
    """A store named by a symlink is written where the link points (an atomic replace of the link's
    name would put a new file in place of the link, and the store would silently split in two)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def lock_path(store: Path) -> Path:
    return store.with_name(store.name + ".lock")


class WriterLock:
    """`STORE.h5.lock` held with an exclusive flock while one writer may change the store (see the
    module's docstring). StoreBusy when another holds it, in this process or another. `release()`, or
    the lock's last reference going, or the process ending (however: the kernel drops the lock) lets
    it go; the empty file stays (only a held lock counts)."""

    def __init__(self, store: Path):
        # beside the real file: another name for it (a symlink to it, or to its folder) finds the same lock
        self.path = lock_path(Path(os.path.realpath(store)))
        try:
            store.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise _write_failed(store, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreBusy(f"store {store} is being written by another process or writer (it holds {self.path.name}); "
                            "wait for it to end, or write to another store") from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise _write_failed(store, exc) from exc
            # a filesystem without locks: the store still works, but nothing stops a second writer
            logging.getLogger("cxr_embed").warning(
                "cannot lock %s (%s): make sure no other process writes to store %s at the same time",
                self.path.name, os.strerror(exc.errno), store)
        self._release = weakref.finalize(self, os.close, fd)

    @property
    def held(self) -> bool:
        return self._release.alive

    def release(self) -> None:
        self._release()


@contextmanager
def writing(store: Path) -> Iterator[None]:
    """The store's writer lock for the block (`remove_images`, `upgrade_store`)."""
    lock = WriterLock(Path(store))
    try:
        yield
    finally:
        lock.release()


def _write_failed(path: Path, exc: BaseException, what: str = "store") -> StoreWriteFailed:
    return StoreWriteFailed(f"could not write {what} {path}: {exc}. The {what} is unchanged; free disk space or make "
                            "its folder writable, then run again")


def _open_reserved(path: Path, nbytes: int) -> h5py.File:
    """Opens `path` for writing (created if absent) once disk space for `nbytes` more is claimed: a full
    disk then fails here, cleanly, not inside HDF5 (a failed write leaves HDF5 with a file it cannot
    close, and has crashed the process). HDF5 writes at its own end of data and, since the file was
    longer when opened, truncates it to that end on close: the surplus is given back."""
    if not path.exists():
        h5py.File(path, "w", libver=_LIBVER).close()
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, int((os.fstat(fd).st_size + nbytes) * 1.25) + 2**20)
    finally:
        os.close(fd)
    return h5py.File(path, "a", libver=_LIBVER)


def _create_layout(f: h5py.File, identity: dict, created_at: str | None = None) -> None:
    _set_attr(f, "format", FORMAT)
    for k in IDENTITY_KEYS:
        _set_attr(f, k, identity[k])
    _set_attr(f, "created_at", created_at or _now())
    dim = int(identity["dim"])
    f.create_dataset(
        "embeddings", (0, dim), maxshape=(None, dim), dtype="f4", fletcher32=True,
        chunks=(max(1, min(256, 2**20 // (4 * dim))), dim),
    )
    for name in COLUMNS:
        g = f.create_group(name)
        g.create_dataset("utf8", (0,), maxshape=(None,), dtype="u1", chunks=(16384,), fletcher32=True)
        g.create_dataset("ends", (0,), maxshape=(None,), dtype="i8", chunks=(1024,), fletcher32=True)


def _append_rows(f: h5py.File, ids: list[str], meta: list[str], embs: list[np.ndarray] | np.ndarray) -> None:
    n0, dim = f["embeddings"].shape
    _append_text(f, "ids", ids)
    _append_text(f, "metadata", meta)
    if len(embs):
        f["embeddings"].resize((n0 + len(embs), dim))
        f["embeddings"][n0:] = np.stack(embs)


def _set_failed(f: h5py.File, failed: dict[str, str]) -> None:
    for name, values in (("failed/ids", list(failed)), ("failed/errors", list(failed.values()))):
        for part in ("utf8", "ends"):
            f[name][part].resize((0,))
        _append_text(f, name, values)


def merge_failures(failed: dict[str, str], batches: Sequence[Batch]) -> dict[str, str]:
    """The failures after `batches`, in order: each adds its failures and clears those of the ids it stores."""
    out = dict(failed)
    for batch in batches:
        out.update(batch.failed)
        for image_id in batch.ids:
            out.pop(image_id, None)
    return out


def _seal(f: h5py.File) -> None:
    """Stamps the checksum over what the file now holds (read back, as Store will read it)."""
    _set_attr(f, "updated_at", _now())
    f.flush()
    attrs, columns = _read_contents(f)
    _set_attr(f, "checksum", content_checksum(attrs, columns))


def _rewrite(src: Store, dst: Path, drop: set[str] = frozenset()) -> None:
    """Writes `src` without the rows and failures of `drop` into a fresh file at `dst` (current format)."""
    keep = np.fromiter((i not in drop for i in src.ids), bool, len(src))
    start = 0
    with _open_reserved(dst, src.path.stat().st_size + src._extra.nbytes) as f:
        _create_layout(f, src.identity, src.attrs.get("created_at"))
        for block in src.blocks(_BLOCK):  # the file's rows, then the journal's
            rows = np.flatnonzero(keep[start : start + len(block)]) + start
            if not np.isfinite(block).all():
                raise _corrupt(src.path, f"non-finite embedding values near row {start}")
            _append_rows(f, [src.ids[r] for r in rows], [src._meta_raw[r] for r in rows], block[rows - start])
            start += len(block)
        _set_failed(f, {k: v for k, v in src.failed.items() if k not in drop})
        _seal(f)


@dataclass
class StoreWriter:
    """Adds embeddings and failures to a store; `commit` makes them durable, `close` also folds the
    journal into the HDF5 file. Refuses a store of another model.

    A commit appends to the store's journal (its cost: the batch). The journal is folded in (the file
    copied, appended to and renamed: its cost, the store) by the commit after it has reached
    `fold_at_bytes` (default: a quarter of the file, 32 MiB to 512 MiB), and by `close`. A new store, or
    one of an older format, is written whole by its first commit."""

    path: Path
    identity: dict
    fold_at_bytes: int | None = None
    _ids: list[str] = field(default_factory=list)
    _embs: list[np.ndarray] = field(default_factory=list)
    _meta: list[str] = field(default_factory=list)
    _failed: dict[str, str] = field(default_factory=dict)
    _done: set[str] = field(default_factory=set)
    _whole: bool = True  # the next commit writes the file whole: none yet, or of an older format
    _base: str | None = None  # the checksum of the HDF5 file on disk, which the journal applies to
    _journal_size: int = 0  # bytes of the journal's valid part (0: none)
    _lock: WriterLock | None = field(default=None, init=False, repr=False, compare=False)  # held until close

    def __post_init__(self):
        self.path = _write_through(Path(self.path))
        self._lock = WriterLock(self.path)  # first: what is read below is then not changing (StoreBusy)
        try:
            stale = self.path.with_name(self.path.name + ".tmp")
            if stale.exists():  # a commit killed before its rename: the real store is intact
                stale.unlink()
            if self.path.exists():
                existing = Store(self.path)
                check_identity(self.identity, existing.identity, f"store {self.path}")
                self._done = set(existing.ids)
                self._whole = existing.version < FORMAT_VERSION  # the first commit rewrites it in the current format
                self._base = existing.attrs.get("checksum")
                self._journal_size = existing.journal.size if existing.journal is not None else 0
        except BaseException:
            self._lock.release()
            raise

    @property
    def done_ids(self) -> set[str]:
        return self._done

    @property
    def saved(self) -> int:
        """Images embedded and committed (durable in the file)."""
        return len(self._done) - len(self._ids)

    @property
    def pending(self) -> int:
        return len(self._ids) + len(self._failed)

    def add(self, image_id: str, embedding: np.ndarray, metadata: dict) -> None:
        """Queues one image for the next commit; an id already stored is skipped."""
        if image_id in self._done:
            return
        emb = np.asarray(embedding, dtype=np.float32)
        if emb.shape != (int(self.identity["dim"]),):
            raise InvalidEmbedding(f"embedding of {image_id!r} has shape {emb.shape}, store {self.path} holds ({self.identity['dim']},)")
        if not np.isfinite(emb).all():
            raise InvalidEmbedding(f"embedding of {image_id!r} holds NaN or infinite values; store {self.path} refuses it")
        self._ids.append(image_id)
        self._embs.append(emb)
        self._meta.append(json.dumps(metadata, sort_keys=True, default=str))
        self._done.add(image_id)

    def fail(self, image_id: str, error: str) -> None:
        self._failed[image_id] = error

    def commit(self) -> None:
        """Make everything added so far durable: appended to the journal, or written whole with the
        journal folded in (see the class). Cheap to call when nothing is pending. On failure
        (StoreWriteFailed) the store is unchanged and everything stays pending."""
        if not self.pending and not self._whole:
            return
        if not self._lock.held:
            raise StoreError(f"this writer of store {self.path} is closed; open a new StoreWriter to add more")
        dim = int(self.identity["dim"])
        batch = Batch(self._ids, self._meta, np.stack(self._embs) if self._embs else np.zeros((0, dim), np.float32),
                      dict(self._failed))
        if self._whole or self._journal_size >= self._fold_at():
            self._write_whole(batch)
        else:
            self._append(batch)
        self._ids, self._embs, self._meta, self._failed = [], [], [], {}

    def close(self) -> None:
        """Commit, fold the journal into the HDF5 file (the store is one file again), and let the
        store's lock go, even when that fails (what was committed stays in the journal)."""
        if not self._lock.held:
            return
        try:
            self.commit()
            if self._journal_size:
                self._write_whole(Batch([], [], np.zeros((0, int(self.identity["dim"])), np.float32)))
        finally:
            self._lock.release()

    def _fold_at(self) -> int:
        if self.fold_at_bytes is not None:
            return self.fold_at_bytes
        return min(max(FOLD_MIN_BYTES, self.path.stat().st_size // 4), FOLD_MAX_BYTES)

    def _append(self, batch: Batch) -> None:
        path = journal_path(self.path)
        try:
            frame = encode_batch(batch)
            if self._journal_size:
                self._journal_size = append_frame(path, self._journal_size, frame)
            else:  # a journal of an earlier file (left by a crash after a fold) is replaced
                self._journal_size = start_journal(path, self._base, frame)
        except OSError as exc:
            raise _write_failed(self.path, exc) from exc

    def _write_whole(self, batch: Batch) -> None:
        """The HDF5 file replaced atomically by one holding the journal's batches and `batch`; the
        journal is then removed (until then it names the old file, so is ignored if left behind)."""
        journal = read_journal(journal_path(self.path), self._base, batch.embeddings.shape[1]) if self._journal_size else None
        batches = (journal.batches if journal is not None else []) + [batch]
        with atomic_replace(self.path) as tmp:
            if self._whole and self.path.exists():
                _rewrite(_open_unchecked(self.path), tmp)
            elif self.path.exists():
                shutil.copyfile(self.path, tmp)
            nbytes = sum(b.embeddings.nbytes + sum(map(len, b.ids)) + sum(map(len, b.metadata)) for b in batches)
            with _open_reserved(tmp, nbytes) as f:
                if "ids" not in f:
                    _create_layout(f, self.identity)
                for b in batches:
                    _append_rows(f, b.ids, b.metadata, b.embeddings)
                _set_failed(f, merge_failures(dict(zip(_read_text(f, "failed/ids"), _read_text(f, "failed/errors"))),
                                              batches))
                _seal(f)
                base = _attr(f.attrs["checksum"])
        self._base, self._whole, self._journal_size = base, False, 0
        try:
            remove_journal(journal_path(self.path))
        except OSError:  # harmless: it names the replaced file, so it is ignored, and the next journal replaces it
            pass


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
    writer.close()
    return Store(out)


def _open_unchecked(path: str | os.PathLike) -> Store:
    """Opens a store about to be rewritten in the current format: no warning that it has no checksum."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncheckedStoreWarning)
        return Store(path)


def upgrade_store(path: str | os.PathLike) -> Path:
    """Rewrites a store of an older format in the current one, atomically; a current store is left as is.
    StoreBusy while a writer holds it."""
    path = _write_through(Path(path))
    with writing(path):
        store = _open_unchecked(path)
        if store.version < FORMAT_VERSION:
            with atomic_replace(store.path) as tmp:
                _rewrite(store, tmp)
    return store.path


@dataclass
class RemovalReport:
    """What `remove_images` took out of a store, and the store's new checksum."""

    path: Path
    removed: list[str]  # ids whose embedding and metadata are gone
    removed_failures: list[str]  # ids whose failure record is gone
    remaining: int
    checksum: str


def remove_images(path: str | os.PathLike, ids: Iterable[str]) -> RemovalReport:
    """Removes images (embedding, metadata, failure record) for good: the file is rewritten without
    them, since HDF5 never reclaims freed space. All ids must be known, else nothing is removed.
    StoreBusy while a writer holds the store (its next fold would put them back)."""
    path = _write_through(Path(path))
    with writing(path):
        return _remove_images(path, ids)


def _remove_images(path: str | os.PathLike, ids: Iterable[str]) -> RemovalReport:
    store = Store(path)
    drop = list(dict.fromkeys(ids))
    unknown = [i for i in drop if i not in store and i not in store.failed]
    if unknown:
        examples = ", ".join(repr(i) for i in unknown[:5])
        raise UnknownImageIds(
            f"{len(unknown)} of the {len(drop)} id(s) to remove are not in store {store.path} (e.g. {examples}); nothing was removed"
        )
    removed = [i for i in drop if i in store]
    removed_failures = [i for i in drop if i in store.failed]
    if drop:
        with atomic_replace(store.path) as tmp:
            _rewrite(store, tmp, set(drop))  # the journal's rows included
        remove_journal(journal_path(store.path))  # it names the replaced file: its copy of the removed rows goes too
        store = Store(store.path)
    return RemovalReport(store.path, removed, removed_failures, len(store), store.checksum)
