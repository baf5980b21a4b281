"""Batch embedding of paths, bytes or arrays into float32 arrays."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .allocator import keep_freed_memory
from .errors import InputError
from .image import ImageInfo
from .ingest import ImageSource, load_image
from .models import EmbeddingModel, create_model, inference_model
from .preprocess import preprocess
from .threads import decode_pool, model_threads


CPU_CHUNK = 4  # images per model call on the CPU (per image, 4 was fastest on 2 cores; 16 was 1.6x slower)


def in_chunks(fn: Callable[[torch.Tensor], np.ndarray], x: torch.Tensor, step: int) -> np.ndarray:
    """`fn` over `x` in slices of `step` images, concatenated: on the CPU, past a few images per call
    the activations outgrow the caches and each image costs more (BENCHMARKS.md)."""
    step = max(1, int(step))
    return np.concatenate([fn(x[i : i + step]) for i in range(0, len(x), step)])


def model_numpy(model: torch.nn.Module) -> Callable[[torch.Tensor], np.ndarray]:
    """The model as a function to float32 numpy."""
    return lambda x: model(x).float().cpu().numpy()


@dataclass
class EmbeddingResult:
    """One input's outcome: an embedding and findings, or the error that stopped it."""

    key: object
    embedding: np.ndarray | None
    info: ImageInfo | None
    error: InputError | None = None


def pick_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Embedder:
    """Embeds images with one model in batches; the same input always gives the same embedding.

    Creating one applies process-wide malloc settings on glibc (`cxr_embed.allocator`: freed
    buffers are kept for the next batch); set CXR_EMBED_MALLOC_TUNING=0 before to leave malloc alone.
    """

    def __init__(
        self,
        model: str | EmbeddingModel | None = None,
        batch_size: int = 32,
        device: str | None = None,
        decode_workers: int = 2,
    ):
        keep_freed_memory()  # no page faults on every batch's buffers: allocator.py
        self.device = pick_device(device)
        model = model if isinstance(model, EmbeddingModel) else create_model(model, device="cpu")
        # an inference copy (BatchNorm folded, channels_last on the CPU): the caller's model is left as it was
        self.model = inference_model(model, self.device)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.decode_workers = max(1, int(decode_workers))
        self.threads = torch.get_num_threads()  # for the model, in whichever thread calls forward
        self._pool = None  # decoding threads, started on first use and kept (see threads.py)

    def close(self) -> None:
        """Stop the decoding threads (they also stop with the process)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    @property
    def identity(self) -> dict:
        return self.model.identity

    @property
    def dim(self) -> int:
        return self.model.dim

    def prepare(self, source: ImageSource) -> tuple[torch.Tensor, ImageInfo]:
        """Decode and preprocess one input (raises InputError on bad input)."""
        decoded = load_image(source)
        return preprocess(decoded, self.model.preprocess), decoded.info

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> np.ndarray:
        """Embeddings of already-preprocessed tensors (N, 3, S, S); on the CPU, CPU_CHUNK images per call."""
        model_threads(self.threads)
        x = batch.to(self.device, non_blocking=True)
        if self.device.type != "cpu":
            return in_chunks(model_numpy(self.model), x, len(x))
        return in_chunks(model_numpy(self.model), x.contiguous(memory_format=torch.channels_last), CPU_CHUNK)

    def embed(self, sources: Sequence[ImageSource]) -> np.ndarray:
        """Embeddings (N, dim) float32 for every input; raises on the first bad input."""
        results = list(self.iter_embed(list(enumerate(sources))))
        for r in results:
            if r.error is not None:
                raise r.error
        if not results:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([r.embedding for r in results])

    def embed_one(self, source: ImageSource) -> tuple[np.ndarray, ImageInfo]:
        r = next(self.iter_embed([(0, source)]))
        if r.error is not None:
            raise r.error
        return r.embedding, r.info

    def iter_embed(self, items: Iterable[tuple[object, ImageSource]]) -> Iterator[EmbeddingResult]:
        """Yield one result per (key, source), in input order; bad inputs yield their error, not raise.

        Decoding runs in a small thread pool ahead of the model (PIL, pydicom and numpy release the
        GIL for the heavy parts), so the CPU forward pass is rarely kept waiting.
        """
        for chunk in self._iter_batches(items):
            ok = [(k, t, i) for k, t, i, e in chunk if e is None]
            embs = self.forward(torch.stack([t for _, t, _ in ok])) if ok else None
            j = 0
            for key, tensor, info, err in chunk:
                if err is None:
                    yield EmbeddingResult(key, embs[j], info)
                    j += 1
                else:
                    yield EmbeddingResult(key, None, None, err)

    def _iter_batches(self, items: Iterable[tuple[object, ImageSource]]):
        def job(source):
            try:
                t, info = self.prepare(source)
                return t, info, None
            except InputError as exc:
                return None, None, exc

        lookahead = self.batch_size * 2
        pending: deque[tuple[object, Future]] = deque()
        batch = []
        if self._pool is None:
            self._pool = decode_pool(self.decode_workers)
        pool = self._pool
        try:
            it = iter(items)
            exhausted = False
            while True:
                while not exhausted and len(pending) < lookahead:
                    try:
                        key, source = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    pending.append((key, pool.submit(job, source)))
                if not pending:
                    break
                key, fut = pending.popleft()
                t, info, err = fut.result()
                batch.append((key, t, info, err))
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
            if batch:
                yield batch
        finally:  # an abandoned iteration: drop decoding that has not started
            for _, fut in pending:
                fut.cancel()
