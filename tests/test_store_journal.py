"""The store's commit journal on real files: commits append instead of copying the store, folds,
torn and damaged frames, journals left behind by a crash, and writers killed with SIGKILL mid-commit."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from cxr_embed.errors import StaleIndex, StoreBusy, StoreCorrupt, StoreError
from cxr_embed.index import EmbeddingIndex
from cxr_embed.journal import journal_path
from cxr_embed.store import FORMAT, Store, StoreWriter, content_checksum, remove_images
from test_store_integrity import DIM, IDENTITY, _flip, _rows, _write


def _add(writer, rows, commit_each=1):
    for n, (image_id, emb, meta) in enumerate(rows):
        writer.add(image_id, emb, meta)
        if (n + 1) % commit_each == 0:
            writer.commit()
    writer.commit()


def _same(a: Store, b: Store):
    assert a.ids == b.ids and a._meta_raw == b._meta_raw and a.failed == b.failed
    assert np.array_equal(a.embeddings(), b.embeddings())


@pytest.fixture
def store(tmp_path):
    return _write(tmp_path / "s.h5", _rows("base", 20, 0), failed=["retry-0001.dcm", "bad.png"])


def test_commits_append_to_the_journal_and_close_folds_it(store):
    file_bytes = store.read_bytes()
    index = EmbeddingIndex.build(store)
    writer = StoreWriter(store, IDENTITY)
    _add(writer, _rows("new", 6, 1), commit_each=2)
    writer.add("retry-0001.dcm", np.ones(DIM), {"second": "try"})  # a failed image, stored on a resend
    writer.fail("broken.dcm", "truncated_or_corrupt: ends early")
    writer.commit()
    assert store.read_bytes() == file_bytes  # nothing of the file was copied or rewritten
    s = Store(store)
    expected = [r[0] for r in _rows("base", 20, 0) + _rows("new", 6, 1)] + ["retry-0001.dcm"]
    assert s.ids == expected and len(s.journal.batches) == 4 and s.metadata("retry-0001.dcm") == {"second": "try"}
    assert s.failed == {"bad.png": "truncated_or_corrupt: ends early", "broken.dcm": "truncated_or_corrupt: ends early"}
    assert np.array_equal(s.get(["new-0003.dcm", "base-0002.dcm"]),
                          np.stack([_rows("new", 6, 1)[3][1], _rows("base", 20, 0)[2][1]]))
    assert np.array_equal(np.concatenate(list(s.blocks(7))), s.embeddings())
    assert s.checksum != s.attrs["checksum"] and "journal:            7 image(s)" in s.summary()
    with pytest.raises(StaleIndex):
        index.check_fresh(s)
    writer.close()
    assert not journal_path(store).exists()
    folded = Store(store)
    _same(folded, s)
    assert folded.journal is None and folded.checksum == folded.attrs["checksum"] and folded.attrs["format"] == FORMAT


def test_the_journal_is_folded_in_once_it_is_large(store):
    writer = StoreWriter(store, IDENTITY, fold_at_bytes=3000)  # about 10 rows of 64 floats and their text
    largest = 0
    for row in _rows("new", 30, 2):
        writer.add(*row)
        writer.commit()
        largest = max(largest, journal_path(store).stat().st_size if journal_path(store).exists() else 0)
    with h5py.File(store, "r") as f:
        assert f["embeddings"].shape[0] >= 40  # folded along the way
    assert 0 < largest < 3000 + 500  # one frame past the threshold at most
    assert Store(store).ids == [r[0] for r in _rows("base", 20, 0) + _rows("new", 30, 2)]


def test_a_torn_last_frame_is_not_part_of_the_store(store):
    writer = StoreWriter(store, IDENTITY)
    _add(writer, _rows("new", 4, 3), commit_each=2)
    acknowledged = Store(store)
    path = journal_path(store)
    whole = path.read_bytes()
    writer.add("torn.dcm", np.ones(DIM), {})
    writer.commit()
    path.write_bytes(path.read_bytes()[: len(whole) + 50])  # as a writer killed while appending leaves it
    _same(Store(store), acknowledged)
    del writer  # killed: its lock goes with it
    again = StoreWriter(store, IDENTITY)  # cuts the torn frame off before appending
    again.add("after.dcm", np.full(DIM, 2.0), {})
    again.commit()
    s = Store(store)
    assert s.ids == acknowledged.ids + ["after.dcm"] and np.array_equal(s.get(["after.dcm"])[0], np.full(DIM, 2.0))


@pytest.mark.parametrize("where", ["payload", "length", "first frame"])
def test_a_damaged_journal_is_a_damaged_store(store, where):
    writer = StoreWriter(store, IDENTITY)
    _add(writer, _rows("new", 4, 4), commit_each=2)
    path = journal_path(store)
    data = path.read_bytes()
    first_end = 8 + 40 + int.from_bytes(data[8:12], "little")
    second = first_end + 40 + int.from_bytes(data[first_end : first_end + 4], "little")
    offset = {"payload": first_end + 40 + 10, "length": second + 1, "first frame": 8 + 40 + 5}[where]
    _flip(path, offset)  # a length flipped upwards must not pass for a torn tail: acknowledged rows follow
    del writer  # killed: its lock goes with it
    with pytest.raises(StoreCorrupt, match=f"store journal {path} is damaged"):
        Store(store)
    with pytest.raises(StoreCorrupt):
        StoreWriter(store, IDENTITY)


def test_a_journal_left_by_a_crash_after_a_fold_is_ignored(store):
    writer = StoreWriter(store, IDENTITY)
    _add(writer, _rows("new", 5, 5), commit_each=2)
    left = journal_path(store).read_bytes()
    writer.close()
    folded = Store(store)
    journal_path(store).write_bytes(left)  # as if killed between the fold's rename and the journal's removal
    _same(Store(store), folded)
    later = StoreWriter(store, IDENTITY)
    later.add("later.dcm", np.ones(DIM), {})
    later.commit()  # replaces the old journal
    assert Store(store).ids == folded.ids + ["later.dcm"]


def test_removal_takes_rows_out_of_the_journal_too(store):
    writer = StoreWriter(store, IDENTITY)
    gone = _rows("gone", 3, 6)
    _add(writer, gone + _rows("kept", 2, 7), commit_each=2)
    del writer  # killed before its fold: the rows are in the journal
    report = remove_images(store, [r[0] for r in gone])
    assert report.removed == [r[0] for r in gone] and not journal_path(store).exists()
    raw = b"".join(p.read_bytes() for p in store.parent.iterdir())
    assert not [r for r in gone if r[0].encode() in raw or r[1].tobytes() in raw]
    assert Store(store).ids[-2:] == ["kept-0000.dcm", "kept-0001.dcm"]


def test_a_store_of_format_2_is_rewritten_before_journaling(store):
    s = Store(store)
    attrs = {**s.attrs, "format": "cxr-embed-store/2"}
    columns = {"ids": s.ids, "metadata": s._meta_raw, "failed/ids": list(s.failed), "failed/errors": list(s.failed.values())}
    with h5py.File(store, "a") as f:  # exactly what the previous version wrote
        f.attrs["format"] = np.bytes_(b"cxr-embed-store/2")
        f.attrs["checksum"] = np.bytes_(content_checksum(attrs, columns).encode())
    assert Store(store).version == 2
    writer = StoreWriter(store, IDENTITY)
    writer.add("x.dcm", np.ones(DIM), {})
    writer.commit()
    after = Store(store)
    assert after.attrs["format"] == FORMAT and after.journal is None and after.ids == s.ids + ["x.dcm"]


FULL_JOURNAL = """
import resource, signal, sys
import numpy as np
from cxr_embed.errors import StoreWriteFailed
from cxr_embed.journal import journal_path
from cxr_embed.store import StoreWriter
path = sys.argv[1]
writer = StoreWriter(path, {identity!r})
writer.add("first.dcm", np.ones({dim}, np.float32), {{}})
writer.commit()
size = journal_path(writer.path).stat().st_size
for n in range(200):
    writer.add(f"late-{{n}}.dcm", np.full({dim}, n, np.float32), {{"n": n}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 5000, hard))  # the frame is written in part, then EFBIG
