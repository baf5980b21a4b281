"""Embedding on a Ray cluster: `cxr-embed embed --ray ADDRESS|local` (the optional `ray` extra).

The same job as `batch.embed_to_store`, spread over model actors:
- the driver lists the images and leaves out those already in --out or in a shard store;
- Ray Data streams the rest to the actors (`Dataset.streaming_split`, one split per actor);
- each actor builds the same runtime (the driver's `RuntimeSettings`) and writes its own shard store,
  `OUT.shards/shard-NNN.h5` beside --out, through the single-process writer (`batch.embed_into`: the
  same metadata, failure records and atomic commits);
- when the actors are done, the shards are merged into --out (`store.merge_stores`) and removed.

Nothing is lost or written twice: an actor that dies loses only what it had not committed, and the
driver runs another round for whatever no shard holds (`RayPlan.attempts` rounds in all); a driver
killed midway leaves the shards, which the next run of the same command skips and merges. Image
files and --out must be on a filesystem that every node mounts at the same path.

Ray Data runs its own tasks beside the actors: a local instance declares `DATA_CPUS` logical CPUs
for them on top of the actors' (with every CPU held by an actor, a Data job waits forever).
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Iterator

from .batch import EmbedProgress, EmbedSummary, InputItem, embed_into
from .errors import ConfigError, CxrEmbedError, DistributedJobError, MissingDependency, StoreError
from .identity import ModelIdentity
from .journal import journal_path, remove_journal
from .runtime import RuntimeSettings
from .store import Store, StoreWriter, check_identity, lock_path, merge_stores

DATA_CPUS = 2  # logical CPUs a local instance keeps for Ray Data's own tasks
DEFAULT_ACTOR_CPUS = 2  # the runtime's tuned case: 2 model threads, CPU chunks of 4 (BENCHMARKS.md)
ACTOR_START_S = 600.0  # actors that cannot start in this long (no room on the cluster, a broken node)
MAX_BLOCKS = 10_000  # Ray Data blocks per round: small enough to share out, few enough to schedule
SHARD_GLOB = "shard-*.h5"


def require_ray():
    """The `ray` module, or a typed error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (the `data` part of the extra)
    except ImportError as exc:
        raise MissingDependency(f"--ray needs Ray Data ({exc}): pip install 'cxr-embed[ray]' (or 'ray[data]>=2.10') here "
                           "and on every node of the cluster") from None
    return ray


