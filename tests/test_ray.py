"""`cxr-embed embed --ray`: on a local Ray instance, the same store as the single-process job.

Real images (16 of the TB task, a real CR DICOM), a real multi-frame DICOM and a missing file (both
recorded as failed), a real local Ray instance: the driver and the actors are real processes. The
instance is declared with 4 logical CPUs for 2 one-CPU actors (cxr_embed.distributed.DATA_CPUS: with
every CPU held by an actor, Ray Data's own tasks wait forever). Every test checks that the Ray
processes it started are gone afterwards.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cxr_embed.batch import embed_to_store, list_inputs
from cxr_embed.distributed import RayPlan, actor_name, embed_on_ray, ray_session, shard_folder
from cxr_embed.errors import ConfigError, ModelMismatch
from cxr_embed.runtime import RuntimeSettings
from cxr_embed.store import Store

ROOT = Path(__file__).resolve().parents[1]
RAY_MARKERS = ("ray::", "/ray/core/src/ray/", "/site-packages/ray/")  # Ray's daemons, agents and workers
RUN_S = 900  # a whole job on a busy 2-core machine takes one to two minutes


def need_ray():
    try:
        import ray  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI installs the dev extra, which includes ray[data]")
        pytest.skip("ray is not installed (pip install 'cxr-embed[ray]')")


def ray_processes() -> dict[int, int]:
    """Ray's processes on this machine: pid -> session id."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            session = int((d / "stat").read_text().rsplit(")", 1)[1].split()[3])
        except (OSError, IndexError, ValueError):
            continue
        if any(m in cmd for m in RAY_MARKERS):
            found[int(d.name)] = session
    return found


def assert_ray_gone(before: dict[int, int], timeout: float = 90) -> None:
    """Every Ray process started since `before` has exited."""
    deadline = time.monotonic() + timeout
    while (left := set(ray_processes()) - set(before)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"Ray processes left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def image_csv(shared, dcm_dir, tmp_path_factory) -> Path:
    rows = list(csv.DictReader(open(shared / "tasks" / "tb_shenzhen_mc.csv", encoding="utf-8")))[:16]
    path = tmp_path_factory.mktemp("ray") / "images.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        w.writerows([str(shared / r["image"]), r["label"]] for r in rows)
        w.writerow([str(dcm_dir / "RG1_UNCR.dcm"), "0"])  # a real CR chest
        w.writerow([str(dcm_dir / "liver.dcm"), "0"])  # real, multi-frame: recorded as failed
        w.writerow([str(shared / "images" / "no-such-image.jpg"), "1"])  # missing: recorded as failed
    return path


@pytest.fixture(scope="module")
def single_store(image_csv, tmp_path_factory) -> Store:
    """The single-process job's store (the shipped model, as `cxr-embed embed` with no options)."""
    from cxr_embed import Embedder

    out = tmp_path_factory.mktemp("single") / "single.h5"
    embedder = Embedder(batch_size=32)
    summary = embed_to_store(list_inputs(image_csv), out, embedder, progress=False)
    embedder.close()
    assert summary.embedded == 17 and len(summary.failed) == 2, summary.text()
    return Store(out)


def assert_same_store(path: Path, single: Store) -> None:
    """Same ids (once each), model identity, metadata and failures; embeddings within 1e-5."""
    store = Store(path)  # refuses a store holding an id twice (StoreCorrupt)
    assert sorted(store.ids) == sorted(single.ids) and len(set(store.ids)) == len(store.ids)
    assert store.identity == single.identity and store.attrs["format"] == single.attrs["format"]
    assert store.failed == single.failed
    assert all(store.metadata(i) == single.metadata(i) for i in single.ids)
    diff = np.abs(store.get(single.ids) - single.get(single.ids)).max()
    assert diff <= 1e-5, diff


def embed_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxr_embed", "embed", "--no-progress", *args]


def test_ray_plans_leave_room_for_ray_data_and_refuse_what_a_cluster_cannot_hold():
    assert (RayPlan("local").resolve(2, 0, local=True).actors, RayPlan("local").resolve(2, 0, local=True).actor_cpus) \
        == (1, 2)
    assert RayPlan("local", actors=2).resolve(2, 0, local=True).actor_cpus == 1
    cluster = RayPlan("auto").resolve(16, 0, local=False)  # 2 of the 16 CPUs stay with Ray Data
    assert (cluster.actors, cluster.actor_cpus) == (7, 2)
    cluster.check_fits(16, 0)
    assert RayPlan("auto", actor_gpus=1).resolve(32, 4, local=False).actors == 4
    with pytest.raises(ConfigError, match="need 6 CPUs"):
        RayPlan("auto", actors=2, actor_cpus=2).check_fits(4, 0)  # the case that waits forever
    with pytest.raises(ConfigError, match="has 0 GPU"):
        RayPlan("auto", actor_gpus=1).resolve(8, 0, local=False)


def test_without_ray_the_command_says_how_to_install_it_and_the_library_never_imports_it(image_csv, tmp_path):
    out = tmp_path / "never.h5"
    blocked = ("import sys; sys.modules['ray'] = None; from cxr_embed.cli import main; "
               f"sys.exit(main(['embed', '--images', {str(image_csv)!r}, '--out', {str(out)!r}, '--ray', 'local']))")
    r = subprocess.run([sys.executable, "-c", blocked], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "pip install 'cxr-embed[ray]'" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() and not shard_folder(out).exists()
    lazy = "import sys, cxr_embed, cxr_embed.cli, cxr_embed.distributed; assert 'ray' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", lazy], cwd=ROOT, timeout=120).returncode == 0


