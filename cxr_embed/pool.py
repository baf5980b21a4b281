"""The pretraining pool: which rows of the pool CSV train, the class of each, their decoded images,
and packs (the same pool as compact files, to move it to another machine).

- Rows: every row of `labels` (the first `max_images` when set), minus the rows that `exclude`
  names: `{column: [value, ...]}` on any CSV column, or `class: [...]` on the class after mapping.
  A value that no row has is refused (a misspelt source would otherwise exclude nothing).
- Class key: the row's label vector (`label_columns`, joined by "|"); with a `label_map`, the class
  of the first pattern that matches it. Patterns are Python regular expressions matched at the start
  of the key (`re.match`), so a plain prefix works. Keys that no pattern matches are refused, listed
  with their row counts: a label is never guessed.
- Data hash: sha256 over (image, class key, sha256 of the original file) of every row trained on,
  in CSV order. A pack stores each file's sha256, so a pool read from packs has the same hash.

Pack format 2 (`cxr-embed-pack/2`) stores every CSV column, so class keys, exclusions and balancing
groups are computed when training, with the training config; format-1 packs stored only the keys of
the columns they were built with and serve only configs asking for exactly those.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from .errors import CxrEmbedError, InputError, LabelError
from .ingest import load_image, read_bytes
from .labels import examples, read_labels
from .preprocess import letterbox
from .threads import decode_pool

PACK_FORMAT = "cxr-embed-pack/2"
PACK_FORMAT_V1 = "cxr-embed-pack/1"
PACK_IMAGE_FORMATS = ("jpeg", "webp")
CLASS = "class"  # the exclude key that names classes after label_map, not a CSV column
IMAGE = "image"  # the exclude key that names pool images by id (e.g. copies of task images)
_WORKERS = min(8, os.cpu_count() or 1)


# --- settings ---------------------------------------------------------------------------------------

def normalise_label_map(value, source: str) -> list[list[str]]:
    """`label_map` as [[pattern, class], ...] from a mapping, a list of pairs, or the path of a YAML
    file holding either (relative to the current folder, as every path of a config); patterns checked."""
    if isinstance(value, str):
        import yaml

        path = Path(value)
        if not path.is_file():
            raise CxrEmbedError(f"{source}: label_map file {path} not found (paths are relative to {Path.cwd()})")
        return normalise_label_map(yaml.safe_load(path.read_text()) or [], str(path))
    if not value:
        return []
    pairs = list(value.items()) if isinstance(value, dict) else value
    if not isinstance(pairs, (list, tuple)):
        raise CxrEmbedError(f"{source}: label_map is an ordered mapping 'pattern: class' or a list of [pattern, class]")
    out = []
    for item in pairs:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(_is_text(x) for x in item)):
            raise CxrEmbedError(f"{source}: label_map entries are pairs of text 'pattern: class' "
                                f"(quote numbers and yes/no), not {item!r}")
        pattern, cls = str(item[0]), str(item[1])
        try:
            re.compile(pattern)
        except re.error as exc:
            raise CxrEmbedError(f"{source}: label_map pattern {pattern!r} is not a regular expression: {exc}") from None
        out.append([pattern, cls])
    return out


def normalise_exclude(value, source: str) -> dict[str, list[str]]:
    """`exclude` as {column: [value, ...]}; one value may be written without the list. `image` names
    pool images by id, listed or in a text file (one id per line, e.g. configs/pool-task-overlap.txt
    from scripts/pool_task_overlap.py; the path is relative to where pretraining runs, as `labels`)."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise CxrEmbedError(f"{source}: exclude is a mapping {{column: [value, ...]}}, e.g. {{source: [kermany_pediatric]}}")
    out = {}
    for column, values in value.items():
        if column == IMAGE and isinstance(values, str) and values.endswith(".txt"):
            try:
                values = [line.strip() for line in Path(values).read_text(encoding="utf-8").splitlines() if line.strip()]
            except (OSError, UnicodeDecodeError) as exc:
                raise CxrEmbedError(f"{source}: exclude.image names {values}, which cannot be read ({exc})") from None
        values = values if isinstance(values, (list, tuple)) else [values]
        if not values or not all(_is_text(v) for v in values):
            raise CxrEmbedError(f"{source}: exclude.{column} needs one or more text values, not {values!r}")
        out[str(column)] = [str(v) for v in values]
    return out


