"""The engine: a dynamic batcher over the one runtime (`cxr_embed.runtime`). No HTTP here.

Images from concurrent requests are decoded in the runtime's decoding pool, then queued for one
worker thread (the batcher) that runs the model on up to `max_batch` images at a time, waiting at
most `batch_wait_ms` after the first for others to join. The queue is bounded: a request that does
not fit gets `QueueFull` (HTTP 429) at once instead of growing memory. Everything about decoding,
the chest check and the forward pass is the runtime's.

Model workers (`model_workers`): where the runtime runs the model on single-threaded CPU workers
(`model_threads` 1, `cpu_workers` > 1: the DICOM listener's default), one batcher would make each
batch a barrier: a lone image runs on one core while the next one, decoded meanwhile, waits for it.
There, each of `cpu_workers` threads is a batcher of its own: it takes the next queued image and,
at once and without waiting, its share of those queued behind it (up to the runtime's images per
call), and runs them on its own core. Each image's embedding is the same either way (tested).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from cxr_embed.chest import ChestCheck, is_reliable
from cxr_embed.errors import CxrEmbedError, InputError, NonFiniteEmbedding
from cxr_embed.image import ImageInfo
from cxr_embed.preview import png_bytes, tensor_image
from cxr_embed.runtime import Prepared, Runtime
from probes.scoring import UnknownProbe, check_names, score_embedding

from .settings import ServiceSettings

__all__ = ["Engine", "ImageResult", "QueueFull", "NotReady", "NoStore", "UnknownProbe"]


class QueueFull(CxrEmbedError):
    code = "queue_full"


class TooManyImages(CxrEmbedError):
    code = "too_many_images"


class NotReady(CxrEmbedError):
    code = "not_ready"


class NoStore(CxrEmbedError):
    code = "no_store"


@dataclass
class ImageResult:
    index: int
    filename: str | None
    embedding: np.ndarray | None = None
    info: ImageInfo | None = None
    chest: ChestCheck | None = None
    scores: dict = field(default_factory=dict)
    error: InputError | None = None


@dataclass
class _Job:
    prepared: Prepared
    future: Future


def parallel_workers(runtime: Runtime, setting: int) -> int:
    """How many model workers (batcher threads) to run: `setting`, or with 0 (auto) the runtime's
    `cpu_workers` where each runs torch on one thread (`model_threads` 1), else one batcher."""
    if setting:
        return max(1, int(setting))
    if runtime.on_cpu and runtime.settings.backend == "torch" and runtime.threads == 1:
        return runtime.workers
    return 1


class Engine:
    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.runtime: Runtime | None = None
        self.probes: dict = {}
        self.index = None
        self.ready = False
        self.load_error: str | None = None
        self.images_embedded = 0
        self.batches_run = 0
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=settings.max_queue)
        self._in_flight = 0
        self._decoding = 0  # images being decoded now: the batcher waits for them, not for nothing
        self._idle = 0  # model workers waiting for an image (with model_workers > 1)
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []
        self._stop = threading.Event()
        self.model_workers = 1

    @property
    def model(self):
        return None if self.runtime is None else self.runtime.model

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + self._in_flight

    # --- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Build the runtime in the batcher thread (the thread that runs the model: threads.py; with
        parallel model workers, the first of them), start the other workers, then load probes and
        store; raises ModelMismatch for a probe of another model."""
        loaded = threading.Event()
        failure: list[BaseException] = []

        def batcher():
            try:
                self.runtime = Runtime(self.settings.runtime)
                # before this thread's own batches start: each worker reads it once, when it starts
                self.model_workers = parallel_workers(self.runtime, self.settings.model_workers)
            except BaseException as exc:  # reported by load() in the caller's thread
                failure.append(exc)
                return
            finally:
                loaded.set()
            self._run_batches()

        first = threading.Thread(target=batcher, name="cxr-batcher", daemon=True)
        self._workers = [first]
        first.start()
        loaded.wait()
        if failure:
            raise failure[0]
        for n in range(1, self.model_workers):
            worker = threading.Thread(target=self._run_batches, name=f"cxr-batcher-{n}", daemon=True)
            self._workers.append(worker)
            worker.start()
        try:
            self._load_probes_and_store()
        except BaseException:
            self._stop.set()
            raise
        self.ready = True

    def _load_probes_and_store(self) -> None:
        from probes.io import load_probes

        identity = self.runtime.identity
        if self.settings.probes:
            self.probes = load_probes(self.settings.probes, expected_identity=identity)
        if self.settings.store:
            from cxr_embed.index import EmbeddingIndex

            self.index = EmbeddingIndex.build(self.settings.store)
            self.index.check_model(identity)

    def close(self, timeout: float = 60.0) -> None:
        """Stop the batcher (once its batch is done) and the runtime's threads. Joined, not left running:
        a daemon thread still inside torch when the interpreter finalizes is ended mid-call, and the
        process aborts ('terminate called without an active exception')."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(max(0.0, deadline - time.monotonic()))
        if self.runtime is not None:
            self.runtime.close()

    # --- the batcher ---------------------------------------------------------------------------

    def _next_batch(self) -> list[_Job] | None:
        if self.model_workers > 1:
            return self._next_share()
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return None
        jobs = [first]
        deadline = time.perf_counter() + self.settings.batch_wait_ms / 1000.0
        while len(jobs) < self.settings.max_batch:
            if self._queue.empty() and self._decoding == 0:
                break  # nothing else is on its way: waiting would only add latency
            remaining = deadline - time.perf_counter()
            try:
                jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _next_share(self) -> list[_Job] | None:
        """One model worker's next images: the first queued, then (without waiting) its share of those
        queued behind it, so that idle workers get theirs, up to the runtime's images per call."""
        with self._lock:
            self._idle += 1
        try:
            first = self._queue.get(timeout=0.2)
        except queue.Empty:
            return None
        finally:
            with self._lock:
                self._idle -= 1
                idle_others = self._idle
        jobs = [first]
        share = -(-self._queue.qsize() // (idle_others + 1))
        while len(jobs) < min(1 + share, self.runtime.chunk, self.settings.max_batch):
            try:
                jobs.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _run_batches(self) -> None:
        shared = self.model_workers == 1  # with parallel workers each runs its batch on its own thread
        while not self._stop.is_set():
            jobs = self._next_batch()
            if not jobs:
                continue
            with self._lock:
                self._in_flight += len(jobs)
            try:
                embs, check = self.runtime.forward(np.stack([j.prepared.tensor for j in jobs]),
                                                   [j.prepared.wants_check for j in jobs], shared=shared)
                for n, job in enumerate(jobs):
                    if not job.future.done():
                        job.future.set_result((embs[n], check[n]))
                with self._lock:
                    self.images_embedded += len(jobs)
                    self.batches_run += 1
            except Exception as exc:  # a model failure must reach the waiting requests, not kill the thread
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._lock:
                    self._in_flight -= len(jobs)

    # --- requests ------------------------------------------------------------------------------

    async def process(self, files: list[tuple[str | None, bytes]], probe_names: list[str] | None = None) -> list[ImageResult]:
        """Decode, embed (batched with other requests), check and score each file; errors stay per file."""
        if not self.ready:
            raise NotReady("the model is still loading; retry when /ready answers 200")
        if len(files) > self.settings.max_queue:
            raise TooManyImages(f"{len(files)} images in one request can never fit the queue of "
                                f"{self.settings.max_queue} (CXR_EMBED_MAX_QUEUE); send at most that many per request")
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(self.runtime.decode_pool, self._prepare, data) for _, data in files))
        results = [ImageResult(i, name, info=p.info, error=p.error) for i, ((name, _), p) in enumerate(zip(files, prepared))]
        waiting = self._enqueue([(res, p) for res, p in zip(results, prepared) if p.error is None])
        for res, fut in waiting:
            emb, check_emb = await asyncio.wrap_future(fut)
            if not np.isfinite(emb).all():  # never a NaN in a reply: this image fails, on our side (500)
                res.error = NonFiniteEmbedding("the model gave a non-finite embedding for this image")
                continue
            res.embedding = emb
            res.chest = self.runtime.chest_check(res.info, check_emb)
            res.scores = score_embedding(self.probes, emb, probe_names, reliable=is_reliable(res.info, res.chest))
        return results

    def _enqueue(self, jobs: list[tuple[ImageResult, Prepared]]) -> list[tuple[ImageResult, Future]]:
        """Queue every job or none (429 at once when the queue cannot take them all)."""
        if len(jobs) > self._queue.maxsize - self._queue.qsize():
            raise QueueFull(f"the service is busy ({self.queue_depth} images queued); retry shortly")
        waiting = []
        for res, p in jobs:
            fut: Future = Future()
            try:
                self._queue.put_nowait(_Job(p, fut))
            except queue.Full:
                for _, f in waiting:
                    f.cancel()
                raise QueueFull(f"the service is busy ({self.queue_depth} images queued); retry shortly") from None
            waiting.append((res, fut))
        return waiting

    async def preview(self, data: bytes) -> bytes:
        """The PNG of the model's input for `data` (decoded in the decoding pool); raises its InputError."""
        if not self.ready:
            raise NotReady("the model is still loading; retry when /ready answers 200")
        prepared = await asyncio.get_running_loop().run_in_executor(self.runtime.decode_pool, self.runtime.prepare, data)
        if prepared.error is not None:
            raise prepared.error
        return png_bytes(tensor_image(prepared.tensor, self.runtime.model.preprocess))  # the runtime's own input

    def prepare(self, data: bytes) -> Prepared:
        """Decode and preprocess one input in the runtime's decoding pool, from any thread (the batcher
        knows it is on its way and waits for it)."""
        return self.runtime.decode_pool.submit(self._prepare, data).result()

    def submit(self, prepared: Prepared) -> Future:
        """Queue one prepared input for the batcher: a future of (embedding, check embedding or None).
        Raises NotReady before `load`, QueueFull when the queue is full."""
        if not self.ready:
            raise NotReady("the model is still loading")
        return self._enqueue([(None, prepared)])[0][1]

    def _prepare(self, data: bytes) -> Prepared:
        with self._lock:
            self._decoding += 1
        try:
            return self.runtime.prepare(data)
        finally:
            with self._lock:
                self._decoding -= 1

    def check_probe_names(self, names: list[str] | None) -> None:
        check_names(self.probes, names)

    def search(self, embedding: np.ndarray, k: int):
        if self.index is None:
            raise NoStore("no store was loaded at start (--store): search is not available")
        return self.index.search(embedding, k)[0]
