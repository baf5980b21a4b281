"""What a probe file holds, checked field by field: a parsed JSON document in, a fitted Probe out.

A probe file is untrusted input. Every field is checked for presence, type, shape and finiteness
before any of it is used, so a damaged file is refused with a message naming the field, and a NaN
coefficient never turns into confident probabilities at /predict.
"""

from __future__ import annotations

import math
import re

import numpy as np

from cxr_embed.errors import CxrEmbedError
from cxr_embed.identity import ModelIdentity

from .probe import KINDS, Probe
from .trees import TreeModelError, parse_lightgbm_model

FORMAT = "cxr-embed-probe/1"
_FORMAT_RE = re.compile(r"cxr-embed-probe/([0-9]{1,6})")
_TOP_REQUIRED = {"format", "name", "params", "classes", "n_features", "calibration", "threshold", "threshold_info"}
_TOP_OPTIONAL = {"description", "created_at", "linear", "gbm", "class_names"}
_NAME = re.compile(r"[^\s,\x00-\x1f\x7f](?:[^,\x00-\x1f\x7f]{0,198}[^\s,\x00-\x1f\x7f])?")
_LABEL = re.compile(r"[^\x00-\x1f\x7f]{1,200}")  # a class name as the label CSV wrote it
MAX_CLASSES = 10_000
MAX_FEATURES = 1 << 20
# Weights are bounded so that scores of finite float32 embeddings stay finite in float64: a huge
# but finite coefficient would otherwise give inf - inf = NaN and NaN probabilities.
MAX_ABS = 1e12


class ProbeFileError(CxrEmbedError):
    """A probe file that cannot be used; the message names the file and what is wrong."""

    code = "bad_probe_file"


class _Invalid(Exception):
    """A field that fails its check; turned into ProbeFileError naming the file at the boundary."""


def probe_from_document(doc: object, source: str) -> Probe:
    """Check every field of a probe document and build the fitted Probe; ProbeFileError names `source`."""
    try:
        return _build(doc)
    except _Invalid as exc:
        raise ProbeFileError(f"{source}: {exc}") from None
    except TreeModelError as exc:
        raise ProbeFileError(f"{source}: gbm.model: {exc}") from None


def _build(doc: object) -> Probe:
    _check_format(doc)
    _keys(doc, "the document", _TOP_REQUIRED, _TOP_OPTIONAL)
    probe = Probe(**_params(doc["params"]))
    probe.n_features_in_ = _int(doc["n_features"], "n_features", 1, MAX_FEATURES)
    probe.classes_ = _classes(doc["classes"])
    if probe.identity is not None and probe.identity["dim"] != probe.n_features_in_:
        raise _Invalid(f"params.identity.dim={probe.identity['dim']} but n_features={probe.n_features_in_}")
    _outputs(probe, doc)
    _model(probe, doc)
    probe.class_names_ = _class_names(doc["class_names"], probe.classes_) if "class_names" in doc else None
    probe.name = _name(doc["name"])
    probe.description = _str(doc.get("description", ""), "description")
    _str(doc.get("created_at", ""), "created_at")
    return probe


def _check_format(doc: object) -> None:
    if not isinstance(doc, dict):
        raise _Invalid(f"not a cxr-embed probe file (a JSON {type(doc).__name__}, not an object)")
    if "format" not in doc:
        raise _Invalid("not a cxr-embed probe file (no 'format' field)")
    fmt = doc["format"]
    m = _FORMAT_RE.fullmatch(fmt) if isinstance(fmt, str) else None
    if m is None:
        raise _Invalid(f"not a cxr-embed probe file (format {str(fmt)[:40]!r})")
    if fmt != FORMAT:
        newer = int(m.group(1)) > int(FORMAT.rsplit("/", 1)[1])
        raise _Invalid(f"format {fmt!r} is {'newer than' if newer else 'not'} what this version reads ({FORMAT})"
                       + ("; upgrade cxr-embed to load it" if newer else ""))


