"""Store integrity on real HDF5 files: flipped bytes, old formats, failed commits, removal of images."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from cxr_embed.errors import InvalidEmbedding, StaleIndex, StoreCorrupt, StoreTooNew, StoreWriteFailed, UnknownImageIds
from cxr_embed.index import EmbeddingIndex
from cxr_embed.store import (
    FORMAT,
    FORMAT_VERSION,
    LEGACY_FORMAT,
    Store,
    StoreWriter,
    UncheckedStoreWarning,
    merge_stores,
    remove_images,
    upgrade_store,
)

DIM = 64
IDENTITY = {"model_name": "test-model", "weights_hash": "0123456789abcdef", "preprocess_version": "cxr-pre-v1", "dim": DIM}


def _rows(prefix, n, seed):
    rng = np.random.default_rng(seed)
    return [(f"{prefix}-{i:04d}.dcm", rng.standard_normal(DIM).astype(np.float32), {"patient_id": f"{prefix}-PAT-{i}"})
            for i in range(n)]


def _write(path, rows, failed=(), commits=2):
    writer = StoreWriter(path, IDENTITY)
    for n, (image_id, emb, meta) in enumerate(rows):
        writer.add(image_id, emb, meta)
        if n % max(1, len(rows) // commits) == 0:
            writer.commit()
    for image_id in failed:
        writer.fail(image_id, "truncated_or_corrupt: ends early")
    writer.close()  # one HDF5 file, the journal folded in
    return path


def _write_legacy(path, rows, failed=()):
    """A store exactly as StoreWriter wrote it up to f17ef0b: vlen strings, no filters, no checksum."""
    text = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs["format"] = LEGACY_FORMAT
        for k, v in IDENTITY.items():
            f.attrs[k] = v
        f.attrs["created_at"] = f.attrs["updated_at"] = "2024-01-01T00:00:00Z"
        f.create_dataset("ids", data=[r[0] for r in rows], maxshape=(None,), dtype=text, chunks=(1024,))
        f.create_dataset("embeddings", data=np.stack([r[1] for r in rows]), maxshape=(None, DIM), chunks=(256, DIM))
        f.create_dataset("metadata", data=[json.dumps(r[2]) for r in rows], maxshape=(None,), dtype=text, chunks=(1024,))
        f.create_dataset("failed/ids", data=list(failed), maxshape=(None,), dtype=text, chunks=(256,))
        f.create_dataset("failed/errors", data=["truncated_or_corrupt: x"] * len(failed), maxshape=(None,), dtype=text, chunks=(256,))
    return path


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _chunk_offset(path, name):
    # get_offset() is None for a chunked dataset: ask for the first chunk's address instead
    with h5py.File(path, "r") as f:
        return f[name].id.get_chunk_info(0).byte_offset


@pytest.fixture
def store(tmp_path):
    return _write(tmp_path / "s.h5", _rows("keep", 30, 0) + _rows("gone", 5, 1), failed=["gone-0001.dcm", "bad.png"])


def test_a_fresh_store_carries_its_checksums(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Store(store)
    assert s.attrs["format"] == FORMAT and s.attrs["checksum"] == s.checksum and s.checksum.startswith("sha256:")
    assert len(s) == 35 and set(s.failed) == {"gone-0001.dcm", "bad.png"}
    assert np.array_equal(s.get(["keep-0003.dcm"])[0], _rows("keep", 30, 0)[3][1])
    with h5py.File(store, "r") as f:
        assert f["embeddings"].fletcher32 and f["ids/utf8"].fletcher32


def test_flipped_embedding_byte_is_a_damaged_store(store):
    _flip(store, _chunk_offset(store, "embeddings") + 100)
    s = Store(store)  # ids and metadata are intact; the damage surfaces when the vectors are read
    with pytest.raises(StoreCorrupt, match=f"store {store} is damaged.*backup"):
        s.embeddings()
    with pytest.raises(StoreCorrupt):
        EmbeddingIndex.build(s)


@pytest.mark.parametrize("column", ["ids/utf8", "metadata/utf8", "metadata/ends", "failed/errors/utf8"])
def test_flipped_text_byte_is_a_damaged_store(store, column):
    _flip(store, _chunk_offset(store, column) + 3)
    with pytest.raises(StoreCorrupt, match=str(store)):
        Store(store)


def test_flipped_attribute_is_a_damaged_store(store):
    offset = store.read_bytes().index(b"0123456789abcdef")  # the weights hash, in a checksummed object header
    _flip(store, offset + 4)
    with pytest.raises(StoreCorrupt, match="metadata checksum"):
        Store(store)


@pytest.mark.parametrize("edit", ["attribute", "id"])
def test_edits_behind_the_stores_back_are_a_checksum_mismatch(store, edit):
    with h5py.File(store, "a") as f:  # valid HDF5 throughout: only our SHA-256 can tell
        if edit == "attribute":
            f.attrs["model_name"] = np.bytes_(b"another-model")
        else:
            f["ids/utf8"][0] = ord("K")
    with pytest.raises(StoreCorrupt, match="checksum mismatch"):
        Store(store)


def test_no_flipped_byte_is_ever_returned_as_data(store):
    """Flip single bytes all over the file: each read either fails typed or returns the exact original."""
    ref = Store(store)
    before = (ref.ids, ref._meta_raw, ref.failed, ref.attrs, ref.embeddings())
    raw = store.read_bytes()
    damaged, offsets = store.with_name("d.h5"), np.random.default_rng(0).choice(len(raw), 150, replace=False)
    outcomes = {"corrupt": 0, "same": 0}
    for offset in offsets:
        damaged.write_bytes(raw[:offset] + bytes([raw[offset] ^ 0xFF]) + raw[offset + 1:])
        try:
            s = Store(damaged)
            after = (s.ids, s._meta_raw, s.failed, s.attrs, s.embeddings())
        except StoreCorrupt:
            outcomes["corrupt"] += 1
            continue
        assert after[:4] == before[:4] and np.array_equal(after[4], before[4]), f"offset {offset} changed the data"
        outcomes["same"] += 1
    assert outcomes["corrupt"] > 100


def test_newer_format_is_refused(store):
    with h5py.File(store, "a") as f:
        f.attrs["format"] = "cxr-embed-store/7"
    with pytest.raises(StoreTooNew, match="newer cxr-embed; upgrade"):
        Store(store)


def test_legacy_store_warns_then_upgrades_in_place(tmp_path):
    rows = _rows("old", 12, 2)
    path = _write_legacy(tmp_path / "old.h5", rows, failed=["lost.png"])
    with pytest.warns(UncheckedStoreWarning, match="no checksum"):
        old = Store(path)
    assert old.version == 1 and old.ids == [r[0] for r in rows]
    assert upgrade_store(path) == path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = Store(path)
    assert new.version == FORMAT_VERSION and new.ids == old.ids and new.failed == {"lost.png": "truncated_or_corrupt: x"}
    assert np.array_equal(new.embeddings(), old.embeddings()) and new.attrs["created_at"] == "2024-01-01T00:00:00Z"
    assert not path.with_name("old.h5.tmp").exists()


def test_writer_and_merge_upgrade_a_legacy_store(tmp_path):
    legacy = _write_legacy(tmp_path / "old.h5", _rows("old", 6, 3))
    current = _write(tmp_path / "new.h5", _rows("new", 4, 4))
    with pytest.warns(UncheckedStoreWarning):
        merged = merge_stores([legacy, current], tmp_path / "m.h5")
        writer = StoreWriter(legacy, IDENTITY)
    assert merged.version == FORMAT_VERSION and len(merged) == 10
    writer.add("extra.dcm", np.ones(DIM), {})
    writer.commit()
    appended = Store(legacy)
    assert appended.version == FORMAT_VERSION and len(appended) == 7 and appended.checksum == appended.attrs["checksum"]


def test_bad_utf8_in_a_legacy_heap_is_a_damaged_store(tmp_path):
    path = _write_legacy(tmp_path / "old.h5", _rows("old", 3, 5))
    data = bytearray(path.read_bytes())
    data[data.index(b"old-0001.dcm")] = 0xFF  # not a valid UTF-8 start byte
    path.write_bytes(bytes(data))
    with pytest.raises(StoreCorrupt, match="UnicodeDecodeError"):
        Store(path)


def test_writer_refuses_non_finite_or_misshapen_embeddings(tmp_path):
    writer = StoreWriter(tmp_path / "s.h5", IDENTITY)
    bad = np.ones(DIM, np.float32)
    bad[7] = np.nan
    with pytest.raises(InvalidEmbedding, match="NaN"):
        writer.add("nan.dcm", bad, {})
    bad[7] = np.inf
    with pytest.raises(InvalidEmbedding, match="NaN or infinite"):
        writer.add("inf.dcm", bad, {})
    with pytest.raises(InvalidEmbedding, match="shape"):
        writer.add("short.dcm", np.ones(DIM - 1), {})
    writer.add("fine.dcm", np.ones(DIM), {})
    writer.commit()
    assert Store(tmp_path / "s.h5").ids == ["fine.dcm"]


def test_a_store_under_a_file_is_refused_when_its_writer_opens(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    with pytest.raises(StoreWriteFailed, match=f"could not write store {blocker / 's.h5'}"):
        StoreWriter(blocker / "s.h5", IDENTITY)  # its lock file cannot be made: before any work is done
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_a_folder"]


FULL_DISK = """
import resource, signal, sys
import numpy as np
from cxr_embed.errors import StoreWriteFailed
from cxr_embed.store import StoreWriter
path, limit = sys.argv[1], int(sys.argv[2])
writer = StoreWriter(path, {identity!r})
for n in range(2000):
    writer.add(f"big-{{n}}.dcm", np.full({dim}, n, np.float32), {{"n": n}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
try:
    writer.commit()
except StoreWriteFailed as exc:
    print("StoreWriteFailed:", exc)
"""


def test_full_disk_keeps_the_previous_store_and_no_temporary(store):
    """A real write failure from the kernel: under a file size limit write(2) fails with EFBIG. It runs in
    a child process because HDF5 keeps a broken handle after a failed write; the CLI exits and resumes."""
    before = Store(store)
    script = FULL_DISK.format(identity=IDENTITY, dim=DIM)
    proc = subprocess.run([sys.executable, "-c", script, str(store), str(store.stat().st_size + 50_000)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0 and f"StoreWriteFailed: could not write store {store}" in proc.stdout, proc.stderr[-2000:]
    assert "is unchanged" in proc.stdout
    assert not store.with_name("s.h5.tmp").exists()
    assert Store(store).checksum == before.checksum
    writer = StoreWriter(store, IDENTITY)  # the rerun: the batch goes in once there is room
    writer.add("late.dcm", np.ones(DIM), {})
    writer.commit()
    assert len(Store(store)) == len(before) + 1


def test_failed_rename_keeps_the_previous_store(store, monkeypatch):
    before = Store(store).checksum
    writer = StoreWriter(store, IDENTITY)
    writer.add("late.dcm", np.ones(DIM), {})

    def no_space(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(StoreWriteFailed, match="No space left"):
        writer.commit()
    assert Store(store).checksum == before and not store.with_name("s.h5.tmp").exists()


def test_removed_images_leave_no_trace_in_the_file_or_index(store):
    gone = [r[0] for r in _rows("gone", 5, 1)]
    gone_bytes = [r[1].tobytes() for r in _rows("gone", 5, 1)] + [g.encode() for g in gone] + [b"gone-PAT"]
    index_path = store.with_name("s.faiss")
    EmbeddingIndex.build(store).save(index_path)
    raw = store.read_bytes()
    assert all(b in raw for b in gone_bytes)  # else the check below proves nothing
    report = remove_images(store, gone + ["bad.png"])
    assert report.removed == gone and report.removed_failures == ["gone-0001.dcm", "bad.png"] and report.remaining == 30
    raw = store.read_bytes()
    assert not [b for b in gone_bytes if b in raw]
    s = Store(store)
    assert s.checksum == report.checksum and s.failed == {} and s.ids == [r[0] for r in _rows("keep", 30, 0)]
    assert np.array_equal(s.embeddings(), np.stack([r[1] for r in _rows("keep", 30, 0)]))
    with pytest.raises(StaleIndex, match="rebuild"):
        EmbeddingIndex.load(index_path, s)
    rebuilt = EmbeddingIndex.load_or_build(index_path, s)
    assert rebuilt.ids == s.ids and EmbeddingIndex.load(index_path, s).ids == s.ids
    index_bytes = index_path.read_bytes() + index_path.with_name("s.faiss.json").read_bytes()
    assert not [b for b in gone_bytes if b in index_bytes]


def test_removing_unknown_ids_removes_nothing(store):
    raw = store.read_bytes()
    with pytest.raises(UnknownImageIds, match="2 of the 3 .*'nobody.dcm'.*nothing was removed"):
        remove_images(store, ["keep-0001.dcm", "nobody.dcm", "nobody-else.dcm"])
    assert store.read_bytes() == raw


def test_damaged_or_foreign_index_files_are_typed(store, tmp_path):
    path = tmp_path / "i.faiss"
    side = tmp_path / "i.faiss.json"
    EmbeddingIndex.build(store).save(path)
    assert len(EmbeddingIndex.load(path, store)) == 35
    good = path.read_bytes()
    _flip(path, len(good) // 2)
    with pytest.raises(StoreCorrupt, match="i.faiss does not match"):
        EmbeddingIndex.load(path)
    path.write_bytes(good)
    side.write_text(side.read_text().replace("keep-0002", "keep-0003"))
    with pytest.raises(StoreCorrupt, match="does not match its checksum"):
        EmbeddingIndex.load(path)
    side.write_bytes(b"\x89HDF\r\n\x1a\n not json")
    with pytest.raises(StoreCorrupt, match="rebuild it"):
        EmbeddingIndex.load(path)