@dataclass
class RayPlan:
    """Where a Ray job runs and how wide: actors, and the CPUs and GPUs each one holds."""

    # "local": a Ray instance on this machine, for this job; else a cluster's address ("auto" on a
    # node of the cluster, "HOST:6379"); a Ray connection the caller already opened is used as it is
    address: str = "local"
    actors: int = 0  # model actors; 0: as many as the CPUs (or GPUs) hold
    actor_cpus: float = 0  # logical CPUs per actor, also its model threads; 0: 2 (local: the cores / actors)
    actor_gpus: float = 0  # GPUs per actor; 0: the actors run the model on the CPU
    attempts: int = 3  # rounds, when actors die (each round embeds what no shard holds yet)
    stall_s: float = 1800.0  # no image done by any actor for this long: a stuck job, stopped with an error

    def __post_init__(self):
        for name in ("actors", "actor_cpus", "actor_gpus"):
            if float(getattr(self, name)) < 0:
                raise ConfigError(f"Ray {name} must be >= 0, not {getattr(self, name)!r}")
        if int(self.attempts) < 1 or float(self.stall_s) <= 0:
            raise ConfigError("Ray attempts must be at least 1 and stall_s positive")

    def resolve(self, cpus: float, gpus: float, local: bool) -> "RayPlan":
        """Actors and CPUs per actor filled in, for `cpus`/`gpus` (local: this machine's cores; a
        cluster: its totals, of which `DATA_CPUS` stay with Ray Data)."""
        each = self.actor_cpus or (max(1, int(cpus) // self.actors) if local and self.actors
                                   else min(DEFAULT_ACTOR_CPUS, max(1, int(cpus))))
        actors = self.actors
        if not actors:
            actors = int(gpus // self.actor_gpus) if self.actor_gpus else \
                max(1, int((cpus - (0 if local else DATA_CPUS)) // each))
        plan = replace(self, actors=int(actors), actor_cpus=each)
        if plan.actors < 1:
            raise ConfigError(f"no room for one actor of {self.actor_gpus:g} GPU(s): the Ray cluster has {gpus:g} GPU(s)")
        return plan

    def check_fits(self, cpus: float, gpus: float) -> None:
        """Refuse a plan the cluster cannot hold (its actors would wait forever)."""
        need_cpu, need_gpu = self.actors * self.actor_cpus + DATA_CPUS, self.actors * self.actor_gpus
        if need_cpu > cpus or need_gpu > gpus:
            raise ConfigError(
                f"{self.actors} Ray actor(s) of {self.actor_cpus:g} CPU(s) and {self.actor_gpus:g} GPU(s), plus {DATA_CPUS} "
                f"CPUs for Ray Data, need {need_cpu:g} CPUs and {need_gpu:g} GPUs; the Ray cluster has {cpus:g} and {gpus:g}. "
                "Ask for fewer actors (--ray-actors) or fewer CPUs each (--ray-actor-cpus)")

    def describe(self) -> str:
        gpus = f", {self.actor_gpus:g} GPU(s)" if self.actor_gpus else ""
        return f"{self.actors} actor(s) of {self.actor_cpus:g} CPU(s){gpus}"


def shard_folder(out: str | os.PathLike) -> Path:
    """Where the actors' shard stores of a job into `out` live: beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".shards")


def _local_pythonpath() -> str:
    """The actors of a local instance import the driver's cxr_embed (a checkout, not another install)."""
    here = str(Path(__file__).resolve().parents[1])
    return os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)


def _resources(ray) -> tuple[float, float]:
    res = ray.cluster_resources()
    return float(res.get("CPU", 0)), float(res.get("GPU", 0))


@contextmanager
def ray_session(plan: RayPlan) -> Iterator[RayPlan]:
    """Connect to Ray as `plan` says (a local instance is started and, at the end, stopped); yields
    the plan resolved for the resources found, once they are known to hold it."""
    ray = require_ray()
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False  # the driver shows one bar of its own
    if ray.is_initialized():  # the caller's connection (a notebook, a test): used as it is, left open
        yield _fitted(plan, *_resources(ray), local=False)
        return
    if plan.address == "local":
        import torch

        gpus = torch.cuda.device_count() if plan.actor_gpus else 0
        plan = plan.resolve(os.cpu_count() or 1, gpus, local=True)
        ray.init(address="local", num_cpus=math.ceil(plan.actors * plan.actor_cpus) + DATA_CPUS,
                 num_gpus=gpus, include_dashboard=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": {"PYTHONPATH": _local_pythonpath()}})
    else:
        try:
            ray.init(address=plan.address, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--ray {plan.address}: cannot connect to a Ray cluster there ({exc}). Start one with "
                              "`ray start --head` on the head node, and pass its address (HOST:6379, or auto on a node)") from None
    try:
        yield _fitted(plan, *_resources(ray), local=plan.address == "local")
    finally:
        ray.shutdown()


def _fitted(plan: RayPlan, cpus: float, gpus: float, local: bool) -> RayPlan:
    plan = plan if local else plan.resolve(cpus, gpus, local=False)
    plan.check_fits(cpus, gpus)
    return plan


class ShardActor:
    """One model actor: embeds the images of its split into its own shard store (`ray.remote` at use)."""

    def __init__(self, shard: str, settings: RuntimeSettings, identity: dict, batch_size: int, commit_every_s: float):
        from .process import configure_process

        configure_process()  # this process is ours: the same malloc settings as `cxr-embed embed`
        self.shard, self.settings, self.identity = Path(shard), settings, identity
        self.batch_size, self.commit_every_s = batch_size, commit_every_s
        self.progress, self.writer = EmbedProgress(), None

    def status(self) -> dict:
        """Images done (embedded or failed), committed, and where: answered while `run` works."""
        saved = self.writer.saved if self.writer is not None else 0
        return {"pid": os.getpid(), "host": socket.gethostname(), "done": self.progress.done, "saved": saved}

    def run(self, split) -> EmbedProgress:
        """Embed the split into the shard; the runtime is built here, in the thread that runs the model."""
        from .embedder import Embedder

        if not self.shard.parent.is_dir():
            raise StoreError(f"the shard folder {self.shard.parent} is not visible on node {socket.gethostname()}: "
                             "--out must be on a filesystem that every node of the cluster mounts at the same path")
        embedder = Embedder(settings=self.settings, batch_size=self.batch_size)
        try:
            ModelIdentity.coerce(self.identity).check(embedder.identity, f"the model on node {socket.gethostname()}")
            self.writer = StoreWriter(self.shard, embedder.identity)

            def seen(progress: EmbedProgress) -> None:
                self.progress = progress

            return embed_into(self.writer, _split_items(split), embedder, self.commit_every_s, on_result=seen)
        finally:
            if self.writer is not None:
                self.writer.close()  # the shard's journal folded in: one file to merge and remove
            embedder.close()


def _split_items(split) -> Iterator[InputItem]:
    for row in split.iter_rows():
        yield InputItem(row["image_id"], Path(row["path"]), json.loads(row["metadata"]))


@dataclass
class RaySummary(EmbedSummary):
    """An `EmbedSummary`, and how the job ran on Ray."""

    plan: str = ""
    rounds: int = 0
    actors_lost: int = 0

    def text(self) -> str:
        lost = f", {self.actors_lost} actor(s) lost and replaced" if self.actors_lost else ""
        return f"{super().text()}\nRay: {self.plan}, {self.rounds} round(s){lost}"


@dataclass
class _Job:
    """What every round of one job shares."""

    out: Path
    settings: RuntimeSettings
    identity: ModelIdentity
    plan: RayPlan
    batch_size: int
    commit_every_s: float
    bar: object


def stored_ids(out: Path, identity: ModelIdentity, shards_only: bool = False) -> set[str]:
    """Ids embedded in `out` or in a shard store beside it (each checked to be of `identity`'s model)."""
    ids: set[str] = set()
    for path in ([out] if out.exists() and not shards_only else []) + sorted(shard_folder(out).glob(SHARD_GLOB)):
        store = Store(path)
        check_identity(identity, store.identity, f"store {path}")
        ids.update(store.ids)
    return ids


def embed_on_ray(items: list[InputItem], out: str | os.PathLike, settings: RuntimeSettings, plan: RayPlan | None = None,
                 batch_size: int = 32, commit_every_s: float = 30.0, progress: bool = True) -> RaySummary:
    """Embed every item not yet in `out` on Ray, into shard stores merged into `out` (module docstring).
    Resumable: a re-run skips what `out` and the shards hold; failures are recorded, never fatal."""
    from .models import create_model

    start, plan, out = time.perf_counter(), plan or RayPlan(), Path(out).absolute()
    if settings.model and Path(settings.model).exists():  # a checkpoint file: the actors open it by its full path
        settings = replace(settings, model=str(Path(settings.model).absolute()))
    identity = create_model(settings.model, device="cpu").identity
    todo = [it for it in items if it.image_id not in stored_ids(out, identity)]
    rounds, lost, left = 0, 0, todo
    if todo:
        from tqdm import tqdm

        shard_folder(out).mkdir(parents=True, exist_ok=True)
        with ray_session(plan) as plan, tqdm(total=len(todo), unit="img", desc=f"embedding on Ray -> {out.name}",
                                              disable=not progress, dynamic_ncols=True, mininterval=1.0) as bar:
            job = _Job(out, _actor_settings(settings, plan), identity, plan, batch_size, commit_every_s, bar)
            rounds, lost, left = _run_rounds(todo, job)
    store = merge_shards(out)
    if store is None:
        raise StoreError(f"nothing to write into {out}: no image to embed")
    if left:
        raise DistributedJobError(
            f"{len(left)} image(s) were not embedded: {lost} Ray actor(s) died in {rounds} round(s) (see the Ray logs, "
            f"e.g. for memory). What was finished is in {out}; run the same command again to embed the rest")
    ids = {it.image_id for it in todo}
    failed = {k: v for k, v in store.failed.items() if k in ids}
    return RaySummary(out, sum(i in store for i in ids), len(items) - len(todo), failed, len(store),
                      time.perf_counter() - start, plan=plan.describe(), rounds=rounds, actors_lost=lost)


def _actor_settings(settings: RuntimeSettings, plan: RayPlan) -> RuntimeSettings:
    """The driver's settings, with the actor's threads and device."""
    device = settings.device
    if plan.actor_gpus:
        if device not in ("auto", "cuda"):
            raise ConfigError(f"--device {device} with GPU actors: Ray gives each actor its own GPU, leave --device at auto")
        device = "cuda"
    elif str(device).startswith("cuda"):
        raise ConfigError(f"--device {device} on Ray needs GPUs for the actors: add --ray-actor-gpus 1")
    return replace(settings, device=device, model_threads=settings.model_threads or max(1, int(plan.actor_cpus)))


def merge_shards(out: Path) -> Store | None:
    """Merge the shard stores beside `out` into it, then remove them; the store (None: nothing there)."""
    folder = shard_folder(out)
    shards = sorted(folder.glob(SHARD_GLOB))
    if not shards:
        return Store(out) if out.exists() else None
    store = merge_stores(shards, out)
    for path in shards + sorted(folder.glob(SHARD_GLOB + ".tmp")):  # once durable in `out` (a kill before: merged again)
        path.unlink()
        remove_journal(journal_path(path))  # a killed actor's journal, whose rows are in `out` now
        lock_path(path).unlink(missing_ok=True)  # its writer's lock file (no writer is left to hold it)
    try:
        folder.rmdir()
    except OSError:  # something else in it: left alone
        pass
    return store


def _run_rounds(todo: list[InputItem], job: _Job) -> tuple[int, int, list[InputItem]]:
    """Rounds until every item is in a shard or failed, or the attempts are spent: (rounds, lost, left)."""
    total, rounds, lost = len(todo), 0, 0
    while todo and rounds < job.plan.attempts:
        rounds += 1
        finished, died = _run_round(todo, job, rounds, base=total - len(todo))
        lost += died
        handled = stored_ids(job.out, job.identity, shards_only=True) | {k for p in finished for k in p.failed}
        todo = [it for it in todo if it.image_id not in handled]
    return rounds, lost, todo


def _rows(items: Iterable[InputItem]) -> list[dict]:
    return [{"image_id": it.image_id, "path": str(Path(it.path).absolute()), "metadata": json.dumps(it.metadata)}
            for it in items]


def actor_name(out: str | os.PathLike, round_: int, k: int) -> str:
    """The Ray name of actor `k` of round `round_` of a job into `out` (e.g. to watch it with `ray.get_actor`)."""
    return f"cxr-embed:{shard_folder(Path(out).absolute())}:{round_}:{k}"


def _run_round(todo: list[InputItem], job: _Job, round_: int, base: int) -> tuple[list[EmbedProgress], int]:
    """One round: Ray Data streams `todo` to fresh actors, each into its shard. Returns what the actors
    that finished report, and how many died."""
    ray = require_ray()
    n = min(job.plan.actors, len(todo))
    per_block = max(1, min(job.batch_size, -(-len(todo) // (4 * n))), -(-len(todo) // MAX_BLOCKS))
    data = ray.data.from_items(_rows(todo), override_num_blocks=-(-len(todo) // per_block))
    actor, folder = ray.remote(ShardActor), shard_folder(job.out)
    actors = [actor.options(num_cpus=job.plan.actor_cpus, num_gpus=job.plan.actor_gpus, max_concurrency=2,
                            max_restarts=0, name=actor_name(job.out, round_, k)).remote(
        str(folder / f"shard-{k:03d}.h5"), job.settings, dict(job.identity), job.batch_size, job.commit_every_s)
        for k in range(n)]
    try:
        _wait_started(ray, actors)
        runs = {a.run.remote(split): (k, a) for k, (a, split) in enumerate(zip(actors, data.streaming_split(n, equal=False)))}
        return _wait(ray, runs, job, base)
    finally:
        for a in actors:  # done, dead, or abandoned by an error: none outlives its round
            ray.kill(a)


def _wait_started(ray, actors: list) -> None:
    try:
        ray.get([a.status.remote() for a in actors], timeout=ACTOR_START_S)
    except ray.exceptions.GetTimeoutError:
        raise DistributedJobError(f"the Ray actors did not start within {ACTOR_START_S:.0f} s: the cluster has no room "
                                  "for them or a node is unwell (see `ray status`)") from None


def _wait(ray, runs: dict, job: _Job, base: int) -> tuple[list[EmbedProgress], int]:
    """Wait for the actors' runs, showing progress; a typed error raised in an actor is raised here."""
    finished, died, done = [], 0, {}
    last, last_change = -1, time.monotonic()
    while runs:
        ready, _ = ray.wait(list(runs), num_returns=len(runs), timeout=1.0)
        for ref in ready:
            done.pop(runs.pop(ref)[0], None)
            try:
                finished.append(ray.get(ref))
            except ray.exceptions.RayActorError:  # killed, out of memory, node lost: a next round redoes its work
                died += 1
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, CxrEmbedError):  # raised on purpose in the actor: raised here as it is
                    raise exc.cause from None
                if not isinstance(exc.cause, ray.exceptions.RayError):  # a bug: its traceback
                    raise
                died += 1  # a system failure under the actor (e.g. Ray Data's coordinator lost with its node)
        done.update(_statuses(ray, runs.values()))
        now_done = base + sum(p.done for p in finished) + sum(done.values())
        job.bar.n = now_done
        job.bar.refresh()
        if now_done != last:
            last, last_change = now_done, time.monotonic()
        elif time.monotonic() - last_change > job.plan.stall_s:
            raise DistributedJobError(f"no image was embedded on Ray for {job.plan.stall_s:.0f} s; what was finished "
                                      "is saved in the shard stores, run the same command again to go on")
    return finished, died


def _statuses(ray, actors: Iterable[tuple[int, object]]) -> dict[int, int]:
    """Images done by each live actor (by its number); a dead or slow one is left out this time."""
    refs = {a.status.remote(): k for k, a in actors}
    if not refs:
        return {}
    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.5)
    out = {}
    for ref in ready:
        try:
            out[refs[ref]] = ray.get(ref)["done"]
        except ray.exceptions.RayError:
            pass
    return out
