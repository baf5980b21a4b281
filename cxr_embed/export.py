"""Export a store to Parquet or NumPy `.npz` for tools outside cxr-embed (pandas, polars, R, DuckDB).

Both hold the ids, the embeddings (float32, one row per image), each image's metadata as JSON text,
and the model identity (Parquet: schema metadata `cxr_embed.identity`; npz: the `identity` entry).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .errors import ConfigError
from .store import Store

FORMATS = (".parquet", ".npz")


def export_store(store: str | os.PathLike | Store, out: str | os.PathLike) -> Path:
    """Write every embedding of `store` to `out` (.parquet or .npz, by suffix); returns the path."""
    store = store if isinstance(store, Store) else Store(store)
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(f"--out {out}: name the file *.parquet or *.npz (the suffix chooses the format)")
    ids, embs = list(store.ids), store.embeddings()
    meta = [json.dumps(store.metadata(n), sort_keys=True) for n in range(len(ids))]
    identity = json.dumps(dict(store.identity), sort_keys=True, default=str)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if suffix == ".npz":
        with open(tmp, "wb") as fh:
            np.savez(fh, ids=np.array(ids, dtype=str), embeddings=embs, metadata=np.array(meta, dtype=str),
                     identity=np.array(identity))
    else:
        _write_parquet(tmp, ids, embs, meta, identity)
    os.replace(tmp, out)
    return out


def _write_parquet(path: Path, ids: list[str], embs: np.ndarray, meta: list[str], identity: str) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError("writing Parquet needs pyarrow: pip install pyarrow (or export to .npz)") from None
    flat = pa.array(embs.reshape(-1), type=pa.float32())
    column = pa.FixedSizeListArray.from_arrays(flat, embs.shape[1])
    table = pa.table({"id": pa.array(ids, pa.string()), "embedding": column, "metadata": pa.array(meta, pa.string())})
    table = table.replace_schema_metadata({"cxr_embed.identity": identity})
    pq.write_table(table, path)


def read_export(path: str | os.PathLike) -> tuple[list[str], np.ndarray, list[dict], dict]:
    """(ids, embeddings, metadata, identity) of a file written by `export_store`."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return ([str(i) for i in z["ids"]], z["embeddings"], [json.loads(m) for m in z["metadata"]],
                    json.loads(str(z["identity"])))
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    embs = np.asarray(table.column("embedding").combine_chunks().flatten(), dtype=np.float32)
    ids = table.column("id").to_pylist()
    identity = json.loads(table.schema.metadata[b"cxr_embed.identity"])
    return ids, embs.reshape(len(ids), -1), [json.loads(m) for m in table.column("metadata").to_pylist()], identity
