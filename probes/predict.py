"""Score images with saved probes into a CSV: what `cxr-embed predict` does, as a Python function.

One row per image: its id, each probe's probability of its positive class and decision at the
probe's threshold (multi-class probes: one probability column per class and the predicted class),
whether the scores are reliable, and the chest check's verdict and reasons. Rows are appended and
flushed as they are scored, so a killed run keeps what it scored; a re-run skips ids already in the
file (delete a row to score that image again). Beside it, `OUT.probes.json` names the probes that
wrote it and a fingerprint of each (`io.probe_fingerprint`): a re-run with a probe trained again
under the same name is refused rather than leaving the old probe's scores in place as if they were
the new one's.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from tqdm import tqdm

from cxr_embed.chest import is_reliable
from cxr_embed.batch import InputItem, check_paths_exist, list_inputs
from cxr_embed.embedder import Embedder
from cxr_embed.errors import CxrEmbedError
from cxr_embed.identity import ModelIdentity
from cxr_embed.store import atomic_replace

from .examples import example_probe_path
from .io import load_probes, probe_fingerprint
from .probe import Probe
from .scoring import plain, score_embedding

FIXED = ["image"]
TRAILER = ["reliable", "is_frontal_cxr", "chest_check_reasons", "error"]


def probe_columns(name: str, probe: Probe) -> list[str]:
    """The CSV columns of one probe: probability and decision (binary), or one per class + predicted."""
    if len(probe.classes_) == 2:
        return [f"{name}.probability", f"{name}.decision"]
    return [f"{name}.P({plain(c)})" for c in probe.classes_] + [f"{name}.predicted"]


def header(probes: Mapping[str, Probe]) -> list[str]:
    return FIXED + [c for name, p in probes.items() for c in probe_columns(name, p)] + TRAILER


@dataclass
class PredictSummary:
    out: Path
    scored: int
    skipped: int
    failed: int
    not_chest: int
    seconds: float

    def text(self) -> str:
        return (f"{self.out}: scored {self.scored} image(s) in {self.seconds:.1f} s, {self.skipped} already in the "
                f"file, {self.failed} failed, {self.not_chest} flagged as not a frontal CXR (scores unreliable)")


def score_row(image_id: str, result, probes: Mapping[str, Probe]) -> dict:
    """One CSV row from an EmbeddingResult (runtime.py)."""
    row = {"image": image_id}
    if result.error is not None:
        return {**row, "error": f"{result.error.code}: {result.error}"}
    chest = result.chest
    reliable = is_reliable(result.info, chest)
    scores = score_embedding(probes, result.embedding, reliable=reliable)
    for name, s in scores.items():
        if "probability" in s:
            row[f"{name}.probability"] = s["probability"]
            row[f"{name}.decision"] = int(s["positive"])
        else:
            row.update({f"{name}.P({c})": p for c, p in zip(s["classes"], s["probabilities"])})
            row[f"{name}.predicted"] = s["predicted"]
    reasons = chest.reasons + result.info.unreliable_reasons
    return {**row, "reliable": int(reliable), "is_frontal_cxr": int(chest.is_frontal_cxr),
            "chest_check_reasons": "; ".join(reasons)}


def load_for_predict(path: str | os.PathLike | None) -> tuple[dict[str, Probe], ModelIdentity]:
    """Probes (default: the shipped example) and the one model identity they all share."""
    path = Path(path) if path is not None else example_probe_path()
    probes = load_probes(path)
    if not probes:
        raise CxrEmbedError(f"--probe {path}: no probe files (*.json) there; train one with `cxr-embed probe`")
    identities = {n: p.identity for n, p in probes.items()}
    missing = [n for n, i in identities.items() if i is None]
    if missing:
        raise CxrEmbedError(f"probe(s) {', '.join(missing)} in {path} do not record their embedding model; retrain "
                            "them with `cxr-embed probe`")
    first_name, first = next(iter(identities.items()))
    identity = ModelIdentity.coerce(first)
    for name, other in identities.items():
        identity.check(other, f"probe {name} (probe {first_name} is of {identity.model_name})")
    return probes, identity


def probes_path(out: Path) -> Path:
    """Where the probes that wrote the scores file `out` are named: `OUT.probes.json` beside it."""
    return out.with_name(out.name + ".probes.json")


def probes_record(probes: Mapping[str, Probe]) -> dict:
    return {"probes": {name: probe_fingerprint(p) for name, p in probes.items()}}


def done_ids(out: Path, columns: list[str], probes: Mapping[str, Probe] | None = None) -> set[str]:
    """Ids already in `out`; refuses a file written with other columns (other probes) or, given
    `probes`, by other versions of these probes (`OUT.probes.json`)."""
    if not out.exists() or out.stat().st_size == 0:
        return set()
    with open(out, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        found = next(reader, None)
        if found != columns:
            raise CxrEmbedError(f"{out} has other columns than these probes write ({', '.join((found or [])[:4])} ...); "
                                "choose another --out, or delete it to start again")
        ids = {r[0] for r in reader if r}
    if probes is not None and ids:
        _check_same_probes(out, probes)
    return ids


def _check_same_probes(out: Path, probes: Mapping[str, Probe]) -> None:
    record = probes_path(out)
    try:
        written = json.loads(record.read_text(encoding="utf-8")) if record.stat().st_size <= 1 << 20 else None
    except FileNotFoundError:
        raise CxrEmbedError(f"{out} does not record which probes wrote it ({record.name} is missing: an earlier "
                            "cxr-embed, or a copy of the CSV alone), so its scores cannot be kept as these probes'; "
                            "choose another --out, or delete it to score every image again") from None
    except (OSError, ValueError) as exc:
        raise CxrEmbedError(f"{record} cannot be read ({type(exc).__name__}); delete {out} and it to score again") from None
    want = probes_record(probes)["probes"]
    had = written.get("probes") if isinstance(written, dict) else None
    if not isinstance(had, dict):
        raise CxrEmbedError(f"{record} is not a record of probes; delete {out} and it to score again")
    changed = sorted(n for n in want if had.get(n) != want[n])
    if changed:
        raise CxrEmbedError(f"{out} was written by another version of probe(s) {', '.join(changed)} (trained again "
                            "since): its rows are that version's scores. Choose another --out, or delete it (and "
                            f"{record.name}) to score every image with these probes")


def _write_record(out: Path, probes: Mapping[str, Probe]) -> None:
    """`OUT.probes.json`, written (whole or not at all: fsynced, then renamed) before the CSV's first row."""
    with atomic_replace(probes_path(out), "probes record") as tmp:
        tmp.write_text(json.dumps(probes_record(probes), indent=1), encoding="utf-8")


