"""The listener's bounds on what a peer can make it buffer (service/pdu_limits.py): the PDU stream
follower on real C-STORE / C-ECHO messages encoded by pynetdicom, and a real listener against a peer
that declares a 1 GiB PDU or sends a data set over the limit."""

import io
import resource
import struct
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF

from service.pdu_limits import COMMAND_MAX, OTHER_PDU_MAX, Inbound, Outbound, PeerOverLimit

MODEL = "imagenet-effnet-lite0"


def _stream(message, primitive, max_pdu: int) -> bytes:
    """The bytes pynetdicom sends for a DIMSE message, in PDUs of at most `max_pdu` bytes."""
    message.primitive_to_message(primitive)
    out = b""
    for p_data in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out += pdu.encode()
    return out


def _store_rq(dcm: Path, max_pdu: int) -> bytes:
    ds = pydicom.dcmread(dcm)
    rq = C_STORE()
    rq.MessageID, rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = 1, ds.SOPClassUID, ds.SOPInstanceUID
    rq.Priority = 2
    rq.DataSet = io.BytesIO(_dataset_bytes(ds))
    return _stream(C_STORE_RQ(), rq, max_pdu)


def _dataset_bytes(ds) -> bytes:
    buf = pydicom.filebase.DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue()


def _store_rsp() -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo, rsp.Status = 1, 0
    rsp.AffectedSOPClassUID, rsp.AffectedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3"
    return _stream(C_STORE_RSP(), rsp, 16382)


def _feed(reader, data: bytes, seed: int = 0) -> None:
    """In chunks of random sizes, as recv() returns them."""
    rng, pos = np.random.default_rng(seed), 0
    while pos < len(data):
        step = int(rng.integers(1, 9000))
        reader.feed(data[pos : pos + step])
        pos += step


@pytest.mark.parametrize("max_pdu", [16382, 4 * 2**20])
def test_real_requests_and_answers_pass(dcm_dir, max_pdu):
    inbound = Inbound(max_pdu, 64 * 2**20)
    outbound = Outbound(inbound)
    request = _store_rq(dcm_dir / "RG1_UNCR.dcm", max_pdu)
    assert len(request) > 7_000_000
    for seed in range(3):
        _feed(inbound, request, seed)
        assert inbound.outstanding == 1
        _feed(outbound, _store_rsp(), seed)
        assert inbound.outstanding == 0
    echo = C_ECHO()
    echo.MessageID = 2
    _feed(inbound, _stream(C_ECHO_RQ(), echo, max_pdu))
    assert inbound.outstanding == 1


def test_a_pdu_longer_than_advertised_is_refused_at_its_header(dcm_dir):
    request = _store_rq(dcm_dir / "RG1_UNCR.dcm", 4 * 2**20)
    command_pdu = 6 + struct.unpack(">L", request[2:6])[0]
    inbound = Inbound(16382, 64 * 2**20)
    inbound.feed(request[:command_pdu])
    with pytest.raises(PeerOverLimit, match="of 4194304 bytes: more than the 16382"):
        inbound.feed(request[command_pdu : command_pdu + 6])  # the data PDU's header alone
    with pytest.raises(PeerOverLimit, match=f"more than the {OTHER_PDU_MAX}"):
        Inbound(16382, 2**20).feed(struct.pack(">BBL", 0x01, 0, 2**31))  # an association request of 2 GiB


def test_a_data_set_over_the_limit_is_refused_before_it_is_all_there(dcm_dir):
    inbound = Inbound(16382, 2**20)
    request = _store_rq(dcm_dir / "RG1_UNCR.dcm", 16382)
    fed = 0
    with pytest.raises(PeerOverLimit, match="data set of more than 1048576"):
        for start in range(0, len(request), 4096):
            inbound.feed(request[start : start + 4096])
            fed = start + 4096
    assert 2**20 <= fed < 2**20 + 2 * 16382


def test_a_request_before_the_answer_is_refused(dcm_dir):
    inbound = Inbound(16382, 64 * 2**20)
    echo = C_ECHO()
    echo.MessageID = 1
    inbound.feed(_stream(C_ECHO_RQ(), echo, 16382))
    with pytest.raises(PeerOverLimit, match="before the answer"):
        inbound.feed(_stream(C_ECHO_RQ(), echo, 16382))


def test_a_long_command_set_and_a_malformed_pdv_are_refused():
    with pytest.raises(PeerOverLimit, match=f"command set of more than {COMMAND_MAX}"):
        item = struct.pack(">LBB", 2 + 60000, 1, 0x01) + b"\0" * 60000  # command fragments, never the last
        pdu = struct.pack(">BBL", 0x04, 0, len(item)) + item
        Inbound(2**20, 2**20).feed(pdu * 2)
    with pytest.raises(PeerOverLimit, match="does not fit its PDU"):
        Inbound(2**20, 2**20).feed(struct.pack(">BBL", 0x04, 0, 100) + struct.pack(">LBB", 5000, 1, 0x02))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_listener_cuts_off_a_hostile_peer_and_goes_on(dcm_dir, tmp_path, caplog):
    """A 1 GiB PDU (pynetdicom alone would read it all) and a data set over the limit: each association
    is ended, the listener's memory does not grow, and the next sender is served."""
    from service.listener import Listener, ListenerSettings
    from service.settings import ServiceSettings

    ds = pydicom.dcmread(dcm_dir / "RG1_UNCR.dcm")
    settings = ListenerSettings(out=tmp_path / "s.h5", service=ServiceSettings.build(model=MODEL), port=0,
                                max_instance_bytes=2**20, max_pdu=16382)
    with Listener(settings) as listener:
        ae = AE()
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        ae.add_requested_context("1.2.840.10008.1.1")  # verification
        peak = _rss_mib()
        hostile = ae.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
        sent = 0
        with pytest.raises(OSError):
            raw = hostile.dul.socket.socket
            raw.sendall(struct.pack(">BBL", 0x04, 0, 2**30))
            for _ in range(256):
                raw.sendall(b"\0" * 2**20)
                sent += 1
        assert sent < 64 and _rss_mib() - peak < 64
        big = ae.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
        assert not big.send_c_store(ds)  # no status: the association was ended ...
        deadline = time.monotonic() + 10
        while not big.is_aborted and time.monotonic() < deadline:  # ... which the requestor's thread may see a moment later
            time.sleep(0.05)
        assert big.is_aborted and not big.is_established
        small = ae.associate("127.0.0.1", listener.port, ae_title="CXREMBED")
        assert int(small.send_c_echo().Status) == 0
        small.release()
    warnings = [r.getMessage() for r in caplog.records if r.name == "cxr_embed.listener"]
    assert any("PDU (type 0x04) of 1073741824 bytes" in w for w in warnings)
    assert any("data set of more than 1048576 bytes" in w for w in warnings)


def test_empty_fragments_count_toward_the_data_set_limit():
    """A data set sent as empty fragments still costs memory: each PDV item counts its 6 header bytes."""
    item = struct.pack(">LBB", 2, 1, 0x00)  # a data-set fragment of 0 bytes, never the last
    pdu = struct.pack(">BBL", 0x04, 0, len(item) * 1000) + item * 1000
    inbound = Inbound(2**20, 10_000)
    with pytest.raises(PeerOverLimit, match="data set of more than 10000"):
        inbound.feed(pdu * 2)