def _is_text(x) -> bool:
    return (isinstance(x, str) and x != "") or (isinstance(x, int) and not isinstance(x, bool))


# --- rows and classes -------------------------------------------------------------------------------

@dataclass
class PoolRows:
    """Rows of the pool CSV: image ids, every other column (in row order) and the CSV row numbers."""

    images: list[str]
    columns: dict[str, list[str]]
    row: np.ndarray  # 0-based row number in the CSV

    def take(self, keep) -> "PoolRows":
        keep = np.asarray(keep, dtype=np.int64)
        return PoolRows([self.images[i] for i in keep], {c: [v[i] for i in keep] for c, v in self.columns.items()},
                        self.row[keep])


def read_pool_rows(cfg) -> PoolRows:
    """Every row of `cfg.labels` (the first `max_images`), through the one label reader."""
    table = read_labels(cfg.labels, cfg.label_columns, max_rows=cfg.max_images or 0, encode=False)
    columns = {c: [r[j] for r in table.raw] for j, c in enumerate(table.label_columns)}
    columns["patient_id"] = table.patients
    columns.update(table.extra)
    return PoolRows(table.images, columns, np.arange(len(table.images)))


def class_keys(raw: list[str], label_map: list[list[str]], where: str) -> list[str]:
    """Each raw label key mapped by the first matching pattern; refuses keys that none matches."""
    if not label_map:
        return list(raw)
    compiled = [(re.compile(p), c) for p, c in label_map]
    mapped = {k: next((c for rx, c in compiled if rx.match(k)), None) for k in set(raw)}
    unmapped = Counter(k for k in raw if mapped[k] is None)
    if unmapped:
        listed = "; ".join(f"{k!r} ({n} rows)" for k, n in sorted(unmapped.items())[:20])
        more = f" and {len(unmapped) - 20} more" if len(unmapped) > 20 else ""
        raise LabelError(f"{where}: label_map has no pattern for {len(unmapped)} label value(s): {listed}{more}. "
                         "Add a pattern for each (patterns match at the start of the value), or leave those rows "
                         "out with exclude: {column: [value, ...]}")
    return [mapped[k] for k in raw]


def select_rows(rows: PoolRows, cfg, where: str) -> tuple[np.ndarray, list[str]]:
    """(positions of the rows trained on, their class keys) under cfg's label_columns, label_map,
    exclude and balance_by; refuses columns the rows lack and exclude values no row has."""
    exclude = cfg.exclude or {}
    need = dict.fromkeys([*cfg.label_columns, *cfg.balance_by, *(c for c in exclude if c not in (CLASS, IMAGE))])
    missing = [c for c in need if c not in rows.columns]
    if missing:
        raise LabelError(f"{where}: no column(s) {', '.join(missing)}; columns: {', '.join(rows.columns) or 'none'}")
    keep = np.arange(len(rows.images))
    for column, values in exclude.items():
        if column == IMAGE:  # ids no row has are refused (a stale list), unless only the first max_images are read
            keep = keep[_not_in(rows.images, keep, values, f"{where}: exclude.{IMAGE}",
                                refuse_unknown=not getattr(cfg, "max_images", 0))]
        elif column != CLASS:
            keep = keep[_not_in(rows.columns[column], keep, values, f"{where}: exclude.{column}")]
    for c in cfg.label_columns:
        empty = [rows.images[i] for i in keep if rows.columns[c][i] == ""]
        if empty:
            raise LabelError(f"{where}: {len(empty)} row(s) have an empty {c!r} value, e.g. {examples(empty)}")
    raw = ["|".join(rows.columns[c][i] for c in cfg.label_columns) for i in keep]
    keys = class_keys(raw, cfg.label_map, where)
    if CLASS in exclude:
        kept = _not_in(keys, np.arange(len(keys)), exclude[CLASS], f"{where}: exclude.{CLASS}")
        keep, keys = keep[kept], [keys[i] for i in kept]
    return keep, keys


