"""Train a probe from a store and a label CSV: what `cxr-embed probe` does, as a Python function."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cxr_embed.labels import read_labels
from cxr_embed.store import Store

from .io import save_probe
from .metrics import auc_ci, sensitivity_specificity
from .probe import Probe, train_probe


@dataclass
class ProbeReport:
    """A trained probe, where it was written, and how it did on the label file's test split."""

    probe: Probe
    path: Path | None
    n_train: int
    positive: str | None
    test: dict | None  # auc, ci_low, ci_high, sensitivity, specificity, n (binary tasks with a test split)

    def text(self) -> str:
        lines = [f"wrote {self.path}: {self.probe.kind} probe, classes {self.probe.classes_.tolist()}"
                 + (f" (1 = {self.positive})" if self.positive else "")
                 + f", {self.n_train} training images, threshold {self.probe.threshold_} "
                 f"({self.probe.threshold_info_['method']})"]
        if self.test:
            t = self.test
            lines.append(f"test split: AUC {t['auc']:.3f} (95% CI {t['ci_low']:.3f}-{t['ci_high']:.3f}), sensitivity "
                         f"{t['sensitivity']:.3f}, specificity {t['specificity']:.3f} at the threshold; n={t['n']}")
        return "\n".join(lines)


def train_probe_from_labels(store: str | os.PathLike | Store, labels: str | os.PathLike, *, kind: str = "linear",
                            positive: str | None = None, out: str | os.PathLike | None = None,
                            name: str | None = None, warn=None, **params) -> ProbeReport:
    """Train a probe on the train split of `labels` (every row without a split column), save it to
    `out` when given, and score it on the test split when there is one."""
    store = store if isinstance(store, Store) else Store(store)
    table = read_labels(labels, positive=positive)
    rows = table.rows_in(store, "train", f"store {store.path}", warn=warn)
    table.check_trainable(rows)
    probe = train_probe(store.get([table.images[i] for i in rows]), table.y[rows], kind=kind,
                        identity=store.identity, **params)
    if table.binary:
        probe.description = f"{kind} probe on {Path(labels).name}: P({table.positive})"
        probe.class_names_ = table.class_names()  # [negative, positive], saved: evaluate checks its --positive against it
    path = save_probe(probe, out, name=name, description=getattr(probe, "description", "")) if out else None
    test = None
    test_rows = [i for i in table.rows("test") if table.images[i] in store] if any(table.splits) else []
    y = table.y[test_rows] == 1 if table.binary else None
    if test_rows and table.binary and min(int(y.sum()), int((~y).sum())) >= 2:  # an AUC CI needs 2 of each
        p = probe.predict_proba(store.get([table.images[i] for i in test_rows]))[:, 1]
        patients = [table.patients[i] for i in test_rows]
        a = auc_ci(y, p, groups=patients if all(patients) else None)  # clustered by patient where ids exist
        sens, spec = sensitivity_specificity(y, p, probe.threshold_)
        test = {"auc": a.auc, "ci_low": a.ci_low, "ci_high": a.ci_high, "sensitivity": sens, "specificity": spec,
                "n": len(test_rows)}
    return ProbeReport(probe, path, len(rows), table.positive, test)