def _keys(d: object, where: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(d, dict):
        raise _Invalid(f"{where} must be an object, not {type(d).__name__}")
    missing, unknown = sorted(required - set(d)), sorted(set(d) - required - optional)
    if missing:
        raise _Invalid(f"{where}: missing {', '.join(missing)}")
    if unknown:
        raise _Invalid(f"{where}: unknown field(s) {', '.join(repr(k)[:40] for k in unknown[:5])}")
    return d


def _str(v: object, where: str) -> str:
    if not isinstance(v, str):
        raise _Invalid(f"{where} must be a string, not {type(v).__name__}")
    return v


def _name(v: object) -> str:
    if not _NAME.fullmatch(_str(v, "name")):
        raise _Invalid(f"name {v[:40]!r} must be 1-200 printable characters without commas or outer spaces")
    return v


def _int(v: object, where: str, lo: int, hi: int) -> int:
    if type(v) is not int or not lo <= v <= hi:
        raise _Invalid(f"{where} must be an integer in [{lo}, {hi}], not {str(v)[:40]!r}")
    return v


def _num(v: object, where: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    """A finite JSON number (not a bool, not a string) in [lo, hi]."""
    if type(v) not in (int, float):
        raise _Invalid(f"{where} must be a number, not {type(v).__name__}")
    try:
        x = float(v)
    except OverflowError:
        raise _Invalid(f"{where} is too large") from None
    if not (math.isfinite(x) and lo <= x <= hi):
        raise _Invalid(f"{where} must be a finite number in [{lo:g}, {hi:g}], not {x!r}")
    return x


def _vector(v: object, where: str, n: int) -> np.ndarray:
    """A list of exactly n finite numbers."""
    if not isinstance(v, list) or len(v) != n:
        got = f"{len(v)} values" if isinstance(v, list) else type(v).__name__
        raise _Invalid(f"{where} must be a list of {n} numbers, got {got}")
    return np.array([_num(x, f"{where}[{i}]", -MAX_ABS, MAX_ABS) for i, x in enumerate(v)], dtype=np.float64)


def _matrix(v: object, where: str, shape: tuple[int, int]) -> np.ndarray:
    if not isinstance(v, list) or len(v) != shape[0]:
        got = f"{len(v)} rows" if isinstance(v, list) else type(v).__name__
        raise _Invalid(f"{where} must have {shape[0]} row(s) of {shape[1]} numbers, got {got}")
    return np.stack([_vector(row, f"{where}[{i}]", shape[1]) for i, row in enumerate(v)])


def _classes(v: object) -> np.ndarray:
    if not isinstance(v, list) or not 2 <= len(v) <= MAX_CLASSES:
        raise _Invalid(f"classes must be a list of 2 to {MAX_CLASSES} labels")
    kinds = {type(c) for c in v}
    if len(kinds) != 1 or kinds - {str, int, float, bool}:
        raise _Invalid(f"classes must all be strings, all integers or all numbers, got {sorted(k.__name__ for k in kinds)}")
    for i, c in enumerate(v):  # numbers: finite, and integers that numpy holds as int64
        if type(c) is int:
            _int(c, f"classes[{i}]", -(1 << 63), (1 << 63) - 1)
        elif type(c) is float:
            _num(c, f"classes[{i}]")
    if len(set(v)) != len(v):
        raise _Invalid(f"classes are not unique: {v[:10]}")
    return np.asarray(v)


def _class_names(v: object, classes: np.ndarray) -> list[str]:
    """A binary probe's [negative, positive] class names as its training labels wrote them (class 0
    and class 1: e.g. ["normal", "TB"]); what `evaluate` checks its --positive against."""
    if classes.tolist() != [0, 1]:
        raise _Invalid("class_names is for binary probes (classes [0, 1]); this one's classes are its names")
    if not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, str) and _LABEL.fullmatch(x) for x in v):
        raise _Invalid("class_names must be a list of 2 names of 1-200 printable characters")
    if v[0] == v[1]:
        raise _Invalid(f"class_names are the same: {v[0][:40]!r}")
    return list(v)


def _choice(v: object, where: str, choices: tuple[str, ...]) -> str:
    if v not in choices or not isinstance(v, str):
        raise _Invalid(f"{where} must be one of {', '.join(choices)}, not {str(v)[:40]!r}")
    return v


