"""Waits instead of polling in pynetdicom's two threads per association, and large socket reads.

pynetdicom (2.x, 3.x) runs each association in two Python threads that poll: the DUL reader wakes every
millisecond to ask the socket (`select` with a zero timeout) and its outgoing queue whether there is
work, the association's reactor wakes every millisecond to ask its DIMSE queue; and a PDU is read from
the socket 4 KiB per `recv` call. Each wake and each read takes the GIL, so with four associations the
listener spent more CPU in these loops than in decoding (BENCHMARKS.md, "DICOM listener").

`wait_not_poll(assoc)`, called when the connection opens (before either thread starts), changes only
this association's objects, and only how they wait:
- the transport's `ready` (the DUL's "is there data?") waits in a selector on the socket and on a
  wake-up socket pair, up to IDLE_WAIT_S, when the DUL has no event or primitive queued; a `put` on the
  DUL's event and outgoing queues by another thread writes a byte to the pair, so a queued reply or
  abort wakes it at once (the DUL's own puts need none: it looks at its queues before it waits);
- the socket is read straight into the free end of a large buffer (a "chunk"), as much as it holds
  per `recv_into` (up to the chunk's end), instead of 4 KiB `recv` calls: several PDUs per system call,
  and so per time the reader must win the GIL back from the decoding and model threads;
- a P-DATA-TF PDU is then decoded where it was read, as a view of its chunk: no buffer of its own, no
  copy (pynetdicom reads each PDU into a new buffer and appends it to its header's, a second copy).
  Chunks are reused, and a chunk is reused only once no view of it is alive (`_unexported`); other
  PDUs are copied out, for pynetdicom's decoders;
- a received P-DATA-TF PDU is split into its PDV items as views of the bytes read, not copies
  (pynetdicom copies a 7 MB data set about five times on its way to the handler, holding the GIL);
  other PDUs, and any PDU while a handler is bound to EVT_DATA_RECV, go through pynetdicom's decoder;
- a message's data set collects those views (`FragmentIO`) and is joined once when first read, instead
  of growing a BytesIO 128 KiB at a time (each growth may copy all received so far), into bytes that
  are not zero-filled first; the listener's join (`with_prefix`) then lets the views go, so that the
  next message can reuse their chunks;
- pynetdicom's standard logging handlers (a description of every PDU and message, built even when
  nothing is logged; they also read each data set) are unbound while its logger is not enabled for
  INFO, as the listener's command line sets it (its lines name UIDs);
- the DIMSE queue's non-blocking `get` (the reactor's poll) waits up to IDLE_WAIT_S for a message
  (pynetdicom's own state machine puts `(None, None)` there on abort and release, which wakes it);
- the DUL loop no longer sleeps 1 ms after a turn without an event (`ready` waits instead): a reply
  queued by the association's thread wakes the reader, which used to sleep that 1 ms before sending
  it, on every instance's critical path; its `stop_dul` then waits for the reader by joining it
  after a wake-up, not by sleeping in a loop.
What is read, decoded, answered and when an association ends is unchanged; the cost of waiting is at
most IDLE_WAIT_S more before an idle association notices a peer's A-RELEASE or the idle timer.
Where pynetdicom's internals differ from what this expects, the association keeps pynetdicom's own
polling (a warning says so once) - slower, never different.
"""

from __future__ import annotations

import ctypes
import io
import logging
import queue
import selectors
import socket
import struct
import threading
import time

import numpy as np
from pynetdicom import evt
from pynetdicom.dimse_messages import DIMSEMessage
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem
from pynetdicom.transport import AssociationSocket

log = logging.getLogger("cxr_embed.listener")
_DUL_LOG = logging.getLogger("pynetdicom.dul")

IDLE_WAIT_S = 0.05  # longest wait of an idle reader or reactor before it looks at its timers and flags
LARGEST_PDU = 64 * 2**20  # a PDU declaring more is refused before its buffer is made (the listener's MAX_PDU)
VIEW_AT_LEAST = 2**16  # data-set fragments at least this long are kept as views of their PDU (FragmentIO)
JOIN_WITHOUT_GIL = 2**20  # joins at least this long are copied with the GIL released (`joined`)
UNESTABLISHED_PDU = 2**20  # before an association is established, a PDU declaring more is refused
CHUNK = 2**22  # a connection reads into buffers of this size (or of a PDU's, if larger), made at its first read
SPARE_CHUNKS = 2  # a connection keeps at most this many chunks besides the one being read into
UNESTABLISHED_CHUNK = 2**16  # before its association is established, a connection's chunks are this small
IDLE_RELEASE_S = 2.0  # a connection that has received nothing for this long lets its chunks go
_warned = threading.Event()


