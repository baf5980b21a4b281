"""Save and load probes as plain JSON (numbers and LightGBM's text model): nothing is unpickled."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from cxr_embed.errors import CxrEmbedError, ModelMismatch
from cxr_embed.identity import ModelIdentity

from .probe import Probe

FORMAT = "cxr-embed-probe/1"


class ProbeFileError(CxrEmbedError):
    code = "bad_probe_file"


def _plain(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, tuple):
        return list(v)
    return v


def save_probe(probe: Probe, path: str | os.PathLike, name: str | None = None, description: str = "") -> Path:
    """Write a fitted probe to PATH (JSON), with the identity of the model it was trained on."""
    if not hasattr(probe, "classes_"):
        raise CxrEmbedError("cannot save a probe that is not fitted")
    path = Path(path)
    doc = {
        "format": FORMAT,
        "name": name or path.stem,
        "description": description,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {k: _plain(v) for k, v in probe.get_params().items()},
        "classes": [_plain(c) for c in probe.classes_],
        "n_features": int(probe.n_features_in_),
        "calibration": probe.calibration_,
        "threshold": probe.threshold_,
        "threshold_info": probe.threshold_info_,
    }
    if probe.kind == "linear":
        doc["linear"] = {"coef": probe.linear_["coef"].tolist(), "intercept": probe.linear_["intercept"].tolist(), "C": probe.C_}
    else:
        doc["gbm"] = {"model": probe.gbm_model_, "n_rounds": probe.n_rounds_}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)
    return path


def load_probe(path: str | os.PathLike, expected_identity: dict | None = None) -> Probe:
    """Read a probe; with `expected_identity`, refuse one trained on another model's embeddings."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProbeFileError(f"cannot read probe {path}: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ProbeFileError(f"{path} is not a cxr-embed probe file")
    try:
        probe = Probe(**doc["params"])
        probe.classes_ = np.asarray(doc["classes"])
        probe.n_features_in_ = int(doc["n_features"])
        probe.calibration_ = doc["calibration"]
        probe.threshold_ = doc["threshold"]
        probe.threshold_info_ = doc["threshold_info"]
        if probe.kind == "linear":
            probe.linear_ = {"coef": np.asarray(doc["linear"]["coef"], np.float64),
                             "intercept": np.asarray(doc["linear"]["intercept"], np.float64)}
            probe.C_ = doc["linear"]["C"]
        else:
            probe.gbm_model_ = doc["gbm"]["model"]
            probe.n_rounds_ = doc["gbm"]["n_rounds"]
            probe._get_booster()
    except (KeyError, TypeError, ValueError) as exc:
        raise ProbeFileError(f"probe file {path} is incomplete or damaged: {exc}") from exc
    probe.name = doc.get("name", path.stem)
    probe.description = doc.get("description", "")
    if expected_identity is not None:
        if probe.identity is None:
            raise ModelMismatch(f"probe {path} does not record which embedding model it was trained on")
        ModelIdentity.coerce(expected_identity).check(probe.identity, f"probe {path.name}")
    return probe


def load_probes(path: str | os.PathLike, expected_identity=None) -> dict[str, Probe]:
    """Every probe of a folder (*.json), or the one probe file `path`, by name."""
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.glob("*.json"))
    else:
        raise ProbeFileError(f"--probes {path}: no such probe file or folder")
    out: dict[str, Probe] = {}
    for f in files:
        probe = load_probe(f, expected_identity=expected_identity)
        out[getattr(probe, "name", f.stem)] = probe
    return out