def _cs(v: object, where: str) -> tuple[float, ...] | None:
    if v is None:
        return None
    if not isinstance(v, list) or not 1 <= len(v) <= 100:
        raise _Invalid(f"{where} must be null or a list of 1 to 100 numbers")
    return tuple(_num(c, f"{where}[{i}]", 1e-12, MAX_ABS) for i, c in enumerate(v))


def _identity(v: object, where: str) -> dict:
    """The embedding model a probe was trained on: the keys every store and embedding records."""
    d = _keys(v, where, set(ModelIdentity.keys_()))
    out = {k: _str(d[k], f"{where}.{k}") for k in ModelIdentity.keys_() if k != "dim"}
    return {**out, "dim": _int(d["dim"], f"{where}.dim", 1, MAX_FEATURES)}


def _optional(check):
    return lambda v, where: None if v is None else check(v, where)


_PARAMS = {  # Probe's hyper-parameters (its get_params()) and the check of each
    "kind": lambda v, w: _choice(v, w, KINDS),
    "Cs": _cs,
    "cv": lambda v, w: _int(v, w, 2, 1000),
    "threshold_method": lambda v, w: _choice(v, w, ("youden", "sensitivity")),
    "target_sensitivity": lambda v, w: _num(v, w, 0.0, 1.0),
    "gbm_learning_rate": lambda v, w: _num(v, w, 1e-12, 1e3),
    "gbm_num_leaves": lambda v, w: _int(v, w, 2, 1 << 17),
    "gbm_max_rounds": lambda v, w: _int(v, w, 1, 1_000_000),
    "gbm_colsample": lambda v, w: _num(v, w, 1e-12, 1.0),
    "identity": _optional(_identity),
    "random_state": _optional(lambda v, w: _int(v, w, 0, (1 << 32) - 1)),
    "n_jobs": _optional(lambda v, w: _int(v, w, -1, 4096)),
}


def _params(v: object) -> dict:
    d = _keys(v, "params", {"kind"}, set(_PARAMS))
    return {k: _PARAMS[k](x, f"params.{k}") for k, x in d.items()}


def _outputs(probe: Probe, doc: dict) -> None:
    """Calibration and threshold (binary probes only) and the threshold's provenance."""
    if len(probe.classes_) == 2:
        cal = _keys(doc["calibration"], "calibration", {"a", "b"})
        probe.calibration_ = {k: _num(cal[k], f"calibration.{k}", -MAX_ABS, MAX_ABS) for k in ("a", "b")}
        probe.threshold_ = _num(doc["threshold"], "threshold", 0.0, 1.0)
    elif doc["calibration"] is not None or doc["threshold"] is not None:
        raise _Invalid(f"a probe of {len(probe.classes_)} classes has no calibration or threshold (both null)")
    else:
        probe.calibration_, probe.threshold_ = None, None
    info = doc["threshold_info"]
    if not isinstance(info, dict) or not isinstance(info.get("method"), str):
        raise _Invalid("threshold_info must be an object with a string 'method'")
    for k, x in info.items():
        if not isinstance(x, str):
            _num(x, f"threshold_info.{k[:40]}")
    probe.threshold_info_ = info


def _model(probe: Probe, doc: dict) -> None:
    """The linear weights or the GBM trees, shaped for this probe's classes and features."""
    kind, other = probe.kind, "gbm" if probe.kind == "linear" else "linear"
    if kind not in doc or other in doc:
        raise _Invalid(f"a {kind} probe needs a '{kind}' section and no '{other}' section")
    k, d = len(probe.classes_), probe.n_features_in_
    if kind == "linear":
        lin = _keys(doc["linear"], "linear", {"coef", "intercept", "C"})
        rows = 1 if k == 2 else k
        probe.linear_ = {"coef": _matrix(lin["coef"], "linear.coef", (rows, d)),
                         "intercept": _vector(lin["intercept"], "linear.intercept", rows)}
        probe.C_ = _num(lin["C"], "linear.C", 1e-12, MAX_ABS)
    else:
        gbm = _keys(doc["gbm"], "gbm", {"model", "n_rounds"})
        probe.n_rounds_ = _int(gbm["n_rounds"], "gbm.n_rounds", 1, 1_000_000)
        probe.gbm_model_ = _str(gbm["model"], "gbm.model")
        probe.trees_ = parse_lightgbm_model(probe.gbm_model_, d, k)
