"""Fit rows in the format of curve.csv, and rows made elsewhere that the curve can take in.

A fit that is not a probe on a store (`cxr-embed finetune` fits a network on the pixels) writes one
row per fit to a CSV with curve.csv's columns, and beside it, in `<stem>.scores.jsonl`, one record
per fit: the training images it was drawn (so the curve can check that its draws are the same) and
its score for every test image (so the curve's paired, patient-bootstrapped statistics can use it).
Both files are rewritten whole and atomically after each fit, the records first: a fit counts as
done when both files hold it, so a run killed at any moment resumes where it stopped. A row without
its record cannot come from a kill (the record is written first): such a file is someone else's,
and is refused rather than rewritten without that row. Each record also keeps what its fit was made
from (`run`: the weights, the labels file, the images, the seed), so that a resumed run can refuse
fits of another run instead of counting them as its own.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cxr_embed.errors import CxrEmbedError
from cxr_embed.store import atomic_replace

from .bootstrap import weighted_auc, weighted_average_precision

COLUMNS = ("task", "model", "store", "probe", "size", "repeat", "n_train", "auc", "auprc", "chosen")


class RowsFileError(CxrEmbedError, ValueError):
    """A rows file (or its scores beside it) that is not ours, is damaged, or lacks what is needed."""


def fit_row(task: str, model: str, store: str, probe: str, size, repeat: int, n_train: int, y: np.ndarray,
            scores: np.ndarray, chosen: str) -> dict:
    """One row of curve.csv: AUC and AUPRC of `scores` on test labels `y` (1 = positive)."""
    y = np.asarray(y) == 1
    ones = np.ones((1, len(y)))
    return {"task": task, "model": model, "store": store, "probe": probe, "size": str(size), "repeat": int(repeat),
            "n_train": int(n_train), "auc": round(float(weighted_auc(y, scores, ones)[0]), 5),
            "auprc": round(float(weighted_average_precision(y, scores, ones)[0]), 5), "chosen": chosen}


def write_csv(path: Path, rows: list[dict]) -> None:
    """Write rows (the first row's keys are the header) atomically: a reader never sees half a file."""
    if not rows:
        return
    with atomic_replace(Path(path), "rows file") as tmp, open(tmp, "w", newline="") as fh:  # fsynced, then renamed
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@contextmanager
def writing(path: str | os.PathLike):
    """Hold `<rows file>.lock` while a run writes `path`: a second run on the same rows file is
    refused (each rewrites both files from what it holds, so one would drop the other's fits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RowsFileError(f"another run is writing {path} (it holds {lock.name}); wait for it to end, or "
                                "write to another --out") from None
        yield
    finally:
        os.close(fd)  # releases the lock; the empty lock file stays (harmless: only a held lock counts)


def file_hash(path: str | os.PathLike) -> str:
    """The first 16 hex digits of a file's SHA-256 (what a fit record keeps of its labels file)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError as exc:
        raise RowsFileError(f"cannot read {path} ({exc.strerror})") from None
    return h.hexdigest()[:16]


def scores_path(path: str | os.PathLike) -> Path:
    """Where the per-fit records of the rows file `path` live: `<stem>.scores.jsonl` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.scores.jsonl")


@dataclass
class ScoredFit:
    """A finished fit: its curve.csv row, the images it was trained on, and its test scores by image."""

    row: dict
    train_images: list[str]
    scores: dict[str, float]
    run: dict | None = None  # what the fit was made from (module docstring); None in records of older versions

    @property
    def key(self) -> tuple[str, str, str, int]:
        return fit_key(self.row)


def fit_key(row: dict) -> tuple[str, str, str, int]:
    """(model, probe, size, repeat): what identifies a fit within one task's rows file."""
    return str(row["model"]), str(row["probe"]), str(row["size"]), int(row["repeat"])


class ScoredRows:
    """The finished fits of one rows file, kept resumably (module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.fits: dict[tuple, ScoredFit] = {}
        rows = _read_rows(self.path)
        if rows and not scores_path(self.path).is_file():
            raise RowsFileError(f"{self.path} has rows but no per-image scores beside it ({scores_path(self.path).name}): "
                                "it was not written by `cxr-embed finetune` (a curve.csv?), or its scores were "
                                "removed; it is left as it is: write to another --out")
        records = _read_records(scores_path(self.path)) if rows else {}
        for key, row in rows.items():
            if key not in records:  # records are written first: a kill cannot leave a row without one
                raise RowsFileError(f"{self.path}: the row of {'/'.join(map(str, key))} has no record in "
                                    f"{scores_path(self.path).name}; the file was not written by `cxr-embed finetune` "
                                    "alone: it is left as it is: write to another --out")
            rec = records[key]
            self.fits[key] = ScoredFit(row, rec["train_images"], dict(zip(rec["test_images"], rec["scores"])),
                                       rec.get("run"))

    def __contains__(self, key: tuple) -> bool:
        return key in self.fits

    def add(self, fit: ScoredFit) -> None:
        """Keep `fit` (replacing one with the same key) and rewrite both files."""
        self.fits[fit.key] = fit
        self.path.parent.mkdir(parents=True, exist_ok=True)
        records = [{"key": list(f.key), "train_images": f.train_images, "test_images": list(f.scores),
                    "scores": list(f.scores.values()), **({"run": f.run} if f.run is not None else {})}
                   for f in self.fits.values()]
        with atomic_replace(scores_path(self.path), "scores file") as tmp, open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(r, allow_nan=False) + "\n" for r in records)
        write_csv(self.path, [f.row for f in self.fits.values()])


def _read_rows(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header, rows = tuple(reader.fieldnames or ()), list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise RowsFileError(f"{path} cannot be read as a rows file ({exc}); move it away to start over") from None
    if header != COLUMNS:
        raise RowsFileError(f"{path} is not a rows file of curve.csv's format (columns {', '.join(COLUMNS)}); "
                            f"it has {', '.join(header) or 'no header'}: name another --out")
    for n, r in enumerate(rows, start=2):
        if None in r or None in r.values():
            raise RowsFileError(f"{path} line {n}: {'more' if None in r else 'fewer'} fields than the header's "
                                f"{len(COLUMNS)}; move it away to start over")
    try:
        return {fit_key(r): r for r in rows}
    except (ValueError, TypeError) as exc:
        raise RowsFileError(f"{path}: a row has no whole-number repeat ({exc}); move it away to start over") from None


def _read_records(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    out = {}
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):
            try:
                rec = _record(json.loads(raw.decode("utf-8")))
            except (ValueError, KeyError, IndexError, TypeError) as exc:  # UnicodeDecodeError is a ValueError
                raise RowsFileError(f"{path} line {n}: not a fit record ({str(exc)[:200]}); it is written by "
                                    "`cxr-embed finetune`: move it away (with its rows file) to start over") from None
            out[rec["key"]] = rec
    return out


def _record(rec) -> dict:
    """A fit record checked in full (the curve computes its statistics from these scores)."""
    if not isinstance(rec, dict):
        raise TypeError("a JSON object expected")
    key = rec["key"]
    if not (isinstance(key, list) and len(key) == 4 and all(isinstance(k, (str, int)) for k in key)):
        raise ValueError("key: [model, probe, size, repeat] expected")
    rec["key"] = (str(key[0]), str(key[1]), str(key[2]), int(key[3]))
    for name in ("train_images", "test_images"):
        if not (isinstance(rec[name], list) and all(isinstance(i, str) for i in rec[name])):
            raise TypeError(f"{name}: a list of image ids expected")
    scores = rec["scores"]
    if not (isinstance(scores, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in scores)):
        raise TypeError("scores: a list of numbers expected")
    if not all(math.isfinite(v) for v in scores):
        raise ValueError("a score is not finite")
    if len(rec["test_images"]) != len(scores):
        raise ValueError("as many scores as test images expected")
    if len(set(rec["test_images"])) != len(scores):
        raise ValueError("a test image is scored twice")
    if not isinstance(rec.get("run", {}), dict):
        raise TypeError("run: an object expected")
    return rec


def read_scored_rows(path: str | os.PathLike) -> list[ScoredFit]:
    """The finished fits of a rows file, for the curve; refuses a file without its per-image scores."""
    path = Path(path)
    if not path.is_file():
        raise RowsFileError(f"no rows file at {path}")
    if not scores_path(path).is_file():
        raise RowsFileError(f"{path} has no per-image test scores beside it ({scores_path(path).name}): the curve "
                            "needs them for paired statistics; rows written by `cxr-embed finetune` have them")
    fits = list(ScoredRows(path).fits.values())
    if not fits:
        raise RowsFileError(f"{path} holds no finished fit")
    return fits
