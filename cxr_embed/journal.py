"""The store's commit journal: an append-only file beside the HDF5 store (`STORE.h5.journal`).

A commit appends one frame (the batch's ids, metadata, failures and float32 embeddings) and fsyncs
it: it costs the batch, not the store, where copying the HDF5 file costs the whole store every time.
The store module folds the journal into the HDF5 file now and then (`store.py`).

File: MAGIC, then frames. A frame is a header (payload length u32, CRC-32 of that length, SHA-256 of
the payload) and the payload. The first frame names the HDF5 state the journal applies to (`base`:
the store's checksum); once a fold has replaced the HDF5 file, the old journal no longer applies and
is ignored even if a crash left it behind. Every later frame is one commit.

Crash safety: a writer killed while appending leaves a frame that ends beyond the end of the file, or a
header cut short: that torn tail was never acknowledged and is not part of the journal (a writer cuts it
off before appending). Every other defect (a bad CRC, a payload that does not match its SHA-256, an
unreadable first frame) is damage and raises StoreCorrupt: acknowledged rows are never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import StoreCorrupt

MAGIC = b"CXRJRNL1"
FORMAT = "cxr-embed-journal/1"
_HEAD = struct.Struct("<II32s")  # payload length, CRC-32 of the length bytes, SHA-256 of the payload
_COUNT = struct.Struct("<I")


@dataclass
class Batch:
    """One commit: rows (ids, metadata as JSON text, embeddings) and failures recorded with it."""

    ids: list[str]
    metadata: list[str]
    embeddings: np.ndarray  # (len(ids), dim) float32
    failed: dict[str, str] = field(default_factory=dict)


@dataclass
class Journal:
    """The valid part of a journal file: its batches, its size in bytes and a digest of its frames."""

    batches: list[Batch]
    size: int
    digest: str

    @property
    def rows(self) -> int:
        return sum(len(b.ids) for b in self.batches)


def journal_path(store: Path) -> Path:
    return store.with_name(store.name + ".journal")


def _frame(payload: bytes) -> bytes:
    n = len(payload).to_bytes(4, "little")
    return _HEAD.pack(len(payload), zlib.crc32(n), hashlib.sha256(payload).digest()) + payload


def encode_batch(batch: Batch) -> bytes:
    """A commit as one frame."""
    text = json.dumps({"ids": batch.ids, "metadata": batch.metadata, "failed": batch.failed}).encode("utf-8")
    embs = np.ascontiguousarray(batch.embeddings, dtype="<f4")
    return _frame(_COUNT.pack(len(text)) + text + embs.tobytes())


def _decode_batch(payload: bytes, dim: int) -> Batch:
    (n,) = _COUNT.unpack_from(payload)
    head = json.loads(payload[4 : 4 + n].decode("utf-8"))
    ids, meta, failed = head["ids"], head["metadata"], head["failed"]
    embs = np.frombuffer(payload, "<f4", offset=4 + n).astype(np.float32)
    if len(meta) != len(ids) or embs.size != len(ids) * dim or not isinstance(failed, dict):
        raise ValueError("its rows do not add up")
    return Batch(ids, meta, embs.reshape(len(ids), dim), failed)


def _frames(data: bytes, where: Path):
    """(offset after the frame, payload, its SHA-256) for each complete frame; stops at a torn tail."""
    pos = len(MAGIC)
    while len(data) - pos >= _HEAD.size:
        length, crc, sha = _HEAD.unpack_from(data, pos)
        if zlib.crc32(length.to_bytes(4, "little")) != crc:
            raise _damaged(where, f"frame header at byte {pos}")
        end = pos + _HEAD.size + length
        if end > len(data):
            return  # torn: the writer was stopped while appending this frame; it was never acknowledged
        payload = data[pos + _HEAD.size : end]
        if hashlib.sha256(payload).digest() != sha:
            raise _damaged(where, f"frame at byte {pos} does not match its checksum")
        yield end, payload, sha
        pos = end


def _damaged(path: Path, detail: str) -> StoreCorrupt:
    return StoreCorrupt(f"store journal {path} is damaged ({detail}); nothing was read from it. Restore the store "
                        "and its journal from a backup, or embed the images again")


def read_journal(path: Path, base: str, dim: int) -> Journal | None:
    """The journal at `path` if it applies to the HDF5 state `base`; None when there is none or it is
    left over from an earlier state. Raises StoreCorrupt for damage (a torn last frame is not damage)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _damaged(path, f"unreadable: {exc}") from exc
    if data[: len(MAGIC)] != MAGIC:
        raise _damaged(path, "not a cxr-embed journal")
    frames = _frames(data, path)
    try:
        end, first, _ = next(frames)
        head = json.loads(first.decode("utf-8"))
        if head.get("format") != FORMAT or "base" not in head:
            raise ValueError(f"format {head.get('format')!r}")
    except (StopIteration, ValueError, AttributeError) as exc:  # written whole (rename) before use: never torn
        raise _damaged(path, f"first frame: {type(exc).__name__} {exc}") from None
    if head["base"] != base:
        return None  # a fold replaced the HDF5 file after this journal was written: all of it is in there
    batches, digest = [], hashlib.sha256()
    for end, payload, sha in frames:
        try:
            batches.append(_decode_batch(payload, dim))
        except (ValueError, KeyError, TypeError, struct.error) as exc:
            raise _damaged(path, f"a frame of the right checksum but unreadable ({type(exc).__name__})") from None
        digest.update(sha)
    return Journal(batches, end, digest.hexdigest())


def fsync_dir(path: Path) -> None:
    """Make a rename or removal in the folder `path` durable (where the platform allows)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def start_journal(path: Path, base: str, first: bytes) -> int:
    """Write a new journal for the HDF5 state `base` holding the frame `first`, whole (temporary file,
    fsync, rename); a journal left over at `path` is replaced. Returns its size."""
    tmp = path.with_name(path.name + ".tmp")
    data = MAGIC + _frame(json.dumps({"format": FORMAT, "base": base}).encode("utf-8")) + first
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return len(data)


def append_frame(path: Path, size: int, frame: bytes) -> int:
    """Append `frame` to the journal whose valid part is `size` bytes, durably (fsync). Anything beyond
    `size` (a torn frame of a killed writer, a failed append) is cut off first; a failed append is cut
    off again before the error is raised. Returns the new size."""
    fd = os.open(path, os.O_WRONLY)
    try:
        if os.fstat(fd).st_size != size:
            os.ftruncate(fd, size)
        try:
            written = os.pwrite(fd, frame, size)
            while written < len(frame):
                written += os.pwrite(fd, frame[written:], size + written)
            os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)
    return size + len(frame)


def remove_journal(path: Path) -> None:
    """Remove a journal (and its temporary file) that a fold or a rewrite has made obsolete."""
    for p in (path, path.with_name(path.name + ".tmp")):
        try:
            p.unlink()
        except FileNotFoundError:
            continue
    fsync_dir(path.parent)
