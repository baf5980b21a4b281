"""The one reader of label CSVs: for probes, curves, evaluation, prediction and pretraining.

One set of rules and one set of error messages (each names the file and the line):
- columns: `image` (the id an image has in a store: its path relative to the image root, or the
  CSV value it was embedded under), one or more label columns, optional `split` (train/test) and
  `patient_id`; every other column is kept (`extra`) for metadata baselines and reports.
- labels: 0/1, true/false and yes/no (any case) are binary with 1/true/yes positive. Other values
  never guess which class is positive (scikit-learn's `pos_label` rule): two such classes need
  `positive=` (the refusal lists the classes found); with more than two classes the table is
  multi-class, unless `positive=` makes it one class against the rest.
- at least two classes, each with MIN_PER_CLASS examples where a model is trained on them.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from .errors import LabelError

MIN_PER_CLASS = 5  # of each class in any set a probe is trained on (cross-validation needs several)
SPLITS = ("train", "test")
TRUE_WORDS = {"1", "true", "yes", "y", "t", "positive", "pos"}
FALSE_WORDS = {"0", "false", "no", "n", "f", "negative", "neg"}
_MAX_EXAMPLES = 3


def examples(values: Iterable, n: int = _MAX_EXAMPLES) -> str:
    """A few values for an error message: 'a', 'b', 'c' (and 12 more)."""
    values = list(dict.fromkeys(str(v) for v in values))
    shown = ", ".join(repr(v) for v in values[:n])
    return shown + (f" (and {len(values) - n} more)" if len(values) > n else "")


@dataclass
class LabelTable:
    """Rows of a label CSV. `y` holds labels ready for a probe: 0/1 for binary tables (`positive`
    names the class that is 1), the values as given for multi-class ones."""

    path: Path
    images: list[str]
    raw: list[tuple[str, ...]]  # one tuple of label values per row (one per label column)
    splits: list[str]
    patients: list[str]
    label_columns: tuple[str, ...]
    extra: dict[str, list[str]] = field(default_factory=dict)
    positive: str | None = None  # the positive class of a binary table, as written in the CSV
    negative: str | None = None
    y: np.ndarray = field(default_factory=lambda: np.zeros(0))
    classes: list = field(default_factory=list)  # sorted classes of y

    @property
    def task(self) -> str:
        return self.path.stem

    @property
    def binary(self) -> bool:
        return self.positive is not None

    @property
    def labels(self) -> np.ndarray:
        """Alias of `y` (the name the probe and curve code always used)."""
        return self.y

    def class_names(self) -> list[str]:
        """Names of `classes` as written in the CSV (binary: [negative, positive])."""
        return [self.negative, self.positive] if self.binary else [str(c) for c in self.classes]

    def key(self, i: int) -> str:
        """Row i's label vector as one text key ("1", or "0|1|0" for several columns)."""
        return "|".join(self.raw[i])

    def rows(self, split: str | None = None) -> list[int]:
        """Row indices of one split (None: every row; 'train' also takes every row of a table
        without a split column, whose rows are all for training)."""
        if split is None:
            return list(range(len(self.images)))
        if split == "train" and not any(self.splits):
            return list(range(len(self.images)))
        return [i for i, s in enumerate(self.splits) if s == split]

    def rows_in(self, available, split: str | None, where: str, warn=None) -> list[int]:
        """Rows of `split` whose image is in `available` (a store, a set of ids). Refuses when none
        is, with examples of both sides; reports a partial match through `warn`."""
        wanted = self.rows(split)
        found = [i for i in wanted if self.images[i] in available]
        what = f"{split} " if split else ""
        if not wanted:
            raise LabelError(f"{self.path}: no {what}rows (splits found: {examples(set(self.splits)) or 'none'})")
        if not found:
            have = list(getattr(available, "ids", available))[:_MAX_EXAMPLES]
            raise LabelError(
                f"none of the {len(wanted)} {what}image ids of {self.path} is in {where}: the labels have e.g. "
                f"{examples(self.images[i] for i in wanted)}, {where} has e.g. {examples(have) or 'nothing'}. "
                "Ids must match the store's exactly (paths relative to --image-root when it was embedded)")
        if len(found) < len(wanted) and warn is not None:
            missing = [self.images[i] for i in wanted if self.images[i] not in available]
            warn(f"warning: {len(missing)} of {len(wanted)} {what}image(s) of {self.path.name} are not in {where} "
                 f"(e.g. {examples(missing)}); they are left out")
        return found

    def check_trainable(self, rows: list[int], what: str = "the training set") -> None:
        """Refuse `rows` unless they hold two classes and MIN_PER_CLASS of each."""
        values, counts = np.unique(self.y[rows], return_counts=True)
        names = dict(zip(self.classes, self.class_names()))
        detail = ", ".join(f"{names.get(v, v)!s}: {n}" for v, n in zip(values.tolist(), counts.tolist()))
        if len(values) < 2:
            raise LabelError(f"{self.path}: {what} holds a single class ({detail or 'no rows'}); "
                             f"a probe needs two or more (classes in the file: {examples(self.class_names())})")
        if counts.min() < MIN_PER_CLASS:
            raise LabelError(f"{self.path}: {what} needs at least {MIN_PER_CLASS} images of each class ({detail})")