try:
    writer.commit()
except StoreWriteFailed as exc:
    print("StoreWriteFailed:", exc)
print("journal size", size, journal_path(writer.path).stat().st_size)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
writer.commit()  # the batch stayed pending
"""


def test_a_failed_append_leaves_the_store_and_its_journal_as_they_were(store):
    before = Store(store)
    proc = subprocess.run([sys.executable, "-c", FULL_JOURNAL.format(identity=IDENTITY, dim=DIM), str(store)],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"StoreWriteFailed: could not write store {store}" in proc.stdout and "is unchanged" in proc.stdout
    size, after_failure = proc.stdout.split("journal size ")[1].split()
    assert size == after_failure  # the part written was cut off again
    s = Store(store)
    assert s.ids == before.ids + ["first.dcm"] + [f"late-{n}.dcm" for n in range(200)]
    assert np.array_equal(s.get(["late-199.dcm"])[0], np.full(DIM, 199, np.float32))


KILLED_WRITER = """
import sys
import numpy as np
from cxr_embed.store import StoreWriter
path, fold_at, start = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
writer = StoreWriter(path, {identity!r}, fold_at_bytes=fold_at)
for n in range(start, start + 100000):
    for k in range(8):
        i = 8 * n + k
        writer.add(f"row-{{i:07d}}.dcm", np.full({dim}, i, np.float32), {{"i": i, "pad": "x" * 3000}})
    writer.fail(f"failed-{{n:07d}}.dcm", "truncated_or_corrupt: ends early")
    writer.commit()
    print(n, flush=True)  # acknowledged: every row of commit n is durable