class WaitingSocket(AssociationSocket):
    """An AssociationSocket whose `ready` waits for data or a wake-up, and whose reads hand out views of
    large reusable buffers (chunks).

    Received bytes not yet asked for are `_chunk[_start:_end]`; the socket is read into `_chunk[_end:]`.
    A read that does not fit in what is left of the chunk moves, with what was read of it, to another
    chunk: the same one from its start when nothing is pending and no view of it is alive, else a spare
    of which no view is alive, else a new one. A chunk is reused only when the bytearray itself says
    that no view of it (memoryview, numpy array made from one ...) exists (`_unexported`), so a byte is
    never overwritten while anything can still read it; a chunk still held is left to its holders once
    more than SPARE_CHUNKS are kept. A connection that has received nothing for IDLE_RELEASE_S lets
    its chunks go (an open, idle association holds no buffers). Reads are the connection's DUL
    thread's alone."""

    _wake_r: socket.socket
    _wake_w: socket.socket
    _selector: selectors.BaseSelector  # the socket and the wake-up pair's reading end
    _chunk: bytearray
    _start: int
    _end: int
    _spares: list
    _last_read: float = 0.0  # time.monotonic() of the last socket read that returned data

    _poisoned: bool = False  # a PDU header that cannot be followed (unknown type, too long): read no more

    @property
    def ready(self) -> bool:
        """True when a whole PDU is buffered, the socket has data (or closed) to read, or the stream
        was given up (`poison`); else waits for either, or a wake-up, up to IDLE_WAIT_S. A PDU only
        partly received is not "ready": the reader then waits here, where pynetdicom's timers (the idle
        timer, ARTIM) and stop requests are still looked at, instead of inside a read."""
        if self.socket is None or self._is_connected is False:
            return False
        if self._poisoned or self.whole_pdu() is not None:
            return True
        header = self.header()
        if header is not None and not _acceptable(self.assoc, *header):  # buffered behind the last PDU read
            return True
        dul = self.assoc.dul
        busy = dul._kill_thread or dul.event_queue.qsize() or dul.to_provider_queue.qsize()
        try:  # a selector, not select.select: no limit at file descriptor 1024
            ready = {key.fileobj for key, _ in self._selector.select(0 if busy else IDLE_WAIT_S)}
        except (OSError, TimeoutError, ValueError):
            if self.socket is not None:  # as pynetdicom (else it was closed meanwhile, and said so)
                self.event_queue.put("Evt17")  # the transport connection is closed
            return False
        if self._wake_r in ready:
            _drain(self._wake_r)
        if self.socket in ready:
            return True
        if self._chunk and time.monotonic() - self._last_read > IDLE_RELEASE_S:
            self._release()
        return False

    def header(self) -> tuple[int, int] | None:
        """(type, length) of the PDU at the read position once its 6-byte header is buffered, else None."""
        if self._end - self._start < 6:
            return None
        pdu_type, _, length = struct.unpack_from(">BBL", self._chunk, self._start)
        return pdu_type, length

    def whole_pdu(self) -> int | None:
        """The size (header included) of the PDU at the read position once all of it is buffered, else None."""
        header = self.header()
        if header is None or self._end - self._start < 6 + header[1]:
            return None
        return 6 + header[1]

    def read_available(self, n: int) -> bool:
        """One read, without waiting, of what has arrived, into room for `n` bytes from the read
        position; False once the connection has closed (or the listener's BoundedSocket ended it)."""
        if self._start + n > len(self._chunk):
            self._move(n)
        room = len(self._chunk) - self._end
        if room <= 0:
            return True
        with memoryview(self._chunk) as chunk:
            try:
                got = self.socket.recv_into(chunk[self._end :], room, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return True
        if not got:
            return False
        self._end += got
        self._last_read = time.monotonic()
        return True

    def poison(self) -> None:
        """Give the stream up: what is buffered is dropped, and the next read reads as a closed
        connection (a PDU of unknown type or length cannot be skipped: nothing after it can be framed)."""
        self._poisoned = True
        self._start = self._end = 0

    def _release(self) -> None:
        """Hold no chunks (views still held keep theirs alive for their holders): at the start, when
        closed, and when idle (an open association that sends nothing holds no buffers). Drops what
        is pending: called only when nothing is."""
        self._chunk, self._spares = bytearray(), []
        self._start = self._end = 0

    def recv(self, nr_bytes: int) -> bytearray:
        """`nr_bytes` bytes (fewer once the connection has closed, as pynetdicom), a copy of their own.
        Blocking, as pynetdicom's: the DUL's reads (`_direct_read`) use `read_available` instead."""
        with self.view(nr_bytes) as view:
            return bytearray(view)

    def view(self, nr_bytes: int) -> memoryview:
        """The next `nr_bytes` bytes (fewer once the connection has closed) as a view of the chunk they
        were read into: valid for as long as it is held (the chunk is not reused before)."""
        self._fill(nr_bytes)
        n = min(nr_bytes, self._end - self._start)
        out = memoryview(self._chunk)[self._start : self._start + n]
        self._start += n
        return out

    def _fill(self, n: int) -> None:
        """Read until `n` bytes are buffered, or the connection has closed."""
        if self._end - self._start >= n:
            return
        if self._start + n > len(self._chunk):
            self._move(n)
        with memoryview(self._chunk) as chunk:
            while self._end - self._start < n:
                got = self.socket.recv_into(chunk[self._end :], len(chunk) - self._end)
                if not got:
                    return
                self._end += got
                self._last_read = time.monotonic()

    def _move(self, n: int) -> None:
        """Continue in a chunk with room for `n` bytes from its start, taking what is pending along."""
        old, pending = self._chunk, self._end - self._start
        size = max(CHUNK if self.assoc.is_established else UNESTABLISHED_CHUNK, n)
        if not pending and len(old) >= size and _unexported(old):
            self._start = self._end = 0
            return
        new = None
        for k, spare in enumerate(self._spares):
            if len(spare) >= size and _unexported(spare):
                new = self._spares.pop(k)
                break
        if new is None:
            new = bytearray(size)
        if pending:
            with memoryview(old) as src, memoryview(new) as dst:
                dst[:pending] = src[self._start : self._end]
        if old:
            self._spares.append(old)
            del self._spares[:-SPARE_CHUNKS]  # the oldest go to whoever still holds them
        self._chunk, self._start, self._end = new, 0, pending

    def close(self) -> None:
        super().close()  # the socket becomes None first: a `ready` waiting on the pair then returns False
        self._selector.close()
        for end in (self._wake_r, self._wake_w):
            end.close()
        self._release()


def _unexported(buf: bytearray) -> bool:
    """True when no view (memoryview, numpy array ...) of `buf` is alive: a bytearray with exports
    refuses to resize. Shrinking by one byte and growing back stays within its allocation (no copy)."""
    try:
        del buf[-1:]
    except BufferError:
        return False
    buf.append(0)
    return True


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _waking_put(put, wake: socket.socket, reader: threading.Thread):
    """`put`, then a wake-up byte for the DUL thread (`reader`) unless it is the one putting: it is not
    waiting then, and will look at its queues before it waits again (its own events, one per PDU read,
    were a system call each, and another to drain them)."""
    def waking_put(item, block=True, timeout=None):
        put(item, block, timeout)
        if threading.current_thread() is reader:
            return
        try:
            wake.send(b"\0")
        except (BlockingIOError, OSError):  # the pair is full (a wake-up is pending anyway) or closed
            pass
    return waking_put


def _joining_stop(dul, wake: socket.socket):
    """`dul.stop_dul` as pynetdicom's (the reader stops only in Sta1, the idle state; True then), but
    waiting for the reader thread to end by waking and joining it instead of sleeping `_run_loop_delay`
    in a loop (0 here: that loop would spin)."""
    def stop_dul() -> bool:
        if dul.state_machine.current_state != "Sta1":
            return False
        dul._kill_thread = True
        if dul.is_alive() and threading.current_thread() is not dul:
            try:
                wake.send(b"\0")
            except (BlockingIOError, OSError):  # a wake-up is pending already, or the pair is closed
                pass
            dul.join()
        return True
    return stop_dul


def _waiting_get(get):
    def waiting_get(block=True, timeout=None):
        if not block:  # the reactor's poll: wait a little for a message rather than return at once
            return get(True, IDLE_WAIT_S)
        return get(block, timeout)
    return waiting_get


def _direct_read(dul):
    """`dul._read_pdu_data`, as pynetdicom's (the same events: Evt17 for a closed connection, Evt19 for
    an unknown type or a PDU that does not decode) but never waiting inside a read: each call reads,
    without blocking, what has arrived into the connection's chunks (`WaitingSocket`) and acts only once
    a whole PDU is there; until then it returns with no event, and `ready` waits for more. So a peer that
    stops within a PDU holds nothing but its own association, which pynetdicom's timers end (the idle
    timer once established, ARTIM before), and a stop request is seen at once (a read that waited for the
    rest of a PDU held its association, and a listener's shutdown with it, for ever). A P-DATA-TF PDU is
    decoded as a view of where it was read, any other PDU is copied out for pynetdicom's decoders. A PDU
    of unknown type or too long ends the stream (`poison`): one Evt19 (one A-ABORT), then the connection
    reads as closed (its header used to be peeked, not consumed, and read again on every turn: an
    A-ABORT and a log line each, tens of thousands a second)."""
    def read_pdu_data() -> None:
        sock = dul.socket
        if sock._poisoned:
            dul.event_queue.put("Evt17")  # the stream was given up: as a closed connection
            return
        size, open_ = sock.whole_pdu(), True
        if size is None:
            try:
                for _ in range(2):  # the header, then room for the whole PDU once its length is known
                    header = sock.header()
                    if header is not None and not _acceptable(dul.assoc, *header):
                        break  # checked before any buffer is made for its declared length
                    open_ = sock.read_available(6 if header is None else 6 + header[1])
                    size = sock.whole_pdu()
                    if size is not None or not open_:
                        break
                header = sock.header()
            except (OSError, TimeoutError):
                dul.event_queue.put("Evt17")
                return
            if header is not None and not _acceptable(dul.assoc, *header):
                _DUL_LOG.error("Unknown PDU type 0x%02X or a PDU of %d bytes received; the connection is given up",
                               *header)
                sock.poison()
                dul.event_queue.put("Evt19")
                return
            if size is None:
                if not open_:  # closed, within a PDU or between two
                    if sock._end > sock._start:
                        _DUL_LOG.error("The connection closed before the entire PDU was received")
                    dul.event_queue.put("Evt17")
                return  # not all of it yet: `ready` waits for more
        pdu = sock.view(size)  # all buffered: no read
        if pdu[0] != 0x04 or not dul.assoc.is_established:
            with pdu:
                pdu = bytes(pdu)
        try:
            decoded, event = dul._decode_pdu(pdu)
            dul.event_queue.put(event)
        except Exception as exc:  # as pynetdicom: whatever the decoder raises ends the association
            _DUL_LOG.error("Unable to decode the received PDU data (%s)", type(exc).__name__)
            dul.event_queue.put("Evt19")
            return
        dul._recv_pdu.put(decoded)
    return read_pdu_data


def _acceptable(assoc, pdu_type: int, length: int) -> bool:
    """A known PDU type, of a length whose buffer may be made: large only once an association (at most
    max_associations of them) is established; pynetdicom refuses data before that anyway."""
    largest = LARGEST_PDU if assoc.is_established else UNESTABLISHED_PDU
    return pdu_type in range(0x01, 0x08) and length <= largest


def _viewing_decode(dul, decode):
    """`dul._decode_pdu` for P-DATA-TF PDUs: PDV items hold memoryviews of the PDU read (PS3.8 9.3.5:
    item length, context id, then the message control header and fragment). An item that does not fit
    goes to pynetdicom's decoder, which fails it as pynetdicom does (the listener's BoundedSocket has
    ended such a connection already)."""
    def decode_pdu(bytestream):
        if bytestream[:1] != b"\x04" or dul.assoc.get_handlers(evt.EVT_DATA_RECV):
            return decode(_owned(bytestream))
        view, items, offset = memoryview(bytestream), [], 6
        while offset < len(view):
            if offset + 6 > len(view):
                return decode(_owned(bytestream))
            length, context_id = struct.unpack_from(">LB", view, offset)
            if length < 2 or offset + 4 + length > len(view):
                return decode(_owned(bytestream))
            item = PresentationDataValueItem()
            item.presentation_context_id = context_id
            item.presentation_data_value = view[offset + 5 : offset + 4 + length]
            items.append(item)
            offset += 4 + length
        pdu = P_DATA_TF()
        pdu.presentation_data_value_items = items
        evt.trigger(dul.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt10"
    return decode_pdu


def _owned(bytestream):
    """What pynetdicom's own decoder gets: a view of a connection's chunk as bytes of its own (it may
    keep parts, and the chunk is reused once no view of it is alive)."""
    return bytes(bytestream) if isinstance(bytestream, memoryview) else bytestream


class FragmentIO(io.BytesIO):
    """A DIMSE message's data set as it arrives: its fragments (views of the received PDUs) kept in a
    list, joined once on the first read, then an ordinary BytesIO. `with_prefix` gives prefix + data
    set in one copy."""

    def __init__(self):
        super().__init__()
        self._parts: list | None = []  # views of large fragments, and bytearrays gathering small ones
        self._after_prefix: tuple | None = None  # (with_prefix's bytes, where the data set starts in them)
        self._lock = threading.Lock()

    def write(self, data) -> int:
        with self._lock:
            if self._parts is not None:
                size = len(data)
                if size >= VIEW_AT_LEAST:  # a view: keeps its PDU alive, and that PDU is mostly this view
                    self._parts.append(data)
                elif size:  # a copy: a peer sending tiny fragments cannot make us keep a PDU per byte
                    if not self._parts or not isinstance(self._parts[-1], bytearray):
                        self._parts.append(bytearray())
                    self._parts[-1] += data
                return size
        return super().write(data)

    def seal(self) -> None:
        with self._lock:
            if self._parts is not None:
                parts, self._parts = self._parts, None
                io.BytesIO.__init__(self, joined(parts))  # the joined bytes are shared, not copied again
            elif self._after_prefix is not None:  # read after with_prefix: the data set, copied out of it
                whole, start = self._after_prefix
                self._after_prefix = None
                io.BytesIO.__init__(self, whole[start:])

    def with_prefix(self, prefix: bytes) -> bytes:
        """prefix + data set, in one copy. The fragments (views of the connection's chunks) are let go,
        so that the chunks can be reused for the next message; a later read copies the data set out of
        the returned bytes."""
        with self._lock:
            if self._parts is not None:
                whole = joined((prefix, *self._parts))
                self._parts, self._after_prefix = None, (whole, len(prefix))
                return whole
        return joined((prefix, self.getvalue()))


_FROM_SIZE = ctypes.pythonapi.PyBytes_FromStringAndSize
_FROM_SIZE.restype, _FROM_SIZE.argtypes = ctypes.py_object, (ctypes.c_void_p, ctypes.c_ssize_t)


def _new_bytes(n: int) -> bytes:
    """A new bytes object of n bytes whose contents are whatever the allocator gave: fill it all."""
    return _FROM_SIZE(None, n)


def joined(parts) -> bytes:
    """b"".join(parts) for large parts, copied without holding the GIL: a new bytes object of the total
    size, made as C code makes one to fill (PyBytes_FromStringAndSize(NULL, n): not zero-filled first),
    is filled by ctypes.memmove (a foreign call, made with the GIL released) before anything else holds
    it. A 7 MB join holding the GIL was the largest single wait of the listener's other threads, and
    zero-filling it first a third of its cost (BENCHMARKS.md). Small joins: b"".join."""
    views = [memoryview(p).cast("B") for p in parts]
    total = sum(len(v) for v in views)
    if total < JOIN_WITHOUT_GIL:
        return b"".join(views)
    out = _new_bytes(total)  # new: no other reference exists until it is returned
    base = ctypes.cast(ctypes.c_char_p(out), ctypes.c_void_p).value
    pos = 0
    for view in views:
        if len(view):
            source = np.frombuffer(view, dtype=np.uint8)  # its address, read-only or not
            ctypes.memmove(base + pos, source.ctypes.data, len(view))
        pos += len(view)
    return out


def _sealing(name):
    def method(self, *args, **kwargs):
        self.seal()
        return getattr(io.BytesIO, name)(self, *args, **kwargs)
    method.__name__ = name
    return method


for _name in ("getvalue", "getbuffer", "read", "read1", "readinto", "readinto1", "readline", "readlines", "seek",
              "tell", "truncate", "__iter__", "__next__", "writelines"):
    setattr(FragmentIO, _name, _sealing(_name))


def _fragmenting_receive(dimse, receive, dul=None):
    """`dimse.receive_primitive` that gives each new message a FragmentIO for its data set, and ends the
    association (one Evt19: an A-ABORT) on a message pynetdicom's decoder fails with an exception: that
    raised inside the reader's state machine, outside its handler, and the reader thread died with a
    traceback and a bare close (a PDV item of 1 byte, a data set before its command; 20 bytes each)."""
    def receive_primitive(primitive):
        if dimse.message is None:
            dimse.message = DIMSEMessage()
            dimse.message.data_set = FragmentIO()
        try:
            return receive(primitive)
        except Exception as exc:
            if dul is None:
                raise
            dimse.message = None
            _DUL_LOG.error("A malformed DIMSE message was received (%s); the association is aborted",
                           type(exc).__name__)
            dul.event_queue.put("Evt19")
    return receive_primitive


def _unbind_standard_logging(assoc) -> None:
    if logging.getLogger("pynetdicom").isEnabledFor(logging.INFO):
        return
    from pynetdicom import _handlers

    for event, handler in ((evt.EVT_DIMSE_RECV, "standard_dimse_recv_handler"),
                           (evt.EVT_DIMSE_SENT, "standard_dimse_sent_handler"),
                           (evt.EVT_PDU_RECV, "standard_pdu_recv_handler"),
                           (evt.EVT_PDU_SENT, "standard_pdu_sent_handler")):
        handler = getattr(_handlers, handler, None)
        if handler is not None:
            assoc.unbind(event, handler)


def _expected(assoc) -> bool:
    dul, transport = assoc.dul, assoc.dul.socket
    return (type(transport) is AssociationSocket and isinstance(getattr(dul, "event_queue", None), queue.Queue)
            and isinstance(getattr(dul, "to_provider_queue", None), queue.Queue)
            and isinstance(getattr(assoc.dimse, "msg_queue", None), queue.Queue)
            and hasattr(dul, "_kill_thread") and hasattr(transport, "_is_connected")
            and isinstance(getattr(dul, "_run_loop_delay", None), float) and callable(getattr(dul, "stop_dul", None))
            and hasattr(getattr(dul, "state_machine", None), "current_state") and callable(getattr(dul, "join", None))
            and callable(getattr(dul, "_decode_pdu", None)) and callable(getattr(assoc, "get_handlers", None))
            and isinstance(getattr(dul, "_recv_pdu", None), queue.Queue) and callable(getattr(dul, "_read_pdu_data", None))
            and hasattr(assoc.dimse, "message") and callable(getattr(assoc.dimse, "receive_primitive", None)))


def wait_not_poll(assoc) -> bool:
    """Make one association's threads wait rather than poll (see the module's text). True when done;
    False, with pynetdicom's polling left as it is, when its internals are not the expected ones."""
    if not _expected(assoc):
        if not _warned.is_set():
            _warned.set()
            log.warning("this pynetdicom's internals are not the ones expected: its associations poll as "
                        "pynetdicom does (slower under load; nothing else changes)")
        return False
    dul, transport = assoc.dul, assoc.dul.socket
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    transport._wake_r, transport._wake_w = wake_r, wake_w
    transport._selector = selectors.DefaultSelector()
    transport._selector.register(transport.socket, selectors.EVENT_READ)
    transport._selector.register(wake_r, selectors.EVENT_READ)
    transport.__class__ = WaitingSocket
    transport._release()  # no chunk yet: the first read makes one
    for q in (dul.event_queue, dul.to_provider_queue):
        q.put = _waking_put(q.put, wake_w, dul)
    _unbind_standard_logging(assoc)
    dul._run_loop_delay = 0  # the loop's sleep after an idle turn: `ready` waits instead
    dul.stop_dul = _joining_stop(dul, wake_w)
    dul._decode_pdu = _viewing_decode(dul, dul._decode_pdu)
    dul._read_pdu_data = _direct_read(dul)
    assoc.dimse.receive_primitive = _fragmenting_receive(assoc.dimse, assoc.dimse.receive_primitive, dul)
    msgs = assoc.dimse.msg_queue
    msgs.get = _waiting_get(msgs.get)
    return True
