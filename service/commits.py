"""Group commits into a store: one thread owns the `StoreWriter`; records handed in by many threads
are added and made durable by one commit, and each sender learns its outcome only after that commit.

While a commit runs (an append to the store's journal and an fsync: `cxr_embed/store.py`), records
keep arriving and the next commit takes them all, so concurrent senders share commits instead of
queueing one commit each. `close` folds the journal into the HDF5 file.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from cxr_embed.store import StoreWriter

from .dimse import ShuttingDown

log = logging.getLogger("cxr_embed.listener")


@dataclass
class Record:
    """One instance's entry: an embedding and its metadata, or the reason it failed ('code: message')."""

    image_id: str
    embedding: np.ndarray | None = None
    metadata: dict = field(default_factory=dict)
    error: str | None = None


class GroupCommitter:
    """`submit` from any thread; the future resolves (None) once the record is durable, or with the
    commit's exception. `close` commits what was submitted and stops the thread."""

    def __init__(self, writer: StoreWriter):
        self.writer = writer
        writer.commit()  # an empty store exists from the start, pinned to the model
        self.commits = 0
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="cxr-commit", daemon=True)
        self._thread.start()

    def submit(self, record: Record) -> Future:
        fut: Future = Future()
        with self._lock:  # nothing is queued after close's end marker
            if self._closed:
                raise ShuttingDown("the listener is stopping; send again later")
            self._queue.put((record, fut))
        return fut

    def close(self, timeout: float | None = None) -> None:
        """Commit what was submitted, stop the thread, and fold the store's journal into its file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            try:
                self.writer.close()
            except Exception as exc:  # every commit is durable already (Store reads the journal): nothing is lost
                log.error("could not fold the store's journal into its file (%s); every commit is in the journal, "
                          "and the store's next writer folds it in", type(exc).__name__)

    def _run(self) -> None:
        done = False
        while not done:
            items = [self._queue.get()]
            while True:  # everything that arrived meanwhile joins this commit
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = None in items
            items = [i for i in items if i is not None]
            if items:
                self._commit(items)

    def _commit(self, items: list[tuple[Record, Future]]) -> None:
        kept = []
        for record, fut in items:
            try:
                if record.error is None:
                    self.writer.add(record.image_id, record.embedding, record.metadata)
                elif record.image_id not in self.writer.done_ids:  # a failed resend does not mark a stored one failed
                    self.writer.fail(record.image_id, record.error)
                kept.append((record, fut))
            except Exception as exc:  # this record alone fails (its sender gets a status); the thread goes on
                fut.set_exception(exc)
        items = kept
        try:
            self.writer.commit()
            self.commits += 1
        except Exception as exc:  # reaches every waiting sender; the records stay pending for the next commit
            log.error("store commit failed (%s); %d instance(s) answered with a failure", type(exc).__name__, len(items))
            for _, fut in items:
                fut.set_exception(exc)
            return
        for _, fut in items:
            fut.set_result(None)
