"""Nearest-neighbour search over a store with faiss (cosine similarity on L2-normalised embeddings).

A saved index is two files: PATH (faiss) and PATH.json (ids, identity, metadata). The JSON also records
the SHA-256 of the faiss file and of itself (damage -> StoreCorrupt), and the checksum of the store the
index was built from: after images are added to or removed from that store, `load(path, store)` refuses
the index (StaleIndex) and `load_or_build` rebuilds it, so removed images do not live on in an index.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from .errors import StaleIndex, StoreCorrupt, StoreError, StoreTooNew
from .store import Store, UncheckedStoreWarning, atomic_replace, check_identity

INDEX_FORMAT = "cxr-embed-index/2"
log = logging.getLogger(__name__)


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


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _payload_checksum(payload: dict) -> str:
    return _sha256(json.dumps({k: v for k, v in payload.items() if k != "checksum"}, sort_keys=True).encode())


def _index_corrupt(path: Path, detail: str) -> StoreCorrupt:
    return StoreCorrupt(f"index {path} is damaged or not a cxr-embed index ({detail}); rebuild it from its store")


def _read_verified(path: Path, side: Path) -> tuple[dict, np.ndarray]:
    """The sidecar and the faiss bytes, both checked against the checksums the sidecar records."""
    try:
        payload, blob = json.loads(side.read_bytes()), path.read_bytes()
    except (OSError, ValueError) as exc:
        raise _index_corrupt(path, f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(payload, dict):
        raise _index_corrupt(path, f"{side.name} is not a JSON object")
    fmt = payload.get("format")
    if fmt is None and {"ids", "identity", "metadata"} <= payload.keys():
        warnings.warn(f"index {path} carries no checksum; rebuild it to detect damage", UncheckedStoreWarning, stacklevel=3)
    elif fmt != INDEX_FORMAT and str(fmt).startswith("cxr-embed-index/"):
        raise StoreTooNew(f"index {path} has format {fmt}: it was written by a newer cxr-embed; upgrade cxr-embed to read it")
    elif fmt != INDEX_FORMAT or payload.get("checksum") != _payload_checksum(payload):
        raise _index_corrupt(path, f"{side.name} does not match its checksum")
    elif payload.get("faiss_sha256") != _sha256(blob):
        raise _index_corrupt(path, f"{path.name} does not match the checksum in {side.name}")
    return payload, np.frombuffer(blob, np.uint8)


class EmbeddingIndex:
    """A faiss inner-product index over a store's normalised embeddings, keyed by image id."""

    def __init__(self, index: faiss.Index, ids: list[str], identity: dict, metadata: list[dict], store_checksum: str | None = None):
        self.index, self.ids, self.identity, self._metadata = index, ids, identity, metadata
        self.store_checksum = store_checksum  # of the store state it was built from
        self._row = {i: n for n, i in enumerate(ids)}

    @classmethod
    def build(cls, store: Store | str | os.PathLike) -> "EmbeddingIndex":
        store = store if isinstance(store, Store) else Store(store)
        if len(store) == 0:
            raise StoreError(f"store {store.path} holds no embeddings to index")
        embs = _normalise(store.embeddings())
        index = faiss.IndexFlatIP(embs.shape[1])
        index.add(embs)
        metadata = [store.metadata(n) for n in range(len(store))]
        return cls(index, list(store.ids), dict(store.identity), metadata, store.checksum)

    def save(self, path: str | os.PathLike) -> None:
        """Writes PATH (faiss) and PATH.json (ids, identity, metadata, checksums), each replaced atomically."""
        path = Path(path)
        blob = faiss.serialize_index(self.index).tobytes()
        payload = {"format": INDEX_FORMAT, "ids": self.ids, "identity": self.identity, "metadata": self._metadata,
                   "store_checksum": self.store_checksum, "faiss_sha256": _sha256(blob)}
        payload["checksum"] = _payload_checksum(payload)
        for target, data in ((path, blob), (path.with_name(path.name + ".json"), json.dumps(payload).encode())):
            with atomic_replace(target, "index") as tmp:
                tmp.write_bytes(data)

    @classmethod
    def load(cls, path: str | os.PathLike, store: Store | str | os.PathLike | None = None) -> "EmbeddingIndex":
        """A saved index; with `store`, refuses (StaleIndex) one built from another state of that store."""
        path = Path(path)
        side = path.with_name(path.name + ".json")
        if not path.exists() or not side.exists():
            raise StoreError(f"index files {path} and {side} are both needed")
        payload, blob = _read_verified(path, side)
        try:
            index = faiss.deserialize_index(blob)
            loaded = cls(index, payload["ids"], payload["identity"], payload["metadata"], payload.get("store_checksum"))
            consistent = index.ntotal == len(loaded.ids) == len(loaded._metadata) and index.d == int(loaded.identity["dim"])
        except (RuntimeError, KeyError, TypeError, ValueError) as exc:
            raise _index_corrupt(path, f"{type(exc).__name__}: {exc}") from exc
        if not consistent:
            raise _index_corrupt(path, "its vectors, ids and metadata do not line up")
        if store is not None:
            loaded.check_fresh(store)
        return loaded

    @classmethod
    def load_or_build(cls, path: str | os.PathLike, store: Store | str | os.PathLike) -> "EmbeddingIndex":
        """The index saved at `path` if it was built from `store` as it is now, else a new one (saved there)."""
        store = store if isinstance(store, Store) else Store(store)
        try:
            return cls.load(path, store)
        except StoreError as exc:  # missing, damaged, stale or of another format: it is derived data
            log.warning("rebuilding index %s: %s", path, exc)
        index = cls.build(store)
        index.save(path)
        return index

    def check_fresh(self, store: Store | str | os.PathLike) -> None:
        """Raises StaleIndex unless this index was built from `store` in its current state."""
        store = store if isinstance(store, Store) else Store(store)
        if self.store_checksum != store.checksum:
            raise StaleIndex(
                f"the index was built from another state of store {store.path} (images added or removed since); "
                "rebuild it (EmbeddingIndex.build, or load_or_build)"
            )

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
