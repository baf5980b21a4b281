"""The Python API for embedding: paths, bytes, arrays or PIL images in, float32 embeddings out.

A thin caller of the one runtime (`runtime.py`). It changes nothing process-wide: call
`cxr_embed.configure_process()` for the malloc settings that `cxr-embed embed` and the service use.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import os

import numpy as np

from .errors import ConfigError
from .identity import ModelIdentity
from .image import ImageInfo
from .ingest import ImageSource
from .runtime import CPU_CHUNK, EmbeddingResult, Runtime, RuntimeSettings, in_chunks

__all__ = ["Embedder", "EmbeddingResult", "CPU_CHUNK", "in_chunks"]


class Embedder:
    """Embeds images with one model in batches; the same input always gives the same embedding.

    `image_check="auto"` or `"always"` adds a chest check (`EmbeddingResult.chest`) to `iter_embed`'s
    results (see `cxr_embed.chest`); the default, `"never"`, runs the main model only.
    `backend="openvino"` runs the same model through OpenVINO on the CPU, at `precision` "f32" (the
    torch embeddings within 1e-4) or "bf16" (opt-in; see the README's "Backends")."""

    def __init__(self, model=None, batch_size: int = 32, device: str | None = None,
                 decode_workers: int = 2, image_check: str = "never", settings: RuntimeSettings | None = None,
                 backend: str = "auto", precision: str = "f32"):
        """`model`: a registered name, a checkpoint path (or with backend "openvino" an .onnx export),
        an EmbeddingModel object, or None for the shipped default."""
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ConfigError("batch_size must be at least 1")
        named = model is None or isinstance(model, (str, os.PathLike))
        if settings is None:
            settings = RuntimeSettings(model=model if named else None,
                                       device=device or "auto", decode_threads=max(1, int(decode_workers)),
                                       image_check=image_check, backend=backend, precision=precision)
        self.runtime = Runtime(settings, model=None if named else model)

    def close(self) -> None:
        """Stop the decoding threads (they also stop with the process)."""
        self.runtime.close()

    @property
    def model(self):
        """The torch backend's inference copy of the model (an EmbeddingModel); with "openvino",
        the model its ONNX export describes (`export_onnx.ExportedModel`)."""
        return self.runtime.model

    @property
    def device(self):
        return self.runtime.device

    @property
    def identity(self) -> ModelIdentity:
        return self.runtime.identity

    @property
    def dim(self) -> int:
        return self.runtime.dim

    def prepare(self, source: ImageSource) -> tuple[np.ndarray, ImageInfo]:
        """Decode and preprocess one input (raises InputError on bad input)."""
        p = self.runtime.prepare(source)
        if p.error is not None:
            raise p.error
        return p.tensor, p.info

    def forward(self, batch) -> np.ndarray:
        """Embeddings of already-preprocessed inputs (N, 3, S, S) (numpy, or a torch tensor)."""
        return self.runtime.forward(batch)[0]

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
        """Yield one result per (key, source), in input order; bad inputs yield their error, not raise."""
        return self.runtime.iter_embed(items, self.batch_size)
