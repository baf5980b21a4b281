"""The batch job behind `cxr-embed embed`: a folder or CSV of images -> a resumable HDF5 store."""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .embedder import Embedder
from .errors import InputError, InvalidEmbedding, LabelError
from .store import Store, StoreWriter

IMAGE_SUFFIXES = {".dcm", ".dicom", ".png", ".jpg", ".jpeg"}
FIRST_COMMIT_S = 5.0  # the first commit comes early, so a user sees work being saved


@dataclass
class InputItem:
    image_id: str
    path: Path
    metadata: dict = field(default_factory=dict)


def list_inputs(images: str | os.PathLike, image_root: str | os.PathLike | None = None) -> list[InputItem]:
    """Items from a folder (recursive, DICOM/PNG/JPEG by suffix), a CSV with an `image` column, or one image file."""
    src = Path(images)
    if src.is_dir():
        root = Path(image_root) if image_root else src
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        return [InputItem(p.relative_to(root).as_posix() if p.is_relative_to(root) else str(p), p) for p in files]
    if not src.is_file():
        raise InputError(f"--images {src}: no such folder, CSV or image file")
    if src.suffix.lower() in IMAGE_SUFFIXES:  # one image: its id is its file name
        return [InputItem(src.name, src)]
    if src.suffix.lower() != ".csv":
        raise InputError(f"--images {src}: expected a folder, a .csv file or an image "
                         f"({', '.join(sorted(IMAGE_SUFFIXES))})")
    root = Path(image_root) if image_root else src.parent
    return read_image_csv(src, root)


def read_image_csv(path: Path, root: Path) -> list[InputItem]:
    items, seen = [], set()
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or "image" not in reader.fieldnames:
            raise LabelError(f"{path}: needs an 'image' column (found: {', '.join(reader.fieldnames or []) or 'no header'})")
        for line, row in enumerate(reader, start=2):
            image = (row.get("image") or "").strip()
            if not image:
                raise LabelError(f"{path} line {line}: empty 'image' value")
            if image in seen:
                raise LabelError(f"{path} line {line}: image {image!r} is listed twice")
            seen.add(image)
            meta = {k: v for k, v in row.items() if k != "image" and k is not None}
            items.append(InputItem(image, root / image, meta))
    return items


def check_paths_exist(items: list[InputItem], images: str | os.PathLike, warn=None) -> int:
    """Refuse a CSV none of whose image paths exists (the usual cause: a wrong --image-root); report
    a partial miss through `warn`. Returns how many are missing."""
    missing = [it for it in items if not it.path.exists()]
    if not missing:
        return 0
    if len(missing) == len(items):
        raise InputError(f"--images {images}: none of its {len(items)} image paths exists (e.g. {missing[0].path} "
                         f"is not a file); paths in the CSV are relative to --image-root (default: the CSV's folder): "
                         "pass the folder they are relative to")
    if warn is not None:
        warn(f"warning: {len(missing)} of {len(items)} images listed in {images} are not found "
             f"(e.g. {missing[0].path}); they will be recorded as failed. Paths in the CSV are relative to "
             "--image-root (default: the CSV's folder)")
    return len(missing)


def shard_path(out: Path, rank: int, world: int) -> Path:
    return out.with_name(f"{out.stem}.rank{rank:03d}-of-{world:03d}{out.suffix}")


@dataclass
class EmbedSummary:
    store: Path
    embedded: int
    skipped: int
    failed: dict[str, str]
    total_in_store: int
    seconds: float

    def text(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{self.store}: embedded {self.embedded} new image(s) in {self.seconds:.1f} s ({rate:.1f} img/s), "
            f"{self.skipped} already present, {len(self.failed)} failed; {self.total_in_store} in store"
        ]
        for image_id, err in list(self.failed.items())[:20]:
            lines.append(f"  FAILED {image_id}: {err}")
        if len(self.failed) > 20:
            lines.append(f"  ... {len(self.failed) - 20} more (see `cxr-embed info {self.store}`)")
        return "\n".join(lines)


def embed_to_store(
    items: list[InputItem],
    out: str | os.PathLike,
    embedder: Embedder,
    commit_every_s: float = 30.0,
    commit_every_n: int = 4096,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
) -> EmbedSummary:
    """Embed every item not yet in the store; failures are recorded, never fatal. Resumable."""
    out = Path(out)
    if world > 1:
        items = items[rank::world]
        out = shard_path(out, rank, world)
    writer = StoreWriter(out, embedder.identity)
    todo = [it for it in items if it.image_id not in writer.done_ids]
    skipped = len(items) - len(todo)
    start = time.perf_counter()
    last_commit = start
    embedded = 0
    failed: dict[str, str] = {}
    meta_of = {it.image_id: it.metadata for it in todo}
    runtime = embedder.runtime.label  # backend/precision, with every embedding (a resumed store may mix them)
    bar = tqdm(
        total=len(todo), unit="img", desc=f"embedding -> {out.name}", disable=not progress,
        file=sys.stderr, dynamic_ncols=True, mininterval=1.0, position=rank,
    )
    bar.set_postfix(saved=writer.saved, failed=0, refresh=False)
    first_commit_s = min(commit_every_s, FIRST_COMMIT_S)  # so that `saved=` moves within seconds
    try:
        for result in embedder.iter_embed((it.image_id, it.path) for it in todo):
            error = result.error
            if error is None:
                try:  # the writer refuses a non-finite embedding: a failure of this image, never data
                    writer.add(result.key, result.embedding, {**meta_of[result.key], "findings": result.info.to_dict(),
                                                          "runtime": runtime})
                    embedded += 1
                except InvalidEmbedding as exc:
                    error = exc
            if error is not None:
                msg = f"{error.code}: {error}"
                writer.fail(result.key, msg)
                failed[result.key] = msg
            now = time.perf_counter()
            due = first_commit_s if last_commit == start else commit_every_s
            if writer.pending >= commit_every_n or now - last_commit >= due:
                writer.commit()  # appends the batch to the store's journal: its cost does not grow with the store
                last_commit = time.perf_counter()
            # saved = durable in the store (survives a kill now); unsaved = embedded, waiting for the next commit
            bar.set_postfix(saved=writer.saved, unsaved=writer.pending, failed=len(failed), refresh=False)
            bar.update(1)
    finally:
        writer.close()  # the last commit, and the journal folded in: the store is one file
        bar.set_postfix(saved=writer.saved, unsaved=writer.pending, failed=len(failed), refresh=False)
        bar.close()
    store = Store(out)
    return EmbedSummary(out, embedded, skipped, failed, len(store), time.perf_counter() - start)
