"""Scores of one embedding under a set of loaded probes, as the service and `predict` report them."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from cxr_embed.errors import CxrEmbedError

from .probe import Probe


class UnknownProbe(CxrEmbedError):
    code = "unknown_probe"


def plain(value):
    """A numpy scalar as the Python value (for JSON)."""
    return value.item() if hasattr(value, "item") else value


def check_names(probes: Mapping[str, Probe], names: list[str] | None) -> None:
    """Refuse probe names that are not loaded, listing those that are."""
    unknown = [n for n in (names or []) if n not in probes]
    if unknown:  # names come from a request: shown as repr (no control characters), cut short, at most 5
        shown = ", ".join(repr(n[:40] + ("..." if len(n) > 40 else "")) for n in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise UnknownProbe(f"unknown probe(s) {shown}{more}; loaded: {', '.join(probes) or 'none'}")


def score_embedding(probes: Mapping[str, Probe], embedding: np.ndarray, names: list[str] | None = None,
                    reliable: bool = True) -> dict[str, dict]:
    """Each probe's class probabilities; binary probes add the positive class's probability, the
    threshold and the decision at it. `reliable` is False when the input is not a frontal CXR."""
    check_names(probes, names)
    out = {}
    for name, probe in probes.items():
        if names and name not in names:
            continue
        proba = probe.predict_proba(embedding[None])[0]
        classes = [plain(c) for c in probe.classes_]
        entry = {"classes": classes, "probabilities": [round(float(p), 6) for p in proba], "reliable": reliable}
        if len(classes) == 2:
            entry.update(probability=round(float(proba[1]), 6), threshold=probe.threshold_,
                         positive=bool(proba[1] >= probe.threshold_), threshold_method=probe.threshold_info_["method"])
            if getattr(probe, "class_names_", None):  # what class 1 is, as the probe's training labels named it
                entry["positive_class"] = probe.class_names_[1]
        else:
            entry.update(predicted=classes[int(np.argmax(proba))])
        out[name] = entry
    return out