def _not_in(values: list[str], positions: np.ndarray, excluded: list[str], what: str,
            refuse_unknown: bool = True) -> np.ndarray:
    """Indices into `positions` whose value is not excluded; refuses excluded values that no row has
    (unless `refuse_unknown` is False)."""
    present = {values[i] for i in positions}
    unknown = [v for v in excluded if v not in present]
    if unknown and refuse_unknown:
        raise LabelError(f"{what}: no row has {examples(unknown)} (values found: {examples(sorted(present), 8)})")
    drop = set(excluded)
    return np.array([j for j, i in enumerate(positions) if values[i] not in drop], dtype=np.int64)


def data_hash(ids: list[str], keys: list[str], digests: list[str]) -> str:
    h = hashlib.sha256()
    for image, key, digest in zip(ids, keys, digests):
        h.update(f"{image}\t{key}\t{digest}\n".encode())
    return h.hexdigest()[:16]


# --- the pool in memory -----------------------------------------------------------------------------

@dataclass
class Pool:
    """Letterboxed uint8 images in memory, their ids, class keys and CSV columns, and the data's hash."""

    images: np.ndarray  # (N, S, S) uint8
    ids: list[str]
    keys: list[str]  # the class key of each image, e.g. "1", "0|1|0" or a label_map class
    data_hash: str
    failed: dict[str, str] = field(default_factory=dict)
    columns: dict[str, list[str]] = field(default_factory=dict)

    def groups(self, columns: list[str]) -> np.ndarray | None:
        """The balancing group of each image ("|"-joined values of `columns`), None without columns."""
        if not columns:
            return None
        return np.array(["|".join(self.columns[c][i] for c in columns) for i in range(len(self.ids))])


def _decode_one(data: bytes, size: int) -> np.ndarray:
    sq = letterbox(load_image(data).pixels, size)
    return (np.asarray(sq) * 255.0 + 0.5).astype(np.uint8)


def _decode_files(root: Path, images: list[str], size: int, progress: bool):
    """(uint8 images, sha256 hex of each file or None, {image: error}) for every file, decoded in threads."""
    out = np.zeros((len(images), size, size), np.uint8)
    digests: list[str | None] = [None] * len(images)
    failed: dict[str, str] = {}

    def work(n: int) -> None:
        try:
            data = read_bytes(root / images[n])
            out[n] = _decode_one(data, size)
            digests[n] = hashlib.sha256(data).hexdigest()
        except InputError as exc:
            failed[images[n]] = f"{exc.code}: {exc}"

    with decode_pool(_WORKERS, prefix="cxr-load") as pool:  # see threads.py
        for _ in tqdm(pool.map(work, range(len(images))), total=len(images), unit="img", desc="loading images",
                      disable=not progress, file=sys.stderr, mininterval=2.0):
            pass
    return out, digests, failed


def load_pool_from_csv(cfg, progress: bool = True) -> Pool:
    """The pool of `cfg.labels`, decoded from the original files; unreadable files are skipped (`failed`)."""
    rows = read_pool_rows(cfg)
    keep, keys = select_rows(rows, cfg, str(cfg.labels))
    rows = rows.take(keep)
    root = Path(cfg.image_root) if cfg.image_root else Path(cfg.labels).parent
    images, digests, failed = _decode_files(root, rows.images, cfg.input_size, progress)
    ok = np.array([d is not None for d in digests], dtype=bool)
    rows, keys = rows.take(np.flatnonzero(ok)), [k for k, good in zip(keys, ok) if good]
    return Pool(images[ok], rows.images, keys, data_hash(rows.images, keys, [d for d in digests if d]), failed,
                rows.columns)


# --- packs ------------------------------------------------------------------------------------------

def _encode(image: np.ndarray, image_format: str, quality: int) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    if image_format == "webp":
        Image.fromarray(image).save(buf, format="WEBP", quality=quality, method=6)
    else:
        Image.fromarray(image).save(buf, format="JPEG", quality=quality, optimize=True)
    return np.frombuffer(buf.getvalue(), np.uint8)


