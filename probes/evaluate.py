"""A saved probe scored on one's own labelled images: what `cxr-embed evaluate` does, as a function.

AUC with its DeLong 95% CI, AUPRC with a stratified bootstrap 95% CI, and sensitivity, specificity
and the confusion counts at the probe's own threshold (the one `predict` and the service decide at).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from cxr_embed.errors import ModelMismatch, LabelError
from cxr_embed.identity import ModelIdentity
from cxr_embed.labels import FALSE_WORDS, TRUE_WORDS, read_labels
from cxr_embed.store import Store

from .io import load_probe
from .metrics import auc_ci, auprc_ci, confusion_counts, sensitivity_specificity
from .probe import Probe

SPLIT_CHOICES = ("auto", "test", "train", "all")


@dataclass
class Evaluation:
    probe: str
    labels: str
    positive: str
    rows: str  # which rows were scored: "test split", "every row" ...
    n: int
    n_pos: int
    n_neg: int
    auc: float
    auc_ci_low: float
    auc_ci_high: float
    auprc: float
    auprc_ci_low: float
    auprc_ci_high: float
    threshold: float
    sensitivity: float
    specificity: float
    tp: int
    fp: int
    tn: int
    fn: int

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        return "\n".join([
            f"probe {self.probe} on {self.labels} ({self.rows}; positive = {self.positive}): "
            f"n={self.n} ({self.n_pos} positive, {self.n_neg} negative)",
            f"  AUC    {self.auc:.3f} (95% CI {self.auc_ci_low:.3f}-{self.auc_ci_high:.3f}, DeLong)",
            f"  AUPRC  {self.auprc:.3f} (95% CI {self.auprc_ci_low:.3f}-{self.auprc_ci_high:.3f}, bootstrap; "
            f"prevalence {self.n_pos / self.n:.3f})",
            f"  at the probe's threshold {self.threshold:.4f}: sensitivity {self.sensitivity:.3f}, specificity "
            f"{self.specificity:.3f} (TP {self.tp}, FN {self.fn}, TN {self.tn}, FP {self.fp})",
        ])


def _rows(table, split: str) -> tuple[str | None, str]:
    """Which split to score: auto = the test split when the file has splits, else every row."""
    if split == "all":
        return None, "every row"
    if split == "auto":
        split = "test" if any(table.splits) else "all"
        return (None, "every row") if split == "all" else ("test", "test split")
    if not any(table.splits):
        raise LabelError(f"{table.path}: --split {split} but the file has no 'split' column; use --split all")
    return split, f"{split} split"


def _side(name: str) -> frozenset:
    """A class name as written in a label CSV ("TB", or "Yes/yes" for yes/no labels), compared by meaning:
    1, true and yes are one positive side, 0, false and no one negative side, other names themselves."""
    words = [w.strip().lower() for w in name.split("/")]
    return frozenset("<true>" if w in TRUE_WORDS else "<false>" if w in FALSE_WORDS else w for w in words)


def _comparable(a: str, b: str) -> bool:
    """Both names on the yes/no scale, or both class names: then `_side` tells whether they agree."""
    return (_side(a) <= {"<true>", "<false>"}) == (_side(b) <= {"<true>", "<false>"})


def _as_positive(name: str) -> str | None:
    """What `read_labels(positive=...)` needs to make `name` (a recorded positive class) positive again:
    None for the true side of yes/no labels (their default), a word of the false side, or the name."""
    side = _side(name)
    if side == {"<true>"}:
        return None
    if side == {"<false>"}:
        return name.split("/")[0]
    return name


def evaluate_probe(probe: str | os.PathLike | Probe, store: str | os.PathLike | Store, labels: str | os.PathLike, *,
                   positive: str | None = None, split: str = "auto", n_boot: int = 2000, seed: int = 0,
                   warn=None) -> Evaluation:
    """Score a binary probe on the labelled images of `labels` found in `store` (same model required)."""
    store = store if isinstance(store, Store) else Store(store)
    name = getattr(probe, "name", None) if isinstance(probe, Probe) else Path(probe).stem
    probe = probe if isinstance(probe, Probe) else load_probe(probe, expected_identity=store.identity)
    if probe.identity is None:
        raise ModelMismatch(f"probe {name} does not record which embedding model it was trained on")
    ModelIdentity.coerce(probe.identity).check(store.identity, f"store {store.path}")  # one model, or refuse
    if len(probe.classes_) != 2:
        raise LabelError(f"probe {name} has {len(probe.classes_)} classes; evaluate scores binary probes "
                         "(AUC, sensitivity, specificity)")
    trained = getattr(probe, "class_names_", None)  # [negative, positive] of its training labels, when recorded
    table = read_labels(labels, positive=positive if positive is not None or not trained else _as_positive(trained[1]))
    if not table.binary:
        raise LabelError(f"{table.path}: {len(table.classes)} classes ({', '.join(table.class_names()[:5])}); name the "
                         "class the probe calls positive with --positive")
    if trained and _comparable(table.positive, trained[1]) and _side(table.positive) != _side(trained[1]):
        raise LabelError(f"probe {name} gives the probability of {trained[1]!r} (the positive class of its training "
                         f"labels), but {table.path} is read with {table.positive!r} as positive: every score would be "
                         f"read the wrong way round. Leave --positive out, or pass --positive {_as_positive(trained[1]) or trained[1]}")
    if trained and not _comparable(table.positive, trained[1]) and warn is not None:
        warn(f"warning: probe {name} was trained with {trained[1]!r} as positive and {table.path.name} has {table.positive!r}: "
             "make sure they are the same class (a yes/no label and a class name cannot be checked against each other)")
    which, described = _rows(table, split)
    if split == "auto" and which is None and warn is not None:
        warn(f"warning: {table.path.name} has no split column, so every row is scored; an image the probe was "
             "trained on scores higher than a new one would (an optimistic AUC): keep a test split aside")
    rows = table.rows_in(store, which, f"store {store.path}", warn=warn)
    y = table.y[rows] == 1
    if min(int(y.sum()), int((~y).sum())) < 2:
        raise LabelError(f"{table.path}: the {described} holds {int(y.sum())} positive and {int((~y).sum())} negative "
                         "image(s) found in the store; an AUC and its interval need at least 2 of each")
    p = probe.predict_proba(store.get([table.images[i] for i in rows]))[:, 1]
    patients = [table.patients[i] for i in rows]
    auc = auc_ci(y, p, groups=patients if all(patients) else None)  # clustered by patient where ids exist
    pr = auprc_ci(y, p, n_boot=n_boot, seed=seed)
    sens, spec = sensitivity_specificity(y, p, probe.threshold_)
    return Evaluation(getattr(probe, "name", name) or name, str(labels), table.positive, described, len(rows),
                      int(y.sum()), int((~y).sum()), auc.auc, auc.ci_low, auc.ci_high, pr.auprc, pr.ci_low,
                      pr.ci_high, float(probe.threshold_), sens, spec, **confusion_counts(y, p, probe.threshold_))
