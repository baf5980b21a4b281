"""The engine: model, probes, index and a dynamic batcher. No HTTP here; the app is a thin layer on it.

Images from concurrent requests are decoded in a small thread pool, then queued for one worker
thread (the batcher) that runs the model on up to `max_batch` images at a time, waiting at most
`batch_wait_ms` after the first for others to join. On a CPU of a few cores the batcher shares a
batch's model calls with `cpu_workers - 1` helper threads (`Engine._forward_shared`). The queue
is bounded: a request that does not fit gets `QueueFull` (HTTP 429) at once instead of growing
memory.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch

from cxr_embed.allocator import keep_freed_memory
from cxr_embed.chest import CHECK_MODEL, ChestCheck, ReferenceSet, check_chest, check_embeddings, needs_image_check
from cxr_embed.embedder import in_chunks, model_numpy, pick_device
from cxr_embed.errors import CxrEmbedError, InputError
from cxr_embed.image import ImageInfo
from cxr_embed.ingest import load_image
from cxr_embed.models import EmbeddingModel, create_model, inference_model
from cxr_embed.preprocess import preprocess
from cxr_embed.threads import decode_pool, model_threads

from .settings import ServiceSettings


# cpu_workers=0 (auto): one single-threaded worker per model thread up to this many cores; beyond it
# one team of threads (Python's GIL, which every op's dispatch needs, would be shared by too many)
AUTO_CPU_WORKERS_MAX = 4


class QueueFull(CxrEmbedError):
    code = "queue_full"


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
    tensor: torch.Tensor
    future: Future
    check: bool = False  # run the image-based chest check on it too


class Engine:
    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.model: EmbeddingModel | None = None
        self.check_model: EmbeddingModel | None = None
        self.reference: ReferenceSet | None = None
        self.probes: dict = {}
        self.index = None
        self.ready = False
        self.load_error: str | None = None
        self.images_embedded = 0
        self.batches_run = 0
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=settings.max_queue)
        self._in_flight = 0
        self._decoding = 0  # images being decoded now: the batcher waits for them, not for nothing
        self._lock = threading.Lock()
        self._decode_pool = decode_pool(settings.decode_threads)  # torch on one thread each: see threads.py
        self._threads = settings.model_threads or torch.get_num_threads()  # torch threads of the batcher
        self._workers = 1  # threads sharing a batch on the CPU (_forward_shared); set at load
        self._helpers = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()

    # --- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load model, probes and store; raises ModelMismatch for a probe of another model.

        The models are built in the batcher thread, the one thread that will run them: a second
        thread with a multi-threaded torch team would slow every forward pass (threads.py)."""
        from probes import load_probe

        keep_freed_memory()  # no page faults on every batch's buffers: allocator.py
        self.device = pick_device(self.settings.device)
        # numpy's BLAS (OpenBLAS) does only tiny products here (probes, chest-check similarities) on the
        # event-loop thread; with its own pool of threads, which spin after each call, it stole a core
        # from the model: 2 cores, 27 ms instead of 16 per image (BENCHMARKS.md). One thread is plenty.
        from threadpoolctl import threadpool_limits

        self._blas_limits = threadpool_limits(limits=1, user_api="blas")
        loaded = threading.Event()
        failure: list[BaseException] = []

        def batcher():
            try:
                self._load_models()
            except BaseException as exc:  # reported by load() in the caller's thread
                failure.append(exc)
                return
            finally:
                loaded.set()
            self._run_batches()

        self._worker = threading.Thread(target=batcher, name="cxr-batcher", daemon=True)
        self._worker.start()
        loaded.wait()
        if failure:
            raise failure[0]
        try:
            if self.settings.probes:
                folder = Path(self.settings.probes)
                if not folder.is_dir():
                    raise CxrEmbedError(f"--probes {folder}: no such folder")
                for path in sorted(folder.glob("*.json")):
                    probe = load_probe(path, expected_identity=self.model.identity)
                    self.probes[getattr(probe, "name", path.stem)] = probe
            if self.settings.store:
                from cxr_embed.index import EmbeddingIndex

                self.index = EmbeddingIndex.build(self.settings.store)
                self.index.check_model(self.model.identity)
        except BaseException:
            self._stop.set()
            raise
        self.ready = True

    def _load_models(self) -> None:
        model_threads(self._threads)
        device = self.device
        if device.type == "cpu":
            workers = self.settings.cpu_workers or (self._threads if self._threads <= AUTO_CPU_WORKERS_MAX else 1)
            self._workers = max(1, workers)
            if self._workers > 1:
                self._helpers = decode_pool(self._workers - 1, prefix="cxr-model")
        # inference copies, as the Embedder uses: BatchNorm folded, channels_last on the CPU
        self.model = inference_model(create_model(self.settings.model, device=device), device)
        if self.model.name == CHECK_MODEL:
            self.check_model = self.model
        elif self.settings.image_check != "never":
            self.check_model = inference_model(create_model(CHECK_MODEL, device=device), device)
        self.reference = ReferenceSet.for_model(self.check_model) if self.settings.image_check != "never" else None

    def close(self) -> None:
        self._stop.set()
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        if self._helpers is not None:
            self._helpers.shutdown(wait=False, cancel_futures=True)

    @property
    def queue_depth(self) -> int:
        return self._queue.qsize() + self._in_flight

    # --- the batcher ---------------------------------------------------------------------------

    def _run_batches(self) -> None:
        wait = self.settings.batch_wait_ms / 1000.0
        while not self._stop.is_set():
            try:
                first = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            jobs = [first]
            deadline = time.perf_counter() + wait
            while len(jobs) < self.settings.max_batch:
                if self._queue.empty() and self._decoding == 0:
                    break  # nothing else is on its way: waiting would only add latency
                remaining = deadline - time.perf_counter()
                try:
                    jobs.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            with self._lock:
                self._in_flight = len(jobs)
            try:
                embs, check = self._forward(torch.stack([j.tensor for j in jobs]), [j.check for j in jobs])
                for n, job in enumerate(jobs):
                    if not job.future.done():
                        job.future.set_result((embs[n], check[n]))
                self.images_embedded += len(jobs)
                self.batches_run += 1
            except Exception as exc:  # a model failure must reach the waiting requests, not kill the thread
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                with self._lock:
                    self._in_flight = 0

    @torch.inference_mode()
    def _forward(self, x: torch.Tensor, wants_check: list[bool]) -> tuple[np.ndarray, list]:
        """Embeddings of the batch, and chest-check embeddings of the images that want one (else None).

        On the CPU, more than one model call's worth of work (two images, or one image and its
        check) is shared among `cpu_workers` threads that each run torch on one thread
        (`_forward_shared`); a lone call runs on the batcher's team of threads, `cpu_chunk` images
        per call (see `in_chunks`)."""
        cpu = self.device.type == "cpu"
        x = x.to(self.device)
        if cpu:
            x = x.contiguous(memory_format=torch.channels_last)
        step = self.settings.cpu_chunk if cpu else len(x)
        work = [(model_numpy(self.model), x, step)]  # (network as a function, its input, images per call)
        idx = [i for i, w in enumerate(wants_check) if w] if self.reference is not None else []
        if idx:
            sub = x if len(idx) == len(x) else x[idx]
            if cpu:
                sub = sub.contiguous(memory_format=torch.channels_last)  # no copy where it already is
            work.append((partial(check_embeddings, self.check_model, size=self.reference.size), sub,
                         self._check_chunk(step, x.shape[-1])))
        if cpu and self._workers > 1 and len(x) + len(idx) > 1:
            outs = self._forward_shared(work)
        else:
            if cpu:
                model_threads(self._threads)
            outs = [in_chunks(fn, inputs, per_call) for fn, inputs, per_call in work]
        check: list = [None] * len(wants_check)
        for i, e in zip(idx, outs[1] if idx else []):
            check[i] = e
        return outs[0], check

    def _check_chunk(self, step: int, side: int) -> int:
        """Images per check-network call: as many pixels as `step` images of `side` px for the main
        model (12 at 128 px against 4 at 224 px: 2.6 instead of 3.3 ms per image; BENCHMARKS.md)."""
        return max(step, round(step * (side / self.reference.size) ** 2))

    def _forward_shared(self, work: list[tuple]) -> list[np.ndarray]:
        """`in_chunks` for each (function, input, images per call) of `work`, with the model calls
        shared among `cpu_workers` threads, each running torch on one thread: the batcher and
        `cpu_workers - 1` helpers take the next call from a common list until none is left (in the
        order of `work`: main-model chunks first, then chest-check chunks). Calls hold at most
        images per call, and fewer where that leaves a worker idle.

        On a few cores this beats one team of threads on the same calls: a team's threads wait for
        each other at every op, so when one of them is pre-empted (decoding, HTTP, JSON of the other
        requests) both cores stall; single-threaded workers just go on. BENCHMARKS.md has the
        numbers. Each image's embedding is the same as alone (a test checks it)."""
        workers = self._workers
        calls = []  # (which entry of work, function, input slice)
        for k, (fn, inputs, per_call) in enumerate(work):
            step = max(1, min(per_call, -(-len(inputs) // workers)))
            calls += [(k, fn, inputs[i : i + step]) for i in range(0, len(inputs), step)]
        results: list = [None] * len(calls)
        todo = iter(enumerate(calls))
        lock = threading.Lock()
        failed = threading.Event()  # once a call fails, the others stop taking calls

        def run_calls() -> None:
            model_threads(1)  # the helpers already are; the batcher switches back for lone calls
            with torch.inference_mode():
                while not failed.is_set():
                    with lock:
                        n, call = next(todo, (None, None))
                    if call is None:
                        return
                    try:
                        results[n] = call[1](call[2])
                    except BaseException:
                        failed.set()
                        raise

        helpers = [self._helpers.submit(run_calls) for _ in range(min(workers, len(calls)) - 1)]
        try:
            run_calls()
        finally:
            for f in helpers:  # always wait: the next batch must not overlap with this one
                f.exception()
        for f in helpers:
            f.result()  # a helper's failure fails the batch, as the batcher's own would
        return [np.concatenate([r for (k, _, _), r in zip(calls, results) if k == entry])
                for entry in range(len(work))]

    # --- requests ------------------------------------------------------------------------------

    def _prepare(self, data: bytes):
        decoded = load_image(data)
        return preprocess(decoded, self.model.preprocess), decoded.info

    async def process(self, files: list[tuple[str | None, bytes]], probe_names: list[str] | None = None) -> list[ImageResult]:
        """Decode, embed (batched with other requests), check and score each file; errors stay per file."""
        if not self.ready:
            raise NotReady("the model is still loading")
        loop = asyncio.get_running_loop()
        prepared = await asyncio.gather(
            *(loop.run_in_executor(self._decode_pool, self._safe_prepare, data) for _, data in files)
        )
        results = [ImageResult(i, name) for i, (name, _) in enumerate(files)]
        jobs = []
        for res, (tensor, info, err) in zip(results, prepared):
            res.info, res.error = info, err
            if err is None:
                jobs.append((res, tensor))
        if len(jobs) > self._queue.maxsize - self._queue.qsize():
            raise QueueFull(f"the service is busy ({self.queue_depth} images queued); retry shortly")
        waiting = []
        for res, tensor in jobs:
            fut: Future = Future()
            try:
                self._queue.put_nowait(_Job(tensor, fut, self.reference is not None
                                            and needs_image_check(res.info, self.settings.image_check)))
            except queue.Full:
                for f in waiting:
                    f[1].cancel()
                raise QueueFull(f"the service is busy ({self.queue_depth} images queued); retry shortly") from None
            waiting.append((res, fut))
        for res, fut in waiting:
            emb, check_emb = await asyncio.wrap_future(fut)
            res.embedding = emb
            res.chest = check_chest(res.info, check_emb, self.reference)
            res.scores = self.score(emb, probe_names, reliable=res.chest.is_frontal_cxr)
        return results

    def _safe_prepare(self, data: bytes):
        with self._lock:
            self._decoding += 1
        try:
            tensor, info = self._prepare(data)
            return tensor, info, None
        except InputError as exc:
            return None, None, exc
        finally:
            with self._lock:
                self._decoding -= 1

    def score(self, embedding: np.ndarray, names: list[str] | None = None, reliable: bool = True) -> dict:
        unknown = [n for n in (names or []) if n not in self.probes]
        if unknown:
            raise UnknownProbe(f"unknown probe(s) {', '.join(unknown)}; loaded: {', '.join(self.probes) or 'none'}")
        out = {}
        for name, probe in self.probes.items():
            if names and name not in names:
                continue
            proba = probe.predict_proba(embedding[None])[0]
            classes = [c.item() if hasattr(c, "item") else c for c in probe.classes_]
            entry = {"classes": classes, "probabilities": [round(float(p), 6) for p in proba], "reliable": reliable}
            if len(classes) == 2:
                entry.update(probability=round(float(proba[1]), 6), threshold=probe.threshold_,
                             positive=bool(proba[1] >= probe.threshold_), threshold_method=probe.threshold_info_["method"])
            else:
                entry.update(predicted=classes[int(np.argmax(proba))])
            out[name] = entry
        return out

    def search(self, embedding: np.ndarray, k: int):
        if self.index is None:
            raise NoStore("no store was loaded at start (--store): search is not available")
        return self.index.search(embedding, k)[0]


class UnknownProbe(CxrEmbedError):
    code = "unknown_probe"