def build_pack(cfg, out, parts: int = 1, quality: int = 90, image_format: str = "jpeg",
               progress: bool = True) -> list[Path]:
    """Decode every row of the pool once and write the letterboxed images, compressed, with every CSV
    column and each original file's sha256, to `parts` HDF5 file(s) (NAME.partK.h5)."""
    # a pack holds the whole pool whatever the config's `exclude` says: it applies when training from the pack
    if image_format not in PACK_IMAGE_FORMATS or not 1 <= quality <= 100 or parts < 1:
        raise CxrEmbedError(f"pack: format one of {', '.join(PACK_IMAGE_FORMATS)}, quality 1..100, parts >= 1")
    rows = read_pool_rows(cfg)
    root = Path(cfg.image_root) if cfg.image_root else Path(cfg.labels).parent
    images, digests, failed = _decode_files(root, rows.images, cfg.input_size, progress)
    ok = np.flatnonzero([d is not None for d in digests])
    with decode_pool(_WORKERS, prefix="cxr-pack") as pool:
        blobs = list(tqdm(pool.map(lambda n: _encode(images[n], image_format, quality), ok), total=len(ok),
                          unit="img", desc="encoding", disable=not progress, file=sys.stderr, mininterval=2.0))
    attrs = {"format": PACK_FORMAT, "size": cfg.input_size, "quality": quality, "image_format": image_format,
             "max_images": cfg.max_images or 0, "n_failed": len(failed), "labels_file": Path(cfg.labels).name,
             "labels_sha256": hashlib.sha256(Path(cfg.labels).read_bytes()).hexdigest()}
    out = Path(out)
    paths = []
    for part in range(parts):
        path = out if parts == 1 else out.with_name(f"{out.stem}.part{part}{out.suffix}")
        sel = list(range(part, len(ok), parts))
        _write_pack(path, attrs, rows.take(ok[sel]), [blobs[j] for j in sel], [digests[ok[j]] for j in sel])
        paths.append(path)
    return paths


def _write_pack(path: Path, attrs: dict, rows: PoolRows, blobs: list[np.ndarray], digests: list[str]) -> None:
    """One pack file: the compressed images end to end with their offsets, each file's sha256, and the
    ids, CSV row numbers and columns as one gzip-compressed JSON table (a few bytes per image)."""
    tmp = path.with_name(path.name + ".tmp")
    table = {"ids": rows.images, "row": rows.row.tolist(), "columns": rows.columns}
    with h5py.File(tmp, "w") as f:
        f.attrs.update(attrs)
        f.create_dataset("images", data=np.concatenate(blobs) if blobs else np.zeros(0, np.uint8))
        f.create_dataset("offsets", data=np.concatenate([[0], np.cumsum([len(b) for b in blobs])]).astype(np.int64))
        f.create_dataset("sha256", data=np.frombuffer(b"".join(bytes.fromhex(d) for d in digests), np.uint8)
                         .reshape(len(digests), 32))
        f.create_dataset("table", data=np.frombuffer(gzip.compress(json.dumps(table).encode()), np.uint8))
    tmp.replace(path)


def _read_pack(path: Path) -> dict:
    """One pack file's attributes, ids, rows, digests, columns and image blobs (format 2) or keys (format 1)."""
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CxrEmbedError(f"cannot read pack {path}: {exc}") from None
    with f:
        fmt = f.attrs.get("format")
        if fmt not in (PACK_FORMAT, PACK_FORMAT_V1):
            raise CxrEmbedError(f"{path} is not a cxr-embed pack (format {fmt!r})")
        attrs = dict(f.attrs)
        if fmt == PACK_FORMAT_V1:
            return {"path": path, "attrs": attrs, "ids": [x.decode() if isinstance(x, bytes) else x for x in f["ids"][:]],
                    "blobs": f["jpeg"][:], "keys": [x.decode() if isinstance(x, bytes) else x for x in f["keys"][:]]}
        data, offsets = f["images"][:], f["offsets"][:]
        table = json.loads(gzip.decompress(f["table"][:].tobytes()))
        return {"path": path, "attrs": attrs, "ids": table["ids"], "row": np.array(table["row"], dtype=np.int64),
                "columns": table["columns"], "digests": [bytes(d).hex() for d in f["sha256"][:]],
                "blobs": [data[offsets[i]: offsets[i + 1]] for i in range(len(offsets) - 1)]}


