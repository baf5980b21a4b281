"""The listener's waits instead of pynetdicom's polling, its read-ahead and its zero-copy P-DATA path
(service/reactor.py): the bytes that reach the store are the bytes sent, an idle association costs no
CPU, and the pieces behave as the pynetdicom objects they stand in for."""

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from pynetdicom.pdu import P_DATA_TF

from cxr_embed import Store
from cxr_embed.runtime import Runtime, RuntimeSettings
from servers import in_process_listener
from service import reactor
from service.reactor import FragmentIO, WaitingSocket, wait_not_poll

MODEL = "imagenet-effnet-lite0"

# One association: C-ECHO, then idle for IDLE seconds (printing "idle" when it starts), then C-STOREs
# of the given files (each with a new SOP Instance UID), then release; prints each UID and status.
CLIENT = r"""
import sys, time
import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification
port, idle, paths = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
ae = AE(ae_title="IDLER")
ae.add_requested_context(Verification)
datasets = [pydicom.dcmread(p) for p in paths]
for ds in datasets:
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
assoc = ae.associate("127.0.0.1", port, ae_title="CXREMBED")
assert assoc.is_established
assert int(assoc.send_c_echo().Status) == 0
print("idle", flush=True)
time.sleep(idle)
print("sending", flush=True)
for ds in datasets:
    ds.SOPInstanceUID = generate_uid()
    print(ds.SOPInstanceUID, int(assoc.send_c_store(ds).Status), flush=True)
assoc.release()
"""