def test_a_store_of_another_model_is_refused_before_ray_starts(image_csv, embedder, tmp_path):
    need_ray()
    out = tmp_path / "other-model.h5"
    embed_to_store(list_inputs(image_csv)[:1], out, embedder, progress=False)  # imagenet-effnet-lite0
    before = ray_processes()
    with pytest.raises(ModelMismatch, match="different model"):
        embed_on_ray(list_inputs(image_csv), out, RuntimeSettings(), RayPlan("local"), progress=False)
    assert not shard_folder(out).exists() and set(ray_processes()) == set(before)


@pytest.mark.slow
def test_ray_local_gives_the_single_process_store(image_csv, single_store, tmp_path):
    need_ray()
    out, before = tmp_path / "ray.h5", ray_processes()
    r = subprocess.run(embed_cli("--images", str(image_csv), "--out", str(out), "--ray", "local", "--ray-actors", "2"),
                       cwd=ROOT, capture_output=True, text=True, timeout=RUN_S)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "embedded 17 new image(s)" in r.stdout and "2 failed" in r.stdout and "Ray: 2 actor(s)" in r.stdout
    assert_same_store(out, single_store)
    assert not shard_folder(out).exists()  # merged into --out, then removed
    assert_ray_gone(before)


@pytest.mark.slow
def test_a_killed_driver_then_the_same_command_gives_the_whole_store_once(image_csv, single_store, tmp_path):
    need_ray()
    out, before = tmp_path / "killed.h5", ray_processes()
    # small batches, a commit after each: the first shard commit comes while most of the work is left
    cmd = embed_cli("--images", str(image_csv), "--out", str(out), "--ray", "local", "--ray-actors", "2",
                    "--batch-size", "2", "--commit-every", "0")
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        saved = wait_for_a_shard_commit(out, driver)
    finally:
        driver.kill()  # SIGKILL: no cleanup of its own
        driver.wait()
        for pid, session in ray_processes().items():  # what that driver started (its session), by pid
            if session == driver.pid and pid not in before:
                os.kill(pid, signal.SIGKILL)
    assert saved >= 1 and not out.exists(), (tmp_path / "driver.log").read_text()[-3000:]
    r = subprocess.run(embed_cli("--images", str(image_csv), "--out", str(out), "--ray", "local", "--ray-actors", "2"),
                       cwd=ROOT, capture_output=True, text=True, timeout=RUN_S)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = int(re.search(r"(\d+) already present", r.stdout).group(1))  # the shards' images, not embedded again
    assert saved <= resumed <= 17, r.stdout
    assert_same_store(out, single_store)
    assert not shard_folder(out).exists()
    assert_ray_gone(before)


def wait_for_a_shard_commit(out: Path, driver: subprocess.Popen) -> int:
    """Images in the shard stores once one of them has committed some (the driver still running)."""
    deadline = time.monotonic() + RUN_S
    while time.monotonic() < deadline and driver.poll() is None:
        saved = sum(len(Store(p)) for p in shard_folder(out).glob("shard-*.h5"))
        if saved:
            return saved
        time.sleep(0.05)
    pytest.fail(f"no shard commit while the driver ran (exit code {driver.poll()})")


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance in this process: 4 logical CPUs for 2 one-CPU actors and Ray Data."""
    need_ray()
    before = ray_processes()
    with ray_session(RayPlan("local", actors=2, actor_cpus=1)):
        yield
    assert_ray_gone(before)


@pytest.mark.slow
def test_a_killed_actor_is_replaced_and_a_rerun_adds_nothing(ray_local, image_csv, single_store, tmp_path):
    import ray

    out, items = tmp_path / "actor-killed.h5", list_inputs(image_csv)
    killed: list[dict] = []
    watcher = threading.Thread(target=kill_after_first_commit, args=(actor_name(out, 1, 0), killed), daemon=True)
    watcher.start()
    plan = RayPlan("local", actors=2, actor_cpus=1)
    summary = embed_on_ray(items, out, RuntimeSettings(), plan, batch_size=2, commit_every_s=0, progress=False)
    watcher.join(timeout=10)
    assert killed, "actor 0 finished before it could be killed"
    assert (summary.actors_lost, summary.rounds) == (1, 2), summary.text()
    assert summary.embedded == 17 and summary.failed == single_store.failed
    assert_same_store(out, single_store)
    assert not shard_folder(out).exists() and not ray.util.list_named_actors()

    first = Store(out)
    again = embed_on_ray(items, out, RuntimeSettings(), plan, progress=False)  # the 2 failures are tried again
    assert (again.embedded, again.skipped, again.failed) == (0, 17, single_store.failed)
    store = Store(out)
    assert store.ids == first.ids and np.array_equal(store.embeddings(), first.embeddings())


def kill_after_first_commit(name: str, killed: list, timeout: float = RUN_S) -> None:
    """SIGKILL the actor called `name` once its shard holds a commit (a worker lost midway)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = ray.get(ray.get_actor(name).status.remote(), timeout=30)
        except (ValueError, ray.exceptions.RayError):  # not started yet
            time.sleep(0.05)
            continue
        if status["saved"] >= 1:
            os.kill(status["pid"], signal.SIGKILL)
            killed.append(status)
            return
        time.sleep(0.02)