def load_pool_from_packs(cfg, progress: bool = True) -> Pool:
    """The pool stored in `cfg.packs`, with cfg's classes, exclusions and balancing columns applied to
    the columns the packs store (format 2); format-1 packs serve only their own label columns."""
    parts = [_read_pack(Path(p)) for p in cfg.packs]
    if any(p["attrs"]["format"] == PACK_FORMAT_V1 for p in parts):
        return _pool_from_v1(parts, cfg, progress)
    _check_parts_agree(parts, cfg)
    where = f"pack {parts[0]['path']}" + (f" (+{len(parts) - 1} parts)" if len(parts) > 1 else "")
    ids = [i for p in parts for i in p["ids"]]
    columns = {c: [v for p in parts for v in p["columns"][c]] for c in parts[0]["columns"]}
    blobs = [b for p in parts for b in p["blobs"]]
    digests = [d for p in parts for d in p["digests"]]
    order = np.argsort(np.concatenate([p["row"] for p in parts]), kind="stable")  # parts interleave rows
    rows = PoolRows(ids, columns, np.concatenate([p["row"] for p in parts])).take(order)
    keep, keys = select_rows(rows, cfg, where)
    chosen = order[keep]
    rows = rows.take(keep)
    images = _decode_blobs([blobs[i] for i in chosen], progress)
    return Pool(images, rows.images, keys, data_hash(rows.images, keys, [digests[i] for i in chosen]),
                columns=rows.columns)


def _check_parts_agree(parts: list[dict], cfg) -> None:
    first = parts[0]["attrs"]
    for p in parts:
        a = p["attrs"]
        if a["labels_sha256"] != first["labels_sha256"] or int(a["size"]) != int(first["size"]) \
                or sorted(p["columns"]) != sorted(parts[0]["columns"]):
            raise CxrEmbedError(f"packs {parts[0]['path']} and {p['path']} come from different pools or sizes: "
                                "build all parts with one `cxr-embed pack`")
    if int(first["max_images"]) != int(cfg.max_images or 0):
        raise CxrEmbedError(f"pack {parts[0]['path']} holds the first {first['max_images'] or 'all'} rows of "
                            f"{first['labels_file']}, the config asks for max_images={cfg.max_images}: "
                            "rebuild the pack with the config's max_images")
    if int(first["size"]) != cfg.input_size:
        raise CxrEmbedError(f"pack {parts[0]['path']} holds {first['size']} px images, the config asks for "
                            f"input_size {cfg.input_size}: rebuild the pack or set input_size={first['size']}")


def _pool_from_v1(parts: list[dict], cfg, progress: bool) -> Pool:
    """A format-1 pack: its stored class keys, refused unless the config asks for exactly its columns."""
    for p in parts:
        packed = json.loads(p["attrs"].get("label_columns", "null"))
        if packed != list(cfg.label_columns) or cfg.label_map or cfg.exclude or cfg.balance_by:
            raise CxrEmbedError(f"pack {p['path']} (format 1) holds class keys of column(s) {packed} only; the config "
                                f"asks for {list(cfg.label_columns)}" + (" with label_map/exclude/balance_by" if
                                cfg.label_map or cfg.exclude or cfg.balance_by else "") +
                                ": rebuild the pack with `cxr-embed pack` (format 2 stores every column)")
    hashes = {str(p["attrs"]["data_hash"]) for p in parts}
    if len(hashes) != 1:
        raise CxrEmbedError(f"packs come from different data ({sorted(hashes)})")
    ids = [i for p in parts for i in p["ids"]]
    keys = [k for p in parts for k in p["keys"]]
    blobs = [b for p in parts for b in p["blobs"]]
    order = np.argsort(ids, kind="stable")
    return Pool(_decode_blobs([blobs[n] for n in order], progress), [ids[n] for n in order],
                [keys[n] for n in order], hashes.pop())


def _decode_blobs(blobs: list[np.ndarray], progress: bool) -> np.ndarray:
    from PIL import Image

    def work(b: np.ndarray) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(b.tobytes())).convert("L"))

    with decode_pool(_WORKERS, prefix="cxr-unpack") as pool:
        images = list(tqdm(pool.map(work, blobs), total=len(blobs), desc="unpacking", unit="img",
                           disable=not progress, file=sys.stderr, mininterval=2.0))
    if not images:
        raise CxrEmbedError("the packs hold no images for this config")
    return np.stack(images)
