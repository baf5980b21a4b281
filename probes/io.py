"""Save and load probes as plain JSON (numbers and LightGBM's text model): nothing is unpickled.

Probe files are untrusted: a file is opened only once it is known to be a regular file of bounded
size (a FIFO would block startup for ever), read as strict UTF-8 JSON, and checked field by field
(schema.py) before a Probe is built; LightGBM's native parser never reads it (trees.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

import numpy as np

from cxr_embed.errors import CxrEmbedError, ModelMismatch
from cxr_embed.identity import ModelIdentity

from .probe import Probe
from .schema import FORMAT, ProbeFileError, probe_from_document

__all__ = ["FORMAT", "MAX_BYTES", "ProbeFileError", "save_probe", "load_probe", "load_probe_dir", "load_probes",
           "check_probe_model", "probe_fingerprint"]

MAX_BYTES = 64 * 1024 * 1024  # a 1280-d linear probe is ~60 KB, a 300-round 10-class GBM a few MB


def _plain(v):
    """numpy scalars and tuples (also inside dicts and lists) as JSON's own types."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v


def save_probe(probe: Probe, path: str | os.PathLike, name: str | None = None, description: str = "") -> Path:
    """Write a fitted probe to PATH (JSON), with the identity of the model it was trained on."""
    if not hasattr(probe, "classes_"):
        raise CxrEmbedError("cannot save a probe that is not fitted")
    path = Path(path)
    doc = _document(probe, name or path.stem, description)
    try:  # write only what load_probe accepts
        probe_from_document(doc, f"probe to save as {path}")
    except ProbeFileError as exc:
        raise CxrEmbedError(f"cannot save: {exc}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, allow_nan=False))
    os.replace(tmp, path)
    return path


def probe_fingerprint(probe: Probe) -> str:
    """16 hex digits of SHA-256 over what the probe computes (its file's fields but its name, description
    and creation time): a probe trained again, even into the same file name, has another one."""
    doc = _document(probe, "", "")
    for key in ("name", "description", "created_at"):
        doc.pop(key, None)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, allow_nan=False).encode()).hexdigest()[:16]


def _document(probe: Probe, name: str, description: str) -> dict:
    doc = {
        "format": FORMAT,
        "name": name,
        "description": description,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": probe.get_params(),
        "classes": list(probe.classes_),
        "n_features": int(probe.n_features_in_),
        "calibration": probe.calibration_,
        "threshold": probe.threshold_,
        "threshold_info": probe.threshold_info_,
    }
    if getattr(probe, "class_names_", None):  # a binary probe's [negative, positive] label names
        doc["class_names"] = list(probe.class_names_)
    if probe.kind == "linear":
        doc["linear"] = {"coef": probe.linear_["coef"].tolist(), "intercept": probe.linear_["intercept"].tolist(), "C": probe.C_}
    else:
        doc["gbm"] = {"model": probe.gbm_model_, "n_rounds": probe.n_rounds_}
    return _plain(doc)


def load_probe(path: str | os.PathLike, expected_identity: dict | None = None) -> Probe:
    """Read a probe; with `expected_identity`, refuse one trained on another model's embeddings."""
    path = Path(path)
    probe = probe_from_document(_parse_json(_read_regular(path), path), f"probe file {path}")
    if expected_identity is not None:
        check_probe_model(probe, expected_identity, path)
    return probe


def check_probe_model(probe: Probe, identity, path: str | os.PathLike) -> None:
    """Raise ModelMismatch unless the probe (read from `path`) was trained on `identity`'s embeddings."""
    if probe.identity is None:
        raise ModelMismatch(f"probe {path} does not record which embedding model it was trained on")
    ModelIdentity.coerce(identity).check(probe.identity, f"probe {Path(path).name}")


def load_probe_dir(path: str | os.PathLike, expected_identity: dict | None = None) -> dict[str, Probe]:
    """Every *.json probe in a folder by name; two files of one name, or any bad file, is an error."""
    folder = Path(path)
    if not folder.is_dir():
        raise ProbeFileError(f"{folder} is not a folder of probes")
    probes: dict[str, Probe] = {}
    source: dict[str, Path] = {}
    for file in sorted(folder.glob("*.json")):  # listing a folder opens none of its files
        probe = load_probe(file, expected_identity)
        if probe.name in probes:
            raise ProbeFileError(f"probe files {source[probe.name]} and {file} are both named {probe.name!r}; "
                                 "rename one (save_probe(..., name=...)) or remove it")
        probes[probe.name], source[probe.name] = probe, file
    return probes


def load_probes(path: str | os.PathLike, expected_identity: dict | None = None) -> dict[str, Probe]:
    """Probes by name from a folder of *.json files or from a single probe file."""
    if Path(path).is_dir():
        return load_probe_dir(path, expected_identity)
    probe = load_probe(path, expected_identity)
    return {probe.name: probe}


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(st: os.stat_result, path: Path) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise ProbeFileError(f"probe {path} is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > MAX_BYTES:
        raise ProbeFileError(f"probe {path} is {st.st_size} bytes, over the {MAX_BYTES} byte limit")


def _read_regular(path: Path) -> bytes:
    """The bytes of a regular file (symlinks followed) of at most MAX_BYTES; never opens a FIFO."""
    try:
        _check_regular(os.stat(path), path)
        # O_NONBLOCK: should the path become a FIFO between stat and open, open does not wait for a
        # writer, and fstat below refuses it.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as fh:
            _check_regular(os.fstat(fh.fileno()), path)
            data = fh.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ProbeFileError(f"cannot read probe {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ProbeFileError(f"probe {path} grew over the {MAX_BYTES} byte limit while being read")
    return data


def _no_constant(token: str):
    raise ValueError(f"{token} is not a JSON number")


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    d: dict = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"key {k[:40]!r} appears twice in one object")
        d[k] = v
    return d


def _parse_json(data: bytes, path: Path) -> object:
    """Strict JSON: UTF-8, no NaN/Infinity tokens, no key twice in an object, bounded nesting."""
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise ProbeFileError(f"cannot read probe {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise ProbeFileError(f"cannot read probe {path}: JSON nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError, and the two checks above
        raise ProbeFileError(f"cannot read probe {path}: not valid JSON ({exc})") from None
