"""What a DICOM peer can make the listener buffer: one PDU of at most the size we advertise, and one
message (command set, then data set) of at most `max_instance_bytes` besides the one being handled.

pynetdicom reads each PDU whole, at the length its header declares (up to 4 GiB, whatever maximum we
advertised), joins a message's fragments until the last one arrives, without a limit, and goes on
reading while a request is being handled. So the listener reads each connection through
`BoundedSocket`, which follows the PDU stream both ways as it passes (PS3.8 9.3: PDU headers; P-DATA-TF
PDV items and their message control headers) and ends the connection, before buffering more, when a
PDU or a message exceeds its bound or a request comes before the previous one was answered. pynetdicom
then sees a closed connection and ends the association; the peer sees it aborted (it cannot be answered
with a status: a C-STORE is answered only after its whole data set has arrived).
"""

from __future__ import annotations

import logging
import socket
import struct

log = logging.getLogger("cxr_embed.listener")

P_DATA_TF = 0x04
OTHER_PDU_MAX = 1 * 2**20  # association requests and the like: a few KiB, even with 128 presentation contexts
COMMAND_MAX = 64 * 2**10  # a command set is a few hundred bytes
PDV_HEADER = 6  # a PDV item's length, context id and message control header


class PeerOverLimit(ConnectionError):
    """The peer sent more than the listener accepts; the connection is ended."""


class PduReader:
    """Follows a stream of PDUs given in chunks of any size (PS3.8 9.3); calls `pdu(kind, length)` for
    each PDU header and `fragment(command, size, last)` for each PDV item of a P-DATA-TF PDU."""

    def __init__(self):
        self._head = b""  # a PDU or PDV item header being read: both are 6 bytes
        self._skip = 0  # bytes to pass over before the next header
        self._pdu_left = 0  # bytes of the current P-DATA-TF PDU not yet seen (0: next is a PDU header)

    def feed(self, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            if self._skip:
                step = min(self._skip, len(data) - pos)
                self._skip -= step
                pos += step
                continue
            need = 6 - len(self._head)
            self._head += bytes(data[pos : pos + need])
            pos += need
            if len(self._head) == 6:
                self._header(self._head)
                self._head = b""

    def _header(self, head: bytes) -> None:
        if self._pdu_left == 0:  # a PDU: type, reserved, length
            kind, _, length = struct.unpack(">BBL", head)
            self.pdu(kind, length)
            self._pdu_left, self._skip = (length, 0) if kind == P_DATA_TF else (0, length)
            return
        # a PDV item: its length (context id, control header and fragment), context id, control header
        length, _, control = struct.unpack(">LBB", head)
        if not 2 <= length <= self._pdu_left - 4:
            raise PeerOverLimit("a PDV item that does not fit its PDU")
        self._pdu_left -= 4 + length
        self._skip = length - 2
        self.fragment(bool(control & 0x01), length - 2, bool(control & 0x02))

    def pdu(self, kind: int, length: int) -> None:
        pass

    def fragment(self, command: bool, size: int, last: bool) -> None:
        pass


class Inbound(PduReader):
    """What a peer sends: raises PeerOverLimit once a PDU is longer than `max_pdu` (P-DATA-TF) or
    OTHER_PDU_MAX, a message's fragments add up to more than `max_message` (data set) or COMMAND_MAX
    (command set), or a request arrives before the previous one was answered (the peer may have one
    request outstanding: no asynchronous operations are negotiated)."""

    def __init__(self, max_pdu: int, max_message: int):
        super().__init__()
        self.max_pdu, self.max_message = int(max_pdu), int(max_message)
        self.outstanding = 0  # requests received and not yet answered
        self._sizes = {True: 0, False: 0}  # bytes so far of the command set and of the data set

    def pdu(self, kind: int, length: int) -> None:
        limit = self.max_pdu if kind == P_DATA_TF else OTHER_PDU_MAX
        if length > limit:
            raise PeerOverLimit(f"a PDU (type 0x{kind:02X}) of {length} bytes: more than the {limit} accepted")

    def fragment(self, command: bool, size: int, last: bool) -> None:
        # the item's 6 header bytes count too: empty fragments still cost the listener memory
        self._sizes[command] += size + PDV_HEADER
        limit = COMMAND_MAX if command else self.max_message
        if self._sizes[command] > limit:
            raise PeerOverLimit(f"a {'command' if command else 'data'} set of more than {limit} bytes")
        if last:
            self._sizes[command] = 0
            if command:
                self.outstanding += 1
                if self.outstanding > 1:
                    raise PeerOverLimit("a request before the answer to the previous one")


class Outbound(PduReader):
    """What the listener sends: each command set it completes answers one request of `inbound`."""

    def __init__(self, inbound: Inbound):
        super().__init__()
        self.inbound = inbound

    def fragment(self, command: bool, size: int, last: bool) -> None:
        if command and last:
            self.inbound.outstanding = max(0, self.inbound.outstanding - 1)


class BoundedSocket:
    """A connected socket whose traffic goes through `Inbound` and `Outbound`; the rest is the socket's.
    Past a limit it reads as a connection closed by the peer (pynetdicom then ends the association)."""

    def __init__(self, sock, max_pdu: int, max_message: int):
        self._sock = sock
        self._in = Inbound(max_pdu, max_message)
        self._out = Outbound(self._in)
        self._over = False

    def recv(self, bufsize: int, *flags) -> bytes:
        if self._over:
            return b""
        data = self._sock.recv(bufsize, *flags)
        return data if self._feed(data) else b""

    def _feed(self, data) -> bool:
        """Follow received bytes; False (and the connection shut) once the peer is over a limit."""
        try:
            self._in.feed(data)
        except PeerOverLimit as exc:
            log.warning("association ended: the peer sent %s", exc)
            self._over = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False
        return True

    def recv_into(self, buffer, nbytes: int = 0, *flags) -> int:
        if self._over:
            return 0
        n = self._sock.recv_into(buffer, nbytes, *flags)
        with memoryview(buffer) as view:
            if not self._feed(view[:n]):
                return 0
        return n

    def send(self, data, *flags) -> int:
        sent = self._sock.send(data, *flags)
        self._out.feed(bytes(data[:sent]))
        return sent

    def sendall(self, data, *flags) -> None:
        self._sock.sendall(data, *flags)
        self._out.feed(bytes(data))

    def __getattr__(self, name):
        return getattr(self._sock, name)


def bound_connection(event, max_pdu: int, max_message: int) -> None:
    """EVT_CONN_OPEN handler of the listener: before the association reads anything, its socket is
    wrapped in a BoundedSocket."""
    transport = event.assoc.dul.socket
    if transport is not None and transport.socket is not None and not isinstance(transport.socket, BoundedSocket):
        transport.socket = BoundedSocket(transport.socket, max_pdu, max_message)