def read_labels(path: str | os.PathLike, label_columns: str | Iterable[str] = "label", *,
                require_split: bool = False, positive: str | None = None, max_rows: int = 0,
                encode: bool = True) -> LabelTable:
    """Read and validate a label CSV (rules: module docstring). Raises LabelError naming the line.

    `encode=False` keeps the raw values only (`key(i)`), as pretraining's class keys need."""
    path = Path(path)
    columns = (label_columns,) if isinstance(label_columns, str) else tuple(label_columns)
    if not path.is_file():
        raise LabelError(f"label file {path} not found")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            table = _read_rows(path, csv.DictReader(fh), columns, require_split, max_rows)
    except UnicodeDecodeError as exc:
        raise LabelError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise LabelError(f"{path}: not a readable CSV file: {exc}") from None
    if encode and len(columns) == 1:
        _encode(table, positive)
    return table


def _read_rows(path: Path, reader: csv.DictReader, columns: tuple[str, ...], require_split: bool,
               max_rows: int) -> LabelTable:
    cols = reader.fieldnames or []
    need = ["image", *columns] + (["split"] if require_split else [])
    missing = [c for c in need if c not in cols]
    if missing:
        raise LabelError(f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(cols) or 'no header'}")
    table = LabelTable(path, [], [], [], [], columns, {c: [] for c in cols if c not in (*need, "split", "patient_id")})
    seen: dict[str, int] = {}
    for line, row in enumerate(reader, start=2):
        image = (row.get("image") or "").strip()
        values = tuple((row.get(c) or "").strip() for c in columns)
        if not image or any(v == "" for v in values):
            empty = "image" if not image else columns[[v == "" for v in values].index(True)]
            raise LabelError(f"{path} line {line}: empty {empty!r} value")
        if image in seen:
            raise LabelError(f"{path} line {line}: image {image!r} is listed twice (first on line {seen[image]})")
        seen[image] = line
        split = (row.get("split") or "").strip().lower()
        if "split" in cols and split not in SPLITS:
            raise LabelError(f"{path} line {line}: split must be one of {', '.join(SPLITS)}, not {split!r}")
        table.images.append(image)
        table.raw.append(values)
        table.splits.append(split)
        table.patients.append((row.get("patient_id") or "").strip())
        for c in table.extra:
            table.extra[c].append((row.get(c) or "").strip())
        if max_rows and len(table.images) >= max_rows:
            break
    if not table.images:
        raise LabelError(f"{path}: no rows")
    return table


def _encode(table: LabelTable, positive: str | None) -> None:
    """Set y, classes, positive and negative by the module's rules."""
    raw = [r[0] for r in table.raw]
    found = sorted(set(raw))
    if len(found) < 2:
        raise LabelError(f"{table.path}: every row has the label {found[0]!r}; a probe needs two or more classes")
    lowered = {v.lower() for v in found}
    boolean = lowered <= TRUE_WORDS | FALSE_WORDS and bool(lowered & TRUE_WORDS) and bool(lowered & FALSE_WORDS)
    if positive is not None and boolean and positive.lower() in TRUE_WORDS | FALSE_WORDS:
        # yes/no labels in any case: "--positive yes" takes "Yes" and "YES" too
        side = TRUE_WORDS if positive.lower() in TRUE_WORDS else FALSE_WORDS
        table.y = np.array([1 if v.lower() in side else 0 for v in raw], dtype=np.int64)
        table.classes = [0, 1]
        table.positive = "/".join(v for v in found if v.lower() in side)
        table.negative = "/".join(v for v in found if v.lower() not in side)
        return
    if positive is not None:
        if positive not in found:
            raise LabelError(f"{table.path}: positive class {positive!r} is not a label of the file "
                             f"(labels found: {examples(found, 10)})")
        _set_binary(table, raw, positive, "rest" if len(found) > 2 else next(v for v in found if v != positive))
        return
    if boolean:
        pos = [v for v in found if v.lower() in TRUE_WORDS]
        neg = [v for v in found if v.lower() in FALSE_WORDS]
        table.y = np.array([1 if v.lower() in TRUE_WORDS else 0 for v in raw], dtype=np.int64)
        table.classes, table.positive, table.negative = [0, 1], "/".join(pos), "/".join(neg)
        return
    if len(found) == 2:
        raise LabelError(f"{table.path}: labels {examples(found)} do not say which class is positive: "
                         f"name it (--positive {found[0]!r} or --positive {found[1]!r}, or positive= in Python), "
                         "or write the labels as 0/1")
    ints = all(re.fullmatch(r"-?[0-9]+", v) for v in found)
    if ints and len({int(v) for v in found}) < len(found):  # "01" and "1": one class or two?
        raise LabelError(f"{table.path}: labels {examples(found, 10)} name the same number in different ways; "
                         "write each class one way")
    table.y = np.array([int(v) for v in raw] if ints else raw)
    table.classes = sorted(set(table.y.tolist()))


def _set_binary(table: LabelTable, raw: list[str], positive: str, negative: str) -> None:
    table.y = np.array([1 if v == positive else 0 for v in raw], dtype=np.int64)
    table.classes, table.positive, table.negative = [0, 1], positive, negative