def predict_images(images: str | os.PathLike, out: str | os.PathLike, probes: str | os.PathLike | None = None,
                   image_root: str | os.PathLike | None = None, device: str = "auto", batch_size: int = 16,
                   progress: bool = True, log=None, backend: str = "auto", precision: str = "f32") -> PredictSummary:
    """Score every image of `images` (a folder, a CSV with an `image` column, or one file) with the
    probes of `probes` (a probe file or folder; default: the shipped example probe) into the CSV
    `out` (rules: module docstring). The model is the one the probes were trained on, run by
    `backend` at `precision` (`cxr_embed.runtime.RuntimeSettings`)."""
    loaded, identity = load_for_predict(probes)
    items = list_inputs(images, image_root, warn=log)
    check_paths_exist(items, images, warn=log)
    out = Path(out)
    columns = header(loaded)
    seen = done_ids(out, columns, loaded)
    if not seen:  # no rows yet (none, or a header alone): these probes write the file from here on
        _write_record(out, loaded)  # (its folder is made if need be)
    todo = [it for it in items if it.image_id not in seen]
    if log is not None and todo:
        log(f"loading {identity.model_name} and the chest check (a few seconds; the first batch is slower while "
            "the models warm up)")
    embedder = Embedder(identity.model_name, batch_size=batch_size, device=device, image_check="auto",
                        backend=backend, precision=precision)
    try:
        identity.check(embedder.identity, f"the installed {identity.model_name}")  # probes trained on other weights
        counts = _write_rows(todo, out, columns, loaded, embedder, progress)
    finally:
        embedder.close()
    return PredictSummary(out, counts[0], len(items) - len(todo), counts[1], counts[2], counts[3])


def _write_rows(todo: list[InputItem], out: Path, columns: list[str], probes: dict, embedder: Embedder,
                progress: bool) -> tuple[int, int, int, float]:
    start = time.perf_counter()
    scored = failed = not_chest = 0
    new_file = not out.exists() or out.stat().st_size == 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", newline="", encoding="utf-8") as fh, \
            tqdm(total=len(todo), unit="img", desc=f"scoring -> {out.name}", disable=not progress or not todo,
                 file=sys.stderr, dynamic_ncols=True, mininterval=1.0) as bar:
        writer = csv.DictWriter(fh, fieldnames=columns, restval="")
        if new_file:
            writer.writeheader()
        for result in embedder.iter_embed((it.image_id, it.path) for it in todo):
            row = score_row(result.key, result, probes)
            writer.writerow(row)
            fh.flush()  # a killed run keeps every row written so far
            failed += result.error is not None
            scored += result.error is None
            not_chest += result.error is None and not result.chest.is_frontal_cxr
            bar.update(1)
    return scored, failed, not_chest, time.perf_counter() - start
