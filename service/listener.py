"""`cxr-embed listen`: a DICOM Storage SCP (pynetdicom) that embeds, scores and stores each radiograph.

An AE plus two handlers: C-ECHO answers success; C-STORE turns one instance into a stored, scored
embedding or a failure status with a reason (`dimse.py`). Threads:
- pynetdicom runs each association in its own thread; its C-STORE handler reads the header, decodes
  and preprocesses (in the runtime's decoding pool), queues the image for the model and waits;
- the service's engine (`engine.py`) runs the model in its one batcher thread, batching images of
  concurrent associations;
- one commit thread owns the store (`commits.py`): an instance is acknowledged (0x0000) only after
  the commit that holds it, and concurrent associations share commits.
Every received instance is answered: stored, or recorded in the store's failures (`StoreWriter.fail`)
and refused with a status. Only CR and DX SOP classes are negotiated: a CT is refused at association
negotiation, before it is sent. Neither the store's metadata nor the log holds patient names, ids or
dates: metadata comes from an allowlist of tags (`HEADER_TAGS`), the log holds counts and statuses.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
import warnings
from collections import Counter
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.fsm import TRANSITION_TABLE

from cxr_embed.chest import is_reliable
from cxr_embed.dicom import pydicom_warnings_logged, scrub
from cxr_embed.errors import ConfigError, CxrEmbedError
from cxr_embed.runtime import AUTO_CPU_WORKERS_MAX
from cxr_embed.store import StoreWriter
from cxr_embed.threads import WARNINGS_LOCK
from probes.scoring import score_embedding

from .commits import GroupCommitter, Record
from .dimse import (PROCESSING_FAILURE, RADIOGRAPH_SOP_CLASSES, SUCCESS, VERIFICATION_SOP_CLASS, InstanceTooLarge, NonFiniteEmbedding,
                    ShuttingDown, SopMismatch, Timeout, UnreadableDataset, decodable_transfer_syntaxes, reason_of,
                    status_dataset, status_of)
from .engine import Engine
from .pdu_limits import bound_connection
from .reactor import FragmentIO, wait_not_poll
from .settings import ServiceSettings

log = logging.getLogger("cxr_embed.listener")

# What an instance's metadata keeps of its header: acquisition facts, never patient or date tags.
HEADER_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality", "BodyPartExamined", "ViewPosition",
               "PresentationIntentType", "ImageLaterality", "PhotometricInterpretation", "Rows", "Columns",
               "BitsStored", "NumberOfFrames")
MIN_PDU, MAX_PDU = 4096, 64 * 2**20  # never 0 (unlimited): a peer's PDU is bounded by what we advertise


# The model on single-threaded workers that share a batch, never one team of OpenMP threads: the
# listener's decoding and DICOM networking threads always compete for the cores, and a team stalls at
# every op when one of its threads is descheduled (threads.py; measured: BENCHMARKS.md).
# CXR_EMBED_MODEL_THREADS and CXR_EMBED_CPU_WORKERS still override it.
LISTENER_RUNTIME_DEFAULTS = {"model_threads": 1, "cpu_workers": min(os.cpu_count() or 1, AUTO_CPU_WORKERS_MAX)}


def listener_service_settings(**overrides) -> ServiceSettings:
    """The service's settings (CXR_EMBED_* variables included) with the listener's runtime defaults."""
    return ServiceSettings.from_env(defaults=LISTENER_RUNTIME_DEFAULTS, **overrides)


def _service_settings() -> ServiceSettings:
    return listener_service_settings()


@dataclass
class ListenerSettings:
    """Where to listen and store, and the limits; model, probes and batching are the service's
    (`ServiceSettings`, CXR_EMBED_* variables included)."""

    out: str | os.PathLike  # the HDF5 store (created or extended; ids are SOP Instance UIDs)
    service: ServiceSettings = field(default_factory=_service_settings)
    host: str = "127.0.0.1"
    port: int = 11112  # 0: any free port (Listener.port tells which)
    ae_title: str = "CXREMBED"
    require_called_aet: bool = False  # refuse associations addressed to another AE title
    # each association has one C-STORE in flight at a time (pdu_limits.py ends one that sends more, or a
    # larger PDU or data set), so this bounds the memory held by received instances (max_associations x
    # (max_instance_bytes + max_pdu), and copies while decoding) and keeps the engine's queue from filling
    max_associations: int = 8
    max_instance_bytes: int = 64 * 2**20
    # the largest PDU we accept (advertised at association; PS3.8 D.1): a 7 MB radiograph then arrives in
    # a few PDUs instead of ~440 of pynetdicom's default 16382 bytes, each parsed in Python
    max_pdu: int = 4 * 2**20
    wait_s: float = 120.0  # longest a handler waits for the model, then for the commit
    stop_grace_s: float = 5.0  # on stop, how long open associations may go on before they are aborted

    def __post_init__(self):
        for name in ("max_associations", "max_instance_bytes"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be at least 1, not {getattr(self, name)!r}")
        if not MIN_PDU <= int(self.max_pdu) <= MAX_PDU:
            raise ConfigError(f"max_pdu must be {MIN_PDU} to {MAX_PDU} bytes, not {self.max_pdu!r}")
        if not 0 < len(self.ae_title.strip()) <= 16:
            raise ConfigError(f"AE title {self.ae_title!r}: 1 to 16 characters")


@dataclass
class ListenerSummary:
    received: int
    statuses: dict  # "0x0000" -> count
    commits: int
    seconds: float

    def text(self) -> str:
        by = ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())) or "none"
        return (f"listener stopped after {self.seconds:.0f} s: {self.received} instance(s) received "
                f"(statuses {by}); {self.commits} commit(s)")


def without_values(message: str) -> str:
    """A log message with every quoted part left out (`cxr_embed.dicom.scrub`): pydicom's and
    pynetdicom's texts quote what a peer sent (`Invalid value for VR UI: '1.2.3...'`, `Non-conformant
    'Affected SOP Instance UID' value '1.2.3...'`), and no UID or other value of an instance goes into
    our log."""
    return scrub(message, [])


class PeerValueFilter(logging.Filter):
    """On pynetdicom's and pydicom's loggers: quoted values left out of each line (`without_values`), and a logged
    exception reduced to its type (its text and traceback may quote what a peer sent, and a traceback
    per malformed message floods the log)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            message = f"{record.getMessage() if not isinstance(record.msg, BaseException) else 'exception'}"
            message = f"{without_values(message)} ({type(record.exc_info[1]).__name__})"
            record.exc_info = record.exc_text = None
        else:
            message = without_values(record.getMessage())
        record.msg, record.args = message, None
        return True


_PEER_FILTER = PeerValueFilter()


def filter_pynetdicom_logs() -> None:
    """`PeerValueFilter` on pynetdicom's logger and each of its modules' (a logger's filters do not
    apply to its children's records)."""
    names = ["pynetdicom", "pydicom",
             *(n for n in list(logging.root.manager.loggerDict) if n.startswith(("pynetdicom.", "pydicom.")))]
    for name in names:
        logger = logging.getLogger(name)
        if _PEER_FILTER not in logger.filters:
            logger.addFilter(_PEER_FILTER)


def read_header(data: bytes) -> Dataset:
    """The data set without its pixel data; UnreadableDataset when it does not parse."""
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as exc:  # pydicom raises many kinds on malformed elements; its messages may quote values
        raise UnreadableDataset(f"the data set cannot be decoded ({type(exc).__name__})") from None


def check_header(ds: Dataset, sop_class: str, sop_instance: str) -> None:
    """Refuse a data set that is not what the request announced. (Its pixel count is checked, before
    decoding, by the runtime's ingestion: `ImageTooLarge`, CXR_EMBED_MAX_PIXELS.)"""
    if str(ds.get("SOPClassUID", "")) != str(sop_class):
        raise SopMismatch("the data set's SOP Class UID is not the request's")
    if str(ds.get("SOPInstanceUID", "")) != str(sop_instance):
        raise SopMismatch("the data set's SOP Instance UID is not the request's")


def header_metadata(ds: Dataset) -> dict:
    """The allowlisted header tags, and the transfer syntax it came in."""
    out = {}
    for keyword in HEADER_TAGS:
        value = ds.get(keyword)
        if value is not None and value != "":
            out[keyword] = int(value) if isinstance(value, int) else str(value)
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is not None:
        out["TransferSyntaxUID"] = str(tsyntax)
    return out


class Listener:
    """The Storage SCP: `start()` loads the model and listens, `stop()` finishes what was received,
    commits and stops. Also a context manager. `port` is the port it listens on."""

    def __init__(self, settings: ListenerSettings):
        self.settings = settings
        self.engine: Engine | None = None
        self.committer: GroupCommitter | None = None
        self.port: int | None = None
        self.statuses: Counter = Counter()
        self._ae = self._server = None
        self._lock = threading.Condition()
        self._in_handlers = 0
        self._started = time.monotonic()
        self._stopping = threading.Event()  # set by stop(): aborts then close their connections at once

    def __enter__(self) -> "Listener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "Listener":
        """Load the model and probes (ModelMismatch for a probe or store of another model), open the
        store, then listen."""
        filter_pynetdicom_logs()
        with WARNINGS_LOCK:  # not while a thread's catch_warnings block (which restores the filters after) is open
            # pydicom warns on a non-conformant UID wherever one is read, pynetdicom's threads included
            # (its request's Affected SOP Instance UID), quoting it; the listener compares UIDs itself
            warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning, module=r"pydicom\.")
        engine = Engine(self.settings.service)
        try:
            engine.load()
            self.committer = GroupCommitter(StoreWriter(Path(self.settings.out), engine.runtime.identity))
        except BaseException:
            engine.close()
            raise
        self.engine = engine
        self._ae = self._build_ae()
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, _on_echo),
                    (evt.EVT_CONN_OPEN, _on_open, [self.settings.max_pdu, self.settings.max_instance_bytes,
                                                   self._stopping])]
        try:
            self._server = self._ae.start_server((self.settings.host, self.settings.port), block=False,
                                                 evt_handlers=handlers)
        except OSError as exc:
            self.stop()
            raise CxrEmbedError(f"cannot listen on {self.settings.host}:{self.settings.port}: "
                                f"{exc.strerror or exc}") from None
        self.port = self._server.server_address[1]
        self._started = time.monotonic()
        log.info("listening on %s:%d as %s (%d probe(s), model %s)", self.settings.host, self.port,
                 self.settings.ae_title, len(engine.probes), engine.runtime.identity.model_name)
        return self

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_associations = int(self.settings.max_associations)
        ae.maximum_pdu_size = int(self.settings.max_pdu)
        ae.require_called_aet = bool(self.settings.require_called_aet)
        syntaxes = decodable_transfer_syntaxes()
        for sop_class in RADIOGRAPH_SOP_CLASSES:
            ae.add_supported_context(sop_class, syntaxes)
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        return ae

    def stop(self) -> ListenerSummary:
        """Refuse new associations, let open ones go on for `stop_grace_s`, abort the rest, wait for
        the instances being handled, commit, and stop the model."""
        if self._server is not None:
            self._server.shutdown()
            deadline = time.monotonic() + self.settings.stop_grace_s
            while self._ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            left = len(self._ae.active_associations)
            self._stopping.set()
            if left:
                log.warning("stopping: aborting %d association(s) still open: an instance still being received is not "
                            "stored; one received in full is stored, though its sender may see the abort before the "
                            "answer (sending it again is answered as stored)", left)
            dul = logging.getLogger("pynetdicom.dul")
            level = dul.level  # an aborted read in pynetdicom's reader thread logs a traceback: expected here
            dul.setLevel(logging.CRITICAL)
            try:
                self._ae.shutdown()  # aborts what is left
            finally:
                dul.setLevel(level)
            self._server = None
        with self._lock:  # handlers already running get their answer (or their commit) first
            self._lock.wait_for(lambda: self._in_handlers == 0, timeout=2 * self.settings.wait_s)
        if self.committer is not None:
            self.committer.close()
        if self.engine is not None:
            self.engine.close()
        summary = self.summary()
        log.info("%s", summary.text())
        return summary

    def summary(self) -> ListenerSummary:
        with self._lock:
            statuses = {f"0x{k:04X}": v for k, v in self.statuses.items()}
        return ListenerSummary(sum(statuses.values()), statuses, self.committer.commits if self.committer else 0,
                               time.monotonic() - self._started)

    # --- the C-STORE handler (pynetdicom's association threads) -------------------------------------

    def _on_store(self, event) -> Dataset:
        """One received instance -> stored, scored embedding (0x0000), or a recorded failure and its status."""
        with self._lock:
            self._in_handlers += 1
        status = PROCESSING_FAILURE
        try:
            status, reason = self._handle(event)
            return status_dataset(status, reason)
        finally:
            with self._lock:
                self._in_handlers -= 1
                self.statuses[status] += 1
                self._lock.notify_all()

    def _handle(self, event) -> tuple[int, str | None]:
        image_id = str(event.request.AffectedSOPInstanceUID)
        error = None
        try:
            record = self._embed(event, image_id)
        except Exception as exc:  # typed errors get their status; anything else is our failure, never a crash
            error, record = exc, Record(image_id, error=reason_of(exc))
        status, reason = self._commit(record, error)
        self._log(status, reason, record)
        return status, reason

    def _embed(self, event, image_id: str) -> Record:
        data = received_file(event)
        if len(data) > self.settings.max_instance_bytes:
            raise InstanceTooLarge(f"{len(data)} bytes: more than the limit of {self.settings.max_instance_bytes}")
        with pydicom_warnings_logged(log):  # they quote values: logged at DEBUG without them
            header = read_header(data)
            check_header(header, event.request.AffectedSOPClassUID, image_id)
            dicom_meta = header_metadata(header)
        prepared = self.engine.prepare(data)
        if prepared.error is not None:
            raise prepared.error
        try:
            emb, check_emb = self.engine.submit(prepared).result(timeout=self.settings.wait_s)
        except FutureTimeout:
            raise Timeout(f"the model did not answer within {self.settings.wait_s:g} s") from None
        emb = np.asarray(emb, dtype=np.float32)
        if not np.isfinite(emb).all():
            raise NonFiniteEmbedding("the model gave a non-finite embedding")
        chest = self.engine.runtime.chest_check(prepared.info, check_emb)
        scores = score_embedding(self.engine.probes, emb, reliable=is_reliable(prepared.info, chest))
        meta = {"dicom": dicom_meta, "findings": prepared.info.to_dict(), "chest_check": chest.to_dict(),
                "scores": scores, "calling_ae_title": str(event.assoc.requestor.ae_title).strip()}
        return Record(image_id, emb, meta)

    def _commit(self, record: Record, error: Exception | None) -> tuple[int, str | None]:
        """Hand the record to the commit thread and wait for the commit that holds it."""
        try:
            self.committer.submit(record).result(timeout=self.settings.wait_s)
        except ShuttingDown as exc:
            return status_of(exc), reason_of(exc)
        except FutureTimeout:
            return status_of(Timeout()), f"timeout: the store did not commit within {self.settings.wait_s:g} s"
        except Exception as exc:  # the commit failed: not stored
            return status_of(exc), f"store_error: {reason_of(exc)}"
        return (SUCCESS, None) if error is None else (status_of(error), record.error)

    def _log(self, status: int, reason: str | None, record: Record) -> None:
        # counts and statuses only: no UIDs, no tags, no scores
        if status == SUCCESS:
            scores = record.metadata.get("scores", {})
            positives = sum(1 for s in scores.values() if s.get("positive"))
            frontal = record.metadata.get("chest_check", {}).get("is_frontal_cxr")
            log.info("C-STORE 0x0000 stored (frontal CXR: %s; probes positive: %d of %d)", frontal, positives,
                     len(scores))
        else:
            log.warning("C-STORE 0x%04X refused: %s", status, (reason or "").split(":", 1)[0])


def _on_open(event, max_pdu: int, max_message: int, stopping: threading.Event | None = None) -> None:
    """A connection opened (before its association's threads start): bound what the peer may send
    (`pdu_limits.py`), let its threads wait rather than poll (`reactor.py`), and make a late abort harmless."""
    bound_connection(event, max_pdu, max_message)
    wait_not_poll(event.assoc)
    late_abort_is_a_no_op(event.assoc, stopping)


def late_abort_is_a_no_op(assoc, stopping: threading.Event | None = None) -> bool:
    """What reaches an association's state machine from our side once its connection is closing, or
    before an association was asked for, does no harm.

    - An abort requested with no association to abort: `stop()` aborts the connections still open;
      one may be closing already (Sta13: a release reply or an abort sent, the transport's close
      awaited) or not yet associated (Sta2: connected, no A-ASSOCIATE-RQ yet, e.g. a peer that sent
      part of one and stopped). pynetdicom's state table, like PS3.8's, has no transition for an
      A-ABORT request there: its state machine raised InvalidEventError in the reader thread (a
      traceback on stderr, seen in CI), and a peer stalled in Sta2 held the shutdown until ARTIM
      expired. Now the transport is closed at once (as on Evt17: AA-5, AR-5).
    - Any other request of ours in Sta13 (e.g. the association thread's A-ASSOCIATE-RJ for a request
      the reader has meanwhile aborted, Evt8) does nothing: the connection is going.
    - Once `stopping` is set (the listener's `stop()`), an abort sends its A-ABORT and closes the
      transport at once, instead of waiting up to ARTIM (30 s) for a peer that may never close it.
    - A connection that ends before an association was asked for (the peer closed it, or sent
      something else) frees its association slot at once: pynetdicom's association thread waited
      acse_timeout (30 s) for the request regardless, so 9 connect-and-close a minute locked every
      sender out.
    Every other event keeps pynetdicom's behaviour. False when the state machine is not the expected
    one (then nothing changes)."""
    machine = getattr(getattr(assoc, "dul", None), "state_machine", None)
    if machine is None or not callable(getattr(machine, "do_action", None)) or not hasattr(machine, "current_state"):
        return False
    do_action = machine.do_action

    requested = []  # an A-ASSOCIATE-RQ arrived (Evt6)

    def act(event: str) -> None:
        state = machine.current_state
        if event == "Evt15" and stopping is not None and stopping.is_set() and (event, state) in TRANSITION_TABLE:
            do_action(event)  # the A-ABORT is sent
            if machine.current_state == "Sta13":
                do_action("Evt17")  # and the transport closed now (AR-5)
            return
        if (event, state) not in TRANSITION_TABLE:
            if event == "Evt15" and state in ("Sta2", "Sta13"):
                log.debug("an abort requested in state %s closes the connection", state)
                do_action("Evt17")  # as if the transport had closed: AA-5 / AR-5 close it and go to Sta1
                return
            if event in LOCAL_EVENTS and state in ("Sta1", "Sta13"):
                log.debug("%s requested in state %s (the connection is closed or closing) does nothing", event, state)
                return
        do_action(event)

    def do_action_unless_closing(event: str) -> None:
        before = machine.current_state
        if event == "Evt6":
            requested.append(True)
        act(event)
        if machine.current_state == "Sta1" and before != "Sta1" and not requested:
            # closed before any association was asked for: the association's thread waits for an
            # A-ASSOCIATE-RQ for acse_timeout (30 s) and holds its slot meanwhile; None wakes it as its
            # timeout would (it then ends), so a peer that connects and closes frees the slot at once
            queue_ = getattr(assoc.dul, "to_user_queue", None)
            if queue_ is not None:
                queue_.put(None)

    machine.do_action = do_action_unless_closing
    return True


# events that our side's primitives cause (PS3.8 9.2: requests and responses of the local user), as
# opposed to what the peer or the transport causes
LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})


def received_file(event) -> bytes:
    """The received instance as a DICOM file (preamble, file meta, data set), copied once (pynetdicom's
    `encoded_dataset` copies the data set twice)."""
    meta = b"".join((b"\x00" * 128, b"DICM", encode_file_meta(event.file_meta)))
    data_set = event.request.DataSet
    if isinstance(data_set, FragmentIO):
        return data_set.with_prefix(meta)
    with data_set.getbuffer() as stream:
        return b"".join((meta, stream))


def _on_echo(event) -> int:
    """C-ECHO (verification): the listener is up."""
    return SUCCESS


def run_listener(settings: ListenerSettings, stop: threading.Event | None = None) -> ListenerSummary:
    """Listen until `stop` is set, or SIGINT / SIGTERM (in the main thread); then commit and return.
    Raises CxrEmbedError when the port is busy or the model, probes or store cannot be used."""
    from cxr_embed.process import configure_process

    from .cli import check_port_free

    check_port_free(settings.host, settings.port)
    configure_process(blas_threads=1)
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        listener = Listener(settings).start()
        print(f"listening for DICOM on {settings.host}:{listener.port} as AE {settings.ae_title}; "
              f"storing into {settings.out}", flush=True)
        while not stop.wait(0.5):
            pass
        return listener.stop()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
