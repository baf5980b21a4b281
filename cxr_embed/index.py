"""Nearest-neighbour search over a store with faiss (cosine similarity on L2-normalised embeddings)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import StoreError
from .store import Store, check_identity


@dataclass
class Neighbour:
    image_id: str
    similarity: float  # cosine similarity, 1 = same direction
    distance: float  # 1 - cosine similarity
    metadata: dict


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None]
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class EmbeddingIndex:
    """A faiss inner-product index over a store's normalised embeddings, keyed by image id."""

    def __init__(self, index: faiss.Index, ids: list[str], identity: dict, metadata: list[dict]):
        self.index, self.ids, self.identity, self._metadata = index, ids, identity, metadata
        self._row = {i: n for n, i in enumerate(ids)}

    @classmethod
    def build(cls, store: Store | str | os.PathLike) -> "EmbeddingIndex":
        store = store if isinstance(store, Store) else Store(store)
        if len(store) == 0:
            raise StoreError(f"store {store.path} holds no embeddings to index")
        embs = _normalise(store.embeddings())
        index = faiss.IndexFlatIP(embs.shape[1])
        index.add(embs)
        return cls(index, list(store.ids), store.identity, [store.metadata(n) for n in range(len(store))])

    def save(self, path: str | os.PathLike) -> None:
        """Writes PATH (faiss) and PATH.json (ids, identity, metadata)."""
        path = Path(path)
        faiss.write_index(self.index, str(path))
        path.with_name(path.name + ".json").write_text(
            json.dumps({"ids": self.ids, "identity": self.identity, "metadata": self._metadata})
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "EmbeddingIndex":
        path = Path(path)
        side = path.with_name(path.name + ".json")
        if not path.exists() or not side.exists():
            raise StoreError(f"index files {path} and {side} are both needed")
        meta = json.loads(side.read_text())
        return cls(faiss.read_index(str(path)), meta["ids"], meta["identity"], meta["metadata"])

    def __len__(self) -> int:
        return self.index.ntotal

    def search(self, vectors: np.ndarray, k: int = 5, exclude: set[str] | None = None) -> list[list[Neighbour]]:
        """The k nearest stored images for each query vector."""
        q = _normalise(vectors)
        if q.shape[1] != self.index.d:
            raise StoreError(f"query has dimension {q.shape[1]}, index has {self.index.d}")
        extra = len(exclude) if exclude else 0
        kk = min(len(self), k + extra)
        sims, rows = self.index.search(q, kk)
        out = []
        for srow, rrow in zip(sims, rows):
            hits = []
            for s, r in zip(srow, rrow):
                if r < 0 or (exclude and self.ids[r] in exclude):
                    continue
                hits.append(Neighbour(self.ids[r], float(s), float(1.0 - s), self._metadata[r]))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def search_by_id(self, image_id: str, k: int = 5) -> list[Neighbour]:
        """The k nearest other images to a stored image."""
        if image_id not in self._row:
            raise KeyError(f"image id {image_id!r} is not in the index")
        vec = self.index.reconstruct(self._row[image_id])
        return self.search(vec, k, exclude={image_id})[0]

    def check_model(self, identity: dict) -> None:
        check_identity(self.identity, identity, "the index")