"""


def test_sigkill_mid_commit_keeps_every_acknowledged_commit(tmp_path):
    """Writers killed at random moments (mid-append, mid-fsync, mid-fold): the store always opens, its
    checksums verify, and it holds every acknowledged commit, row for row."""
    path = tmp_path / "k.h5"
    script = KILLED_WRITER.format(identity=IDENTITY, dim=DIM)
    rng, acknowledged = np.random.default_rng(0), -1
    for attempt in range(4):
        fold_at = 200_000 if attempt % 2 else 10**9  # every other writer folds every few commits
        start = acknowledged + 1
        proc = subprocess.Popen([sys.executable, "-c", script, str(path), str(fold_at), str(start)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).parents[1])
        deadline = time.time() + 60
        while time.time() < deadline and acknowledged < start + 2:  # a few commits in, then anywhere
            line = proc.stdout.readline()
            if not line:
                break
            acknowledged = int(line)
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        assert acknowledged >= start + 2, err[-2000:]
        acknowledged = max([acknowledged] + [int(x) for x in out.split()])
        s = Store(path)  # opens: the file's and the journal's checksums verify
        n_rows = 8 * (acknowledged + 1)
        assert {f"row-{i:07d}.dcm" for i in range(n_rows)} <= set(s.ids), attempt
        assert {f"failed-{n:07d}.dcm" for n in range(acknowledged + 1)} <= set(s.failed)
        rows = [s.row(f"row-{i:07d}.dcm") for i in range(0, n_rows, 5)]
        assert np.array_equal(s.embeddings(rows)[:, 0], np.arange(0, n_rows, 5, dtype=np.float32))
        assert s.metadata(f"row-{n_rows - 1:07d}.dcm") == {"i": n_rows - 1, "pad": "x" * 3000}
    final = StoreWriter(path, IDENTITY)
    final.close()
    s = Store(path)
    assert s.journal is None and len(set(s.ids)) == len(s.ids) >= 8 * (acknowledged + 1)
    assert np.array_equal(s.embeddings()[:, 0], np.array([int(i[4:11]) for i in s.ids], np.float32))


HOLDING_WRITER = """
import sys, time
import numpy as np
from cxr_embed.store import StoreWriter
writer = StoreWriter(sys.argv[1], {identity!r})
writer.add("theirs.dcm", np.full({dim}, 7.0, np.float32), {{}})
writer.commit()
print("committed", flush=True)
time.sleep(600)
"""


def test_one_writer_at_a_time_across_processes_until_the_holder_dies(store):
    """Two writers on one store used to fold each other's commits away and damage its journal: a
    second writer (another process, or this one) is refused with StoreBusy and changes nothing; the
    lock goes with its holder, however it ends (SIGKILL here)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDING_WRITER.format(identity=IDENTITY, dim=DIM), str(store)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert proc.stdout.readline().strip() == "committed", proc.stderr.read()[-2000:]
        before = Store(store)
        journal = journal_path(store).read_bytes()
        with pytest.raises(StoreBusy, match=f"store {store} is being written by another process or writer "
                                            r"\(it holds s.h5.lock\)"):
            StoreWriter(store, IDENTITY)
        with pytest.raises(StoreBusy):
            remove_images(store, ["base-0000.dcm"])  # its rewrite would be undone by the holder's next fold
        _same(Store(store), before)  # readers need no lock
        assert journal_path(store).read_bytes() == journal and "theirs.dcm" in before.ids
    finally:
        proc.kill()
        proc.wait()
    writer = StoreWriter(store, IDENTITY)  # the holder is gone: its lock too; its commit is kept
    writer.add("mine.dcm", np.ones(DIM), {})
    with pytest.raises(StoreBusy):
        StoreWriter(store, IDENTITY)  # a second writer in the same process is refused as well
    writer.close()
    s = Store(store)
    assert s.ids[-2:] == ["theirs.dcm", "mine.dcm"] and np.array_equal(s.get(["theirs.dcm"])[0], np.full(DIM, 7.0))
    with pytest.raises(StoreError, match="this writer of store .* is closed"):
        writer.add("late.dcm", np.ones(DIM), {})
        writer.commit()
    again = StoreWriter(store, IDENTITY)  # close let the lock go
    again.close()


def test_another_name_for_the_store_finds_the_same_lock_and_the_same_file(store, tmp_path):
    """A symlink to a held store (or to its folder) passed the lock, read the store without its journal
    and replaced the link by a file of its own: two stores where there was one (an attacker's second
    review). The lock is beside the real file, and a writer through a link writes the real file."""
    link = tmp_path / "link.h5"
    link.symlink_to(store)
    (tmp_path / "folder-link").symlink_to(store.parent, target_is_directory=True)
    holder = StoreWriter(store, IDENTITY)
    for other in (link, tmp_path / "folder-link" / store.name):
        with pytest.raises(StoreBusy):
            StoreWriter(other, IDENTITY)
        with pytest.raises(StoreBusy):
            remove_images(other, ["base-0000.dcm"])
    holder.close()
    writer = StoreWriter(link, IDENTITY)
    writer.add("through-link.dcm", np.ones(DIM), {})
    writer.close()
    assert link.is_symlink() and "through-link.dcm" in Store(store).ids
