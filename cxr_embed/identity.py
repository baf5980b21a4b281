"""The identity of an embedding model: what every embedding written anywhere records.

Two embeddings can be compared only if they come from the same weights through the same
preprocessing, so stores, probes, indexes and service replies all carry one of these, and they are
compared in one place (`ModelIdentity.check`). It imports nothing heavy: a slim install can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

from .errors import ModelMismatch


@dataclass(frozen=True)
class ModelIdentity(Mapping):
    """Model name, a hash of its weights, the preprocessing version and the embedding dimension.

    It reads like the plain dict it is stored as (`identity["dim"]`, `dict(identity)`), so files
    written before the type existed keep working; `to_dict()` gives the JSON form."""

    model_name: str
    weights_hash: str
    preprocess_version: str
    dim: int

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "dim":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ModelMismatch(f"model identity: dim must be a positive integer, not {value!r}")
            elif not isinstance(value, str) or not value:
                raise ModelMismatch(f"model identity: {f.name} must be a non-empty string, not {value!r}")

    @classmethod
    def keys_(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def coerce(cls, value: "ModelIdentity | Mapping[str, Any]", what: str = "model identity") -> "ModelIdentity":
        """A ModelIdentity from itself or a mapping (a store's attributes, a probe file's JSON)."""
        if isinstance(value, ModelIdentity):
            return value
        if not isinstance(value, Mapping):
            raise ModelMismatch(f"{what}: expected a mapping with {', '.join(cls.keys_())}, got {type(value).__name__}")
        missing = [k for k in cls.keys_() if k not in value]
        if missing:
            raise ModelMismatch(f"{what} lacks {', '.join(missing)}")
        dim = value["dim"]
        try:
            dim = int(dim) if not isinstance(dim, bool) and str(dim).strip().isdigit() else dim
        except (TypeError, ValueError):
            pass
        return cls(str(value["model_name"]), str(value["weights_hash"]), str(value["preprocess_version"]), dim)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, found: "ModelIdentity | Mapping[str, Any]", what: str) -> None:
        """Raise ModelMismatch, naming each differing field, unless `found` is this identity."""
        other = ModelIdentity.coerce(found, what)
        diffs = [f"{k}: {other[k]!r} != {self[k]!r}" for k in self.keys_() if other[k] != self[k]]
        if diffs:
            raise ModelMismatch(f"{what} was made by a different model or preprocessing ({'; '.join(diffs)})")

    # Mapping interface: read-only, the four fields in order
    def __getitem__(self, key: str) -> Any:
        if key not in self.keys_():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_())

    def __len__(self) -> int:
        return len(self.keys_())