def _client(tmp_path, port, idle, paths):
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    return subprocess.Popen([sys.executable, str(script), str(port), str(idle), *map(str, paths)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _start_listener(tmp_path, port):
    """`cxr-embed listen` in its own process (its CPU is then its own, not the test process's)."""
    log = tmp_path / "listener.log"
    proc = subprocess.Popen([sys.executable, "-m", "cxr_embed", "listen", "--port", str(port), "--out",
                             str(tmp_path / "s.h5"), "--model", MODEL, "--max-pdu", "16384"],
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while b"listening for DICOM" not in log.read_bytes():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("listener did not start: " + log.read_text()[-3000:])
        time.sleep(0.3)
    return proc


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_association_costs_no_cpu_and_then_stores_exact_bytes(dcm_dir, tmp_path):
    """pynetdicom's two threads per association polled every millisecond: an association held open and
    idle took 0.2 CPU s in 2 s (measured with `wait_not_poll` switched off). Then the instances sent
    after the wait (in 16 KiB PDUs: many PDV fragments each) are stored with the embeddings of the
    files themselves."""
    from servers import free_port

    files = [dcm_dir / "RG1_UNCR.dcm", dcm_dir / "RG3_UNCR.dcm", dcm_dir / "RG1_J2KR.dcm"]
    port = free_port()
    listener = _start_listener(tmp_path, port)
    try:
        client = _client(tmp_path, port, 2.0, files)
        assert client.stdout.readline().strip() == "idle"
        time.sleep(0.3)  # the association's threads settle into their wait
        cpu0 = _cpu_s(listener.pid)
        line = client.stdout.readline().strip()
        idle_cpu = _cpu_s(listener.pid) - cpu0
        assert line == "sending"
        out, _ = client.communicate(timeout=240)
    finally:
        listener.send_signal(signal.SIGTERM)
        listener.wait(60)
    assert client.returncode == 0, out
    assert idle_cpu < 0.08, f"the listener took {idle_cpu:.3f} CPU s while one association was idle"
    sent = [line.split() for line in out.split("\n") if line.strip()]
    assert [status for _, status in sent] == ["0", "0", "0"]
    store = Store(tmp_path / "s.h5")
    runtime = Runtime(RuntimeSettings(model=MODEL))
    try:
        for (uid, _), path in zip(sent, files):
            stored = store.get([uid])[0]
            prepared = runtime.prepare(path.read_bytes())
            direct = runtime.forward(prepared.tensor[None])[0][0]
            np.testing.assert_allclose(stored, direct, atol=1e-5)
    finally:
        runtime.close()


def test_polling_is_kept_when_pynetdicom_is_not_what_is_expected(caplog):
    class Unexpected:  # an association whose DUL has none of the expected attributes
        dul = type("Dul", (), {"socket": object()})()
        dimse = object()

    reactor._warned.clear()
    with caplog.at_level(logging.WARNING, logger="cxr_embed.listener"):
        assert wait_not_poll(Unexpected()) is False
        assert wait_not_poll(Unexpected()) is False
    assert len([r for r in caplog.records if "poll as pynetdicom does" in r.getMessage()]) == 1


def test_the_reader_never_sleeps_and_ends_when_its_association_does(monkeypatch):
    """A real association (pynetdicom's client, a server whose connections get `wait_not_poll`): the
    server's reader thread never sleeps in its loop (it slept 1 ms before sending each reply) and,
    once the association is released, ends (its stop waits by joining, not by a spinning loop)."""
    import pynetdicom.dul
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    slept, duls, real_sleep = [], [], time.sleep

    def recording_sleep(seconds):
        slept.append((threading.current_thread(), seconds))
        real_sleep(seconds)

    monkeypatch.setattr(pynetdicom.dul, "time", SimpleNamespace(sleep=recording_sleep))

    def on_open(event):
        assert wait_not_poll(event.assoc)
        duls.append(event.assoc.dul)

    server_ae = AE(ae_title="SCP")
    server_ae.add_supported_context(Verification)
    server = server_ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    try:
        client = AE(ae_title="SCU")
        client.add_requested_context(Verification)
        assoc = client.associate("127.0.0.1", server.server_address[1], ae_title="SCP")
        assert assoc.is_established
        assert [int(assoc.send_c_echo().Status) for _ in range(5)] == [0] * 5
        assoc.release()
        assert len(duls) == 1
        duls[0].join(10)
        assert not duls[0].is_alive()
    finally:
        server.shutdown()
    assert [seconds for thread, seconds in slept if thread is duls[0] and seconds > 0] == []
    assert [seconds for thread, seconds in slept if thread is duls[0].assoc] == []  # its stop joined the reader


def test_stopping_the_reader_wakes_and_joins_it_and_only_in_the_idle_state():
    a, b = socket.socketpair()
    b.settimeout(10)  # a stop that did not wake the reader would leave it here (then: no wake-up seen)
    woke = []

    class Reader(threading.Thread):
        _kill_thread = False
        state_machine = SimpleNamespace(current_state="Sta6")

        def run(self):
            while not self._kill_thread:
                try:
                    woke.append(b.recv(1))
                except TimeoutError:
                    return

    reader = Reader()
    reader.start()
    stop = reactor._joining_stop(reader, a)
    assert stop() is False and reader.is_alive()  # not idle (Sta6): pynetdicom's stop_dul refuses too
    reader.state_machine.current_state = "Sta1"
    assert stop() is True and not reader.is_alive() and woke == [b"\0"]
    a.close()
    b.close()


def test_fragment_io_reads_as_the_bytes_written():
    data = np.random.default_rng(0).bytes(300_000)
    pdus = [bytearray(data[i:i + 70_000]) for i in range(0, len(data), 70_000)]
    io = FragmentIO()
    for pdu in pdus:
        io.write(memoryview(pdu))
    assert io.with_prefix(b"DICM") == b"DICM" + data  # before any read: one join
    assert io.getvalue() == data  # a read seals it
    io.seek(10)
    assert io.read(5) == data[10:15]
    io.seek(0, 2)
    io.write(b"tail")
    assert io.getvalue() == data + b"tail"
    assert io.with_prefix(b"P") == b"P" + data + b"tail"


def _p_data_pdu(fragments):
    pdu = P_DATA_TF()
    for context_id, control, payload in fragments:
        pdu.presentation_data_value_items.append(_item(context_id, bytes([control]) + payload))
    return bytearray(pdu.encode())


def _item(context_id, value):
    from pynetdicom.pdu_items import PresentationDataValueItem

    item = PresentationDataValueItem()
    item.presentation_context_id = context_id
    item.presentation_data_value = value
    return item


class _Dul:
    """What `_viewing_decode` uses of a DUL: its association's handlers."""

    class assoc:  # noqa: N801
        @staticmethod
        def get_handlers(event):
            return []


def _decoded(pdu):
    return [(cid, bytes(value)) for cid, value in pdu.to_primitive().presentation_data_value_list]


def test_p_data_views_decode_as_pynetdicom_does():
    fragments = [(1, 0x00, b"a" * 1000), (1, 0x02, b"b" * 17), (3, 0x03, b"\x08\x00" * 9)]
    stream = _p_data_pdu(fragments)
    ours, event = reactor._viewing_decode(_Dul(), lambda b: pytest.fail("pynetdicom's decoder was used"))(stream)
    assert event == "Evt10"
    theirs = P_DATA_TF()
    theirs.decode(bytes(stream))
    assert _decoded(ours) == _decoded(theirs) == [(c, bytes([h]) + p) for c, h, p in fragments]


@pytest.mark.parametrize("cut", [1, 3, 7])
def test_a_p_data_item_that_does_not_fit_goes_to_pynetdicom(cut):
    stream = _p_data_pdu([(1, 0x02, b"x" * 100)])
    stream[6:10] = (len(stream) - 10 + cut).to_bytes(4, "big")  # the item claims more than the PDU holds
    used = []
    reactor._viewing_decode(_Dul(), lambda b: used.append(b) or ("pdu", "Evt10"))(stream)
    assert used == [stream]


def _reading_socket(sock, established=True):
    transport = WaitingSocket.__new__(WaitingSocket)  # only what the reads use
    transport.socket = sock
    transport._assoc = SimpleNamespace(is_established=established)
    transport._release()
    return transport


def _sending(sock, payload, step=50_000):
    def send():
        for i in range(0, len(payload), step):
            sock.sendall(payload[i:i + step])
        sock.close()
    sender = threading.Thread(target=send)
    sender.start()
    return sender


def test_waiting_socket_reads_exactly_what_was_sent_in_any_sizes():
    a, b = socket.socketpair()
    payload = np.random.default_rng(1).bytes(3 * 2**20 + 17)
    transport = _reading_socket(b)
    sender = _sending(a, payload)
    got, sizes = bytearray(), [6, 131072, 1, 4096, 2**20]
    while True:
        chunk = transport.recv(sizes[len(got) % len(sizes)])
        got += chunk
        if len(chunk) < sizes[(len(got) - len(chunk)) % len(sizes)]:
            break  # the peer closed: a short read, as pynetdicom's recv gives
    sender.join()
    b.close()
    assert bytes(got) == payload


def test_a_view_still_held_is_never_overwritten_and_released_chunks_are_reused(monkeypatch):
    """Views of the chunks (as PDUs, their PDV items and the data set's fragments are) keep their bytes
    however much is read after them; once they are let go, the same few chunks serve the whole stream."""
    monkeypatch.setattr(reactor, "CHUNK", 2**18)
    a, b = socket.socketpair()
    payload = np.random.default_rng(3).bytes(40 * 2**20)
    transport = _reading_socket(b)
    made = []
    real_bytearray = bytearray
    monkeypatch.setattr(reactor, "bytearray", lambda *args: made.append(1) or real_bytearray(*args), raising=False)
    sender = _sending(a, payload, step=100_000)
    held, pos, size = [], 0, 100_003  # PDU-sized reads that straddle the chunks' ends
    while pos < len(payload):
        view = transport.view(size)
        assert len(view) == min(size, len(payload) - pos)
        if pos // size % 50 == 0:  # kept: a numpy array made from it holds it too
            held.append((pos, np.frombuffer(view, dtype=np.uint8)))
        pos += len(view)
        del view
    sender.join()
    b.close()
    for start, array in held:
        assert array.tobytes() == payload[start : start + len(array)]
    # 40 MiB through 256 KiB chunks: without reuse about 160 would have been made
    assert len(made) <= 3 + 2 * len(held), f"{len(made)} chunks made"


def test_an_idle_connection_lets_its_chunks_go(monkeypatch):
    """After IDLE_RELEASE_S without data an open connection holds no buffers; one that received data
    lately keeps them (re-making them per message would cost a zero-fill and fresh pages each time)."""
    import queue
    import selectors

    monkeypatch.setattr(reactor, "IDLE_WAIT_S", 0.01)
    a, b = socket.socketpair()
    wake_r, wake_w = socket.socketpair()
    transport = _reading_socket(b)
    transport._is_connected = True
    transport._wake_r = wake_r
    transport._selector = selectors.DefaultSelector()
    transport._selector.register(b, selectors.EVENT_READ)
    transport._selector.register(wake_r, selectors.EVENT_READ)
    transport._assoc.dul = SimpleNamespace(_kill_thread=False, event_queue=queue.Queue(), to_provider_queue=queue.Queue())
    a.sendall(b"x" * 1000)
    assert transport.ready and bytes(transport.view(1000)) == b"x" * 1000
    assert len(transport._chunk) == reactor.CHUNK
    assert not transport.ready and len(transport._chunk) == reactor.CHUNK  # idle, but not for long
    transport._last_read -= reactor.IDLE_RELEASE_S + 1
    assert not transport.ready and transport._chunk == bytearray() and transport._spares == []
    a.sendall(b"y" * 10)  # and it reads on as before
    assert transport.ready and bytes(transport.view(10)) == b"y" * 10
    transport._selector.close()
    for end in (a, b, wake_r, wake_w):
        end.close()


def test_a_chunk_with_a_live_export_is_not_reusable():
    buf = bytearray(1000)
    view = memoryview(buf)[10:20]
    array = np.frombuffer(view, dtype=np.uint8)
    del view
    assert not reactor._unexported(buf)
    del array
    assert reactor._unexported(buf) and len(buf) == 1000


def test_pdus_are_decoded_as_views_other_pdus_as_bytes_of_their_own():
    """A P-DATA-TF PDU of an established association reaches the decoder as a view of the chunk it
    was read into; an A-ASSOCIATE-RQ (or anything before establishment) as bytes."""
    a, b = socket.socketpair()
    p_data = bytes(_p_data_pdu([(1, 0x02, b"y" * 5000)]))
    other = bytes([0x05, 0, 0, 0, 0, 4]) + b"\0" * 4  # an A-RELEASE-RQ
    a.sendall(p_data + other + p_data)
    a.close()
    decoded, events = [], []
    dul = SimpleNamespace(socket=_reading_socket(b), assoc=SimpleNamespace(is_established=True),
                          event_queue=SimpleNamespace(put=events.append), _recv_pdu=SimpleNamespace(put=lambda pdu: None),
                          _decode_pdu=lambda pdu: (decoded.append(pdu), ("pdu", "Evt10"))[1])
    read = reactor._direct_read(dul)
    for _ in range(3):
        read()
    b.close()
    assert [type(d) for d in decoded] == [memoryview, bytes, memoryview]
    assert [bytes(d) for d in decoded] == [p_data, other, p_data] and events == ["Evt10"] * 3


def test_the_readers_own_events_send_no_wake_up():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    q = []
    reader = threading.Thread(target=lambda: put("from the reader"))
    put = reactor._waking_put(lambda item, block, timeout: q.append(item), a, reader)
    reader.start()
    reader.join()
    with pytest.raises(BlockingIOError):
        b.recv(16)  # nothing was sent
    put("from another thread")
    assert b.recv(16) == b"\0" and q == ["from the reader", "from another thread"]
    a.close()
    b.close()


def test_a_large_join_without_the_gil_equals_bytes_join():
    rng = np.random.default_rng(2)
    parts = [b"\x00" * 128 + b"DICM", memoryview(bytearray(rng.bytes(700_000))), b"",
             memoryview(rng.bytes(900_000)), memoryview(bytearray(rng.bytes(5)))[1:4], bytearray(b"end")]
    out = reactor.joined(parts)
    assert type(out) is bytes and out == b"".join(parts)
    assert reactor.joined([b"a", memoryview(b"b")]) == b"ab"  # small: bytes' own join
    io = FragmentIO()
    for part in parts[1:]:
        io.write(memoryview(part))
    assert io.with_prefix(parts[0]) == b"".join(parts)
    assert io._parts is None  # the fragments (views of the connection's chunks) are let go
    assert io.getvalue() == b"".join(parts[1:])  # and the data set still reads as it was


def test_tiny_fragments_are_copied_so_their_pdus_are_not_kept():
    """A peer's 1-byte (or empty) data-set fragments, one per PDU: the data set keeps copies of the
    bytes, not the PDUs they came in (2,000 x 64 KiB would be 128 MiB)."""
    import tracemalloc

    tracemalloc.start()
    try:
        io = FragmentIO()
        for i in range(2000):
            pdu = bytearray(2**16)
            pdu[7] = i % 251
            io.write(memoryview(pdu)[7:8])
            io.write(memoryview(pdu)[8:8])  # an empty fragment
            del pdu
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 2**20, f"{held} bytes held for 2,000 one-byte fragments"
    assert io.getvalue() == bytes(i % 251 for i in range(2000))


def test_a_large_pdu_before_any_association_is_refused_before_its_buffer(tmp_path):
    """6 bytes declaring a 4 MiB P-DATA-TF, before A-ASSOCIATE: the listener aborts the connection at
    once rather than reserving 4 MiB for a peer that may never send it; then it serves others."""
    import struct

    with in_process_listener(tmp_path, MODEL) as listener:
        with socket.create_connection(("127.0.0.1", listener.port), timeout=20) as peer:
            peer.sendall(struct.pack(">BBL", 0x04, 0, 4 * 2**20))
            received = b""
            while chunk := peer.recv(4096):  # ends when the listener closes the connection
                received += chunk
        assert received in (b"", bytes.fromhex("07000000000400000000"))  # one A-ABORT at most, then the close
        echo = subprocess.run([sys.executable, "-m", "pynetdicom", "echoscu", "127.0.0.1", str(listener.port)],
                              capture_output=True, text=True, timeout=60)
        assert echo.returncode == 0, echo.stderr[-2000:]


# a P-DATA-TF PDU of 1000 bytes, its one PDV item (a data-set fragment of presentation context 1) cut off
# after 10 of its bytes: well formed so far (the listener's BoundedSocket would end a malformed one at once)
PART_OF_A_P_DATA = bytes.fromhex("04000000 03e8") + bytes.fromhex("000003e4 01 00") + b"x" * 10


def _read_until_closed(peer, limit_s: float) -> tuple[bytes, float]:
    start, received = time.monotonic(), b""
    peer.settimeout(limit_s)
    try:
        while chunk := peer.recv(4096):
            received += chunk
    except socket.timeout:
        return received + b"<still open>", time.monotonic() - start
    return received, time.monotonic() - start


@pytest.mark.parametrize("pdu_type", [0x09, 0xFF])
def test_an_unknown_pdu_gets_one_abort_and_the_connection_closes(tmp_path, caplog, pdu_type):
    """10 bytes (a PDU of an unknown type) used to make the listener send A-ABORTs in a loop, tens of
    thousands a second with a log line each: its header was peeked, never consumed, and read again on
    every turn. Now one A-ABORT, one log line, and the connection is closed."""
    import struct

    with in_process_listener(tmp_path, MODEL) as listener, caplog.at_level(logging.ERROR, "pynetdicom"):
        with socket.create_connection(("127.0.0.1", listener.port), timeout=20) as peer:
            peer.sendall(struct.pack(">BBL", pdu_type, 0, 4) + b"abcd")
            received, _ = _read_until_closed(peer, 20)
        assert received == bytes.fromhex("07000000000400000000"), received[:40]  # A-ABORT, source: service user
        assert len([r for r in caplog.records if "Unknown PDU type" in r.getMessage()]) == 1


def test_a_peer_that_stops_within_a_pdu_holds_only_its_association_and_not_for_ever(tmp_path):
    """A read waited for the rest of a PDU for ever: 6 bytes of an A-ASSOCIATE-RQ header per connection
    held every association slot, and a peer stopped inside a P-DATA-TF outlived the idle timer. Now
    the reader waits where pynetdicom's timers are checked: ARTIM closes the first (acse_timeout), the
    idle timer aborts the second (network_timeout); others are served meanwhile."""
    import struct

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with in_process_listener(tmp_path, MODEL) as listener:
        listener._ae.acse_timeout = listener._ae.network_timeout = 2
        with socket.create_connection(("127.0.0.1", listener.port), timeout=20) as peer:
            peer.sendall(struct.pack(">BBL", 0x01, 0, 200))  # an A-ASSOCIATE-RQ that never comes
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
            assert assoc.is_established and int(assoc.send_c_echo().Status) == 0  # served meanwhile
            # established, then part of a P-DATA-TF PDU (header and 10 of its 1000 bytes), then nothing
            assoc.dul.socket.socket.sendall(PART_OF_A_P_DATA)
            received, waited = _read_until_closed(peer, 20)
            assert received in (b"", bytes.fromhex("07000000000400000000")) and waited < 10
            deadline = time.monotonic() + 15
            while listener._ae.active_associations and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not listener._ae.active_associations  # ended by the idle timer (2 s here)
            assoc.abort()


def test_stop_does_not_wait_for_stalled_peers(tmp_path):
    """SIGTERM with one connection stalled inside its A-ASSOCIATE-RQ never finished: the abort had no
    transition before an association (Sta2) and the reader was blocked in a read; one stalled inside a
    P-DATA-TF after associating, which never reads the A-ABORT nor closes, held it for ARTIM (30 s).
    Now `stop()` closes both and returns soon after its grace period."""
    import struct

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    listener = in_process_listener(tmp_path, MODEL, stop_grace_s=1).start()
    with socket.create_connection(("127.0.0.1", listener.port), timeout=20) as peer:
        peer.sendall(struct.pack(">BBL", 0x01, 0, 200))
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
        assert assoc.is_established
        stalled = assoc.dul.socket.socket.dup()  # the connection outlives the client's own threads
        stalled.sendall(PART_OF_A_P_DATA)
        assoc.dul.kill_dul()  # the client stops: nothing reads the abort or closes the connection
        time.sleep(0.5)
        start = time.monotonic()
        summary = listener.stop()
        took = time.monotonic() - start
        received, _ = _read_until_closed(peer, 5)
        got, _ = _read_until_closed(stalled, 5)
        stalled.close()
    assert took < 6, f"stop() took {took:.1f} s"
    assert not received.endswith(b"<still open>") and summary.received == 0
    assert got.startswith(b"\x07") and not got.endswith(b"<still open>")  # an A-ABORT, then closed


def test_a_bad_header_behind_a_whole_pdu_is_refused_before_any_buffer_is_made_for_it():
    """A whole PDU and, in the same read, the header of one declaring ~4 GiB: the first is decoded; the
    second is refused from its header (one Evt19, the stream given up), and no buffer is made for its
    declared length; a PDU arriving a byte at a time is decoded once whole, never waited for inside a read."""
    import queue
    import struct

    a, b = socket.socketpair()
    transport = _reading_socket(b)
    transport._poisoned = False
    dul = SimpleNamespace(socket=transport, assoc=transport._assoc, event_queue=queue.Queue(), _recv_pdu=queue.Queue(),
                          _decode_pdu=lambda pdu: ((pdu[0], bytes(pdu)), "Evt10"))
    read = reactor._direct_read(dul)
    whole = _p_data_pdu([(1, 0x02, b"x" * 100)])
    a.sendall(bytes(whole[:3]))
    read()  # 3 bytes of a header: nothing to act on yet, and the read did not wait for more
    assert dul.event_queue.empty()
    for i in range(3, len(whole)):  # the rest, a byte at a time
        a.sendall(bytes(whole[i : i + 1]))
        read()
    assert dul.event_queue.get_nowait() == "Evt10" and dul._recv_pdu.get_nowait()[1] == bytes(whole)
    a.sendall(bytes(whole) + struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))
    read()
    assert dul.event_queue.get_nowait() == "Evt10" and dul.event_queue.empty()
    read()  # the bad header is already buffered: refused without a read
    assert dul.event_queue.get_nowait() == "Evt19" and transport._poisoned
    assert len(transport._chunk) <= reactor.CHUNK  # nothing made for its 4 GiB
    read()
    assert dul.event_queue.get_nowait() == "Evt17"  # given up: reads as a closed connection
    a.close()
    b.close()


def test_connections_closed_before_associating_free_their_slots_at_once(tmp_path):
    """9 connections opened and closed at once (no bytes, or an unknown PDU then closed) locked every
    sender out for 30 s: pynetdicom's association thread waited acse_timeout for a request that could
    no longer come, holding its slot (found by an attacker's second review)."""
    import struct

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    with in_process_listener(tmp_path, MODEL) as listener:
        for n in range(2 * listener.settings.max_associations + 1):
            with socket.create_connection(("127.0.0.1", listener.port), timeout=20) as peer:
                if n % 2:
                    peer.sendall(struct.pack(">BBL", 0x00, 0, 4) + b"abcd")
                    _read_until_closed(peer, 10)
        deadline = time.monotonic() + 5
        while listener._ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not listener._ae.active_associations
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
        assert assoc.is_established and int(assoc.send_c_echo().Status) == 0
        assoc.release()


@pytest.mark.parametrize("pdv", [bytes.fromhex("00000001 01"),  # a PDV item of 1 byte: no control header
                                 bytes.fromhex("00000004 ff 03 0000")])  # a whole command set of 2 zero bytes
def test_a_malformed_dimse_message_gets_one_abort_not_a_dead_reader(tmp_path, caplog, pdv):
    """20-byte P-DATA-TF PDUs whose messages pynetdicom's decoder fails on raised inside the reader's
    state machine: the thread died with a traceback and closed without an A-ABORT (an attacker's
    second review). Now: one A-ABORT, one log line, and the listener serves others."""
    import struct

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    errors = []
    hook, threading.excepthook = threading.excepthook, lambda args: errors.append(args.exc_type.__name__)
    try:
        with in_process_listener(tmp_path, MODEL) as listener, caplog.at_level(logging.ERROR, "pynetdicom"):
            ae = AE(ae_title="TESTSCU")
            ae.add_requested_context(Verification)
            assoc = ae.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
            raw = assoc.dul.socket.socket.dup()
            assoc.dul.kill_dul()  # the test reads the connection itself from here
            time.sleep(0.2)
            raw.sendall(struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv)
            received, _ = _read_until_closed(raw, 20)
            raw.close()
            other = AE(ae_title="TESTSCU")
            other.add_requested_context(Verification)
            again = other.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
            assert again.is_established and int(again.send_c_echo().Status) == 0
            again.release()
    finally:
        threading.excepthook = hook
    assert received.startswith(b"\x07") and not received.endswith(b"<still open>"), received[:40]
    assert not errors, errors
    assert len([r for r in caplog.records if "malformed DIMSE message" in r.getMessage()]) == 1
