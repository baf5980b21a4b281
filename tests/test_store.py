"""The `cxr-embed embed` job and the HDF5 store: real files, a real CLI, real kills."""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from cxr_embed import EmbeddingIndex, ModelMismatch, Store, StoreWriter, create_model, save_checkpoint
from cxr_embed.cli import main


def _csv(tmp_path, shared, n, name="imgs.csv", extra_bad=()):
    rows = list(csv.DictReader(open(shared / "tasks" / "nih_pneumonia.csv")))[:n]
    path = tmp_path / name
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "patient_id"])
        for r in rows:
            w.writerow([r["image"], r["label"], r["patient_id"]])
        for b in extra_bad:
            w.writerow([b, "0", "x"])
    return path


def test_embed_csv_store_info_and_resume(tmp_path, shared, capsys):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 30)
    labels = _csv(tmp_path, shared, 12, extra_bad=[str(bad), "images/nih/does_not_exist.jpg"])
    out = tmp_path / "s.h5"
    args = ["embed", "--images", str(labels), "--image-root", str(shared), "--out", str(out),
            "--model", "imagenet-effnet-lite0", "--batch-size", "5", "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "embedded 12 new image(s)" in text and "2 failed" in text and "does_not_exist" in text
    cpu = float(re.search(r"img/s; ([\d.]+) CPU s per image\)", text).group(1))
    assert 0 < cpu < 60  # this process's CPU over the embedding, per image: a real measurement, not a constant
    store = Store(out)
    assert len(store) == 12 and len(store.failed) == 2
    assert store.failed[str(bad)].startswith("truncated_or_corrupt")
    assert store.attrs["model_name"] == "imagenet-effnet-lite0" and store.dim == 1280
    assert len(store.attrs["weights_hash"]) == 16 and store.attrs["preprocess_version"].startswith("cxr-pre-v1")
    meta = store.metadata(store.ids[0])
    assert {"label", "patient_id", "findings"} <= set(meta) and meta["findings"]["source_format"] == "jpeg"
    with h5py.File(out) as f:
        assert f["embeddings"].chunks is not None and f["embeddings"].dtype == np.float32
    before = store.embeddings()
    # second run: nothing new to embed, the failures are retried and still listed
    assert main(args) == 0
    assert "embedded 0 new image(s)" in capsys.readouterr().out
    assert np.array_equal(Store(out).embeddings(), before)
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "images:             12" in info and "failed:             2" in info


def test_store_refuses_another_model(tmp_path, samples):
    out = tmp_path / "s.h5"
    assert main(["embed", "--images", str(samples), "--out", str(out), "--model", "imagenet-effnet-lite0", "--no-progress"]) == 0
    other = create_model("imagenet-effnet-lite0")
    other.name = "another-model"
    ckpt = save_checkpoint(other, tmp_path / "other.safetensors", half=True)
    code = main(["embed", "--images", str(samples), "--out", str(out), "--model", str(ckpt), "--no-progress"])
    assert code == 2
    with pytest.raises(ModelMismatch, match="different model"):
        StoreWriter(out, create_model(str(ckpt)).identity)


def test_folder_input_ids_are_relative_paths(tmp_path, samples):
    out = tmp_path / "s.h5"
    assert main(["embed", "--images", str(samples), "--out", str(out), "--no-progress",
                 "--model", "imagenet-effnet-lite0"]) == 0
    assert sorted(Store(out).ids) == sorted(p.name for p in samples.glob("*.jpg"))


def test_sigkill_never_loses_reported_batches(tmp_path, shared):
    """Kill the real CLI with SIGKILL mid-run, several times; the store always opens and holds
    at least every image reported saved; a final run completes it without duplicates."""
    labels = _csv(tmp_path, shared, 120)
    out = tmp_path / "kill.h5"
    cmd = [sys.executable, "-m", "cxr_embed", "embed", "--images", str(labels), "--image-root", str(shared),
           "--out", str(out), "--model", "imagenet-effnet-lite0", "--batch-size", "4", "--commit-every", "0"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    rng = np.random.default_rng(0)
    for attempt in range(3):
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
        reported, deadline, buf = 0, time.time() + 120, b""
        wait_for = int(rng.integers(1, 4))
        seen_commits = 0
        os.set_blocking(proc.stderr.fileno(), False)
        while time.time() < deadline and proc.poll() is None:
            chunk = proc.stderr.read() or b""
            buf += chunk
            found = [int(x) for x in re.findall(rb"saved=(\d+)", buf)]
            if found:
                if found[-1] > reported:
                    seen_commits += 1
                reported = max(reported, found[-1])
            if seen_commits >= wait_for:
                time.sleep(float(rng.uniform(0.0, 1.0)))  # land anywhere, mid-commit included
                break
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            store = Store(out)
            assert len(store) >= reported
            assert len(set(store.ids)) == len(store.ids)
            store.embeddings()
    subprocess.run(cmd + ["--no-progress"], check=True, stdout=subprocess.DEVNULL, env=env)
    final = Store(out)
    assert len(final) == 120 and len(set(final.ids)) == 120


def test_merge_and_faiss_index(tmp_path, shared):
    labels = _csv(tmp_path, shared, 10)
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    common = ["--image-root", str(shared), "--model", "imagenet-effnet-lite0", "--no-progress"]
    rows = open(labels).read().splitlines()
    (tmp_path / "p1.csv").write_text("\n".join(rows[:6]) + "\n")
    (tmp_path / "p2.csv").write_text("\n".join([rows[0]] + rows[5:]) + "\n")  # one image in both
    assert main(["embed", "--images", str(tmp_path / "p1.csv"), "--out", str(a), *common]) == 0
    assert main(["embed", "--images", str(tmp_path / "p2.csv"), "--out", str(b), *common]) == 0
    merged = tmp_path / "m.h5"
    assert main(["merge", "--out", str(merged), str(a), str(b)]) == 0
    store = Store(merged)
    assert len(store) == 10
    index = EmbeddingIndex.build(store)
    first = store.ids[0]
    hits = index.search(store.get([first]), k=3)[0]
    assert hits[0].image_id == first and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
    by_id = index.search_by_id(first, k=3)
    assert len(by_id) == 3 and first not in [h.image_id for h in by_id]
    assert by_id[0].metadata["label"] in ("0", "1")
    index.save(tmp_path / "idx.faiss")
    again = EmbeddingIndex.load(tmp_path / "idx.faiss")
    assert [h.image_id for h in again.search_by_id(first, k=3)] == [h.image_id for h in by_id]


@pytest.mark.slow
def test_torchrun_two_processes_write_shards(tmp_path, shared):
    labels = _csv(tmp_path, shared, 10)
    out = tmp_path / "dist.h5"
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun not on PATH")
    proc = subprocess.run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "cxr_embed", "embed", "--images", str(labels),
         "--image-root", str(shared), "--out", str(out), "--model", "imagenet-effnet-lite0", "--no-progress",
         "--device", "cpu"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(tmp_path.glob("dist.rank*-of-002.h5"))
    assert len(shards) == 2 and "cxr-embed merge" in proc.stdout
    assert sorted(len(Store(s)) for s in shards) == [5, 5]
    assert main(["merge", "--out", str(out), *map(str, shards)]) == 0
    assert len(Store(out)) == 10


def test_store_remove_command_removes_for_good(samples, tmp_path, capsys):
    out = tmp_path / "s.h5"
    assert main(["embed", "--images", str(samples), "--out", str(out), "--model", "imagenet-effnet-lite0",
                 "--no-progress"]) == 0
    before = Store(out)
    gone = before.ids[0]
    vector = before.get([gone])[0].tobytes()
    assert main(["store", "remove", str(out), "--ids", gone]) == 0
    after = Store(out)
    assert gone not in after and len(after) == len(before) - 1
    raw = out.read_bytes()
    assert gone.encode() not in raw and vector not in raw  # not merely unlinked: the bytes are gone
    assert main(["store", "remove", str(out), "--ids", "no/such/image.jpg"]) == 2
    assert "no/such/image.jpg" in capsys.readouterr().err and len(Store(out)) == len(after)
