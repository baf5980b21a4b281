"""The batch job behind `cxr-embed embed`: a folder or CSV of images -> a resumable HDF5 store."""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

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


def list_inputs(images: str | os.PathLike, image_root: str | os.PathLike | None = None, warn=None) -> list[InputItem]:
    """Items from a folder (recursive: DICOM/PNG/JPEG by suffix, and files of any other name that are
    DICOM files, as PACS exports often name them: IM0001, 1.2.840...), a CSV with an `image` column, or
    one image file. The files of a folder left out are reported through `warn`."""
    src = Path(images)
    if src.is_dir():
        root = Path(image_root) if image_root else src
        files, skipped = [], []
        for p in sorted(src.rglob("*")):
            if p.is_file() and not p.name.startswith("."):
                image = p.suffix.lower() in IMAGE_SUFFIXES or (p.name.upper() != "DICOMDIR" and _is_dicom_file(p))
                (files if image else skipped).append(p)  # DICOMDIR: a media's index of its files, no image
        if skipped and warn is not None:
            examples = ", ".join(p.name for p in skipped[:3])
            warn(f"note: {len(skipped)} file(s) in {src} are not DICOM, PNG or JPEG and are left out (e.g. {examples})")
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


def _is_dicom_file(path: Path) -> bool:
    """A DICOM file (PS3.10: "DICM" after a 128-byte preamble), whatever its name: 132 bytes read."""
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:] == b"DICM"
    except OSError:
        return False


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
    cpu_seconds: float = 0.0  # this process's CPU time (all its threads) over the same span

    def text(self) -> str:
        rate = self.embedded / self.seconds if self.seconds > 0 else 0.0
        cpu = f"; {self.cpu_seconds / self.embedded:.3f} CPU s per image" if self.embedded and self.cpu_seconds else ""
        lines = [
            f"{self.store}: embedded {self.embedded} new image(s) in {self.seconds:.1f} s ({rate:.1f} img/s{cpu}), "
            f"{self.skipped} already present, {len(self.failed)} failed; {self.total_in_store} in store"
        ]
        for image_id, err in list(self.failed.items())[:20]:
            lines.append(f"  FAILED {image_id}: {err}")
        if len(self.failed) > 20:
            lines.append(f"  ... {len(self.failed) - 20} more (see `cxr-embed info {self.store}`)")
        return "\n".join(lines)


@dataclass
class EmbedProgress:
    """What `embed_into` has done so far: images embedded, and failures ("code: message" by id)."""

    embedded: int = 0
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def done(self) -> int:
        return self.embedded + len(self.failed)


def embed_into(
    writer: StoreWriter,
    items: Iterable[InputItem],
    embedder: Embedder,
    commit_every_s: float = 30.0,
    commit_every_n: int = 4096,
    on_result: Callable[[EmbedProgress], None] | None = None,
) -> EmbedProgress:
    """Embed the items not yet in `writer`'s store into it, committing every `commit_every_s` seconds or
    `commit_every_n` images, and at the end (on an error too). Failures are recorded, never fatal.
    `items` may be a stream (e.g. a Ray Data split): it is read as the model goes."""
    progress = EmbedProgress()
    runtime = embedder.runtime.label  # backend/precision, with every embedding (a resumed store may mix them)
    start = last_commit = time.perf_counter()
    first_commit_s = min(commit_every_s, FIRST_COMMIT_S)  # so that a user sees work saved within seconds
    todo = (it for it in items if it.image_id not in writer.done_ids)
    try:
        for result in embedder.iter_embed((it, it.path) for it in todo):
            item, error = result.key, result.error
            if error is None:
                try:  # the writer refuses a non-finite embedding: a failure of this image, never data
                    writer.add(item.image_id, result.embedding,
                               {**item.metadata, "findings": result.info.to_dict(), "runtime": runtime})
                    progress.embedded += 1
                except InvalidEmbedding as exc:
                    error = exc
            if error is not None:
                progress.failed[item.image_id] = f"{error.code}: {error}"
                writer.fail(item.image_id, progress.failed[item.image_id])
            now = time.perf_counter()
            due = first_commit_s if last_commit == start else commit_every_s
            if writer.pending >= commit_every_n or now - last_commit >= due:
                writer.commit()  # appends the batch to the store's journal: its cost does not grow with the store
                last_commit = time.perf_counter()
                commit_every_s = max(commit_every_s, 20 * (last_commit - now))  # a fold (rare) may take longer
            if on_result is not None:
                on_result(progress)
    finally:
        writer.commit()
    return progress


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
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(
        total=len(todo), unit="img", desc=f"embedding -> {out.name}", disable=not progress,
        file=sys.stderr, dynamic_ncols=True, mininterval=1.0, position=rank,
    )
    last = EmbedProgress()

    def show(done: EmbedProgress, step: int = 1) -> None:
        nonlocal last
        last = done
        # saved = durable in the store (survives a kill now); unsaved = embedded, waiting for the next commit
        bar.set_postfix(saved=writer.saved, unsaved=writer.pending, failed=len(done.failed), refresh=False)
        bar.update(step)

    show(last, 0)
    try:
        done = embed_into(writer, todo, embedder, commit_every_s, commit_every_n, on_result=show)
    finally:
        writer.close()  # the last commit, and the journal folded in: the store is one file
        show(last, 0)  # after the last commit
        bar.close()
    return EmbedSummary(out, done.embedded, len(items) - len(todo), done.failed, len(Store(out)),
                        time.perf_counter() - start, time.process_time() - cpu_start)
