"""The engine: model, probes, index and a dynamic batcher. No HTTP here; the app is a thin layer on it.

Images from concurrent requests are decoded in a small thread pool, then queued for one worker
thread that runs the model on up to `max_batch` images at a time, waiting at most `batch_wait_ms`
after the first for others to join. The queue is bounded: a request that does not fit gets
`QueueFull` (HTTP 429) at once instead of growing memory.
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

from cxr_embed.chest import CHECK_MODEL, ChestCheck, ReferenceSet, check_chest, check_embeddings, needs_image_check
from cxr_embed.embedder import in_chunks, model_numpy, pick_device
from cxr_embed.errors import CxrEmbedError, InputError
from cxr_embed.image import ImageInfo
from cxr_embed.ingest import load_image
from cxr_embed.models import EmbeddingModel, create_model, inference_model
from cxr_embed.preprocess import preprocess
from cxr_embed.threads import decode_pool, model_threads

from .settings import ServiceSettings


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
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()

    # --- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load model, probes and store; raises ModelMismatch for a probe of another model.

        The models are built in the batcher thread, the one thread that will run them: a second
        thread with a multi-threaded torch team would slow every forward pass (threads.py)."""
        from probes import load_probe

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
        """Embeddings of the batch, and chest-check embeddings of the images that want one (else None);
        on the CPU, `cpu_chunk` images per model call (see `in_chunks`)."""
        x = x.to(self.device)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        step = self.settings.cpu_chunk if self.device.type == "cpu" else len(x)
        embs = in_chunks(model_numpy(self.model), x, step)
        check: list = [None] * len(wants_check)
        idx = [i for i, w in enumerate(wants_check) if w]
        if idx and self.reference is not None:
            sub = x if len(idx) == len(wants_check) else x[idx]
            check_fn = partial(check_embeddings, self.check_model, size=self.reference.size)
            for i, e in zip(idx, in_chunks(check_fn, sub, step)):
                check[i] = e
        return embs, check

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
