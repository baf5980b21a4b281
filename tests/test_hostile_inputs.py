"""Hostile inputs: broken numbers in headers, decompression bombs, identifying values in messages,
and random header mutations of real files (hypothesis), decoded in a child process with a memory cap."""

from __future__ import annotations

import io
import json
import logging
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.tag import Tag

from cxr_embed.errors import ImageTooLarge, InputError, InvalidPixelTransform, UndecodableImage
from cxr_embed.ingest import MAX_PIXELS, load_image

ROOT = Path(__file__).resolve().parents[1]


def _raw(ds: Dataset, keyword: str, vr: str, value: bytes) -> Dataset:
    """Set an element's bytes as they would come from a file, bypassing pydicom's value checks."""
    tag = Tag(pydicom.datadict.tag_for_keyword(keyword))
    ds._dict[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return ds


def _bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def _rg1(dcm_dir) -> Dataset:
    return pydicom.dcmread(dcm_dir / "RG1_UNCR.dcm")


# ---------------------------------------------------------------------------------------------
# Numbers feeding the pixel pipeline


@pytest.mark.parametrize("keyword", ["RescaleSlope", "RescaleIntercept"])
@pytest.mark.parametrize("text", [b"NaN ", b"inf ", b"-inf", b"1e999 ", b"abc "])
def test_non_finite_rescale_is_refused_naming_the_tag(dcm_dir, keyword, text):
    ds = _rg1(dcm_dir)
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    with pytest.raises(InvalidPixelTransform, match=keyword) as exc:
        load_image(_bytes(_raw(ds, keyword, "DS", text)))
    assert exc.value.code == "invalid_pixel_transform"


def test_rescale_that_overflows_is_refused(dcm_dir):
    ds = _rg1(dcm_dir)
    ds.RescaleIntercept = 0
    with pytest.raises(InvalidPixelTransform, match="overflows"):
        load_image(_bytes(_raw(ds, "RescaleSlope", "DS", b"1e308 ")))


@pytest.mark.parametrize("keyword, text", [("WindowCenter", b"NaN "), ("WindowWidth", b"inf "),
                                           ("WindowWidth", b"-1e999"), ("WindowWidth", b"0 "),
                                           ("WindowWidth", b"-40 ")])
def test_broken_window_is_ignored_with_a_warning_and_flagged(dcm_dir, keyword, text):
    """Documented choice: a broken window loses only the presentation; the stored range is stretched."""
    img = load_image(_bytes(_raw(_rg1(dcm_dir), keyword, "DS", text)))
    assert np.isfinite(img.pixels).all() and img.pixels.std() > 0.05
    assert img.info.window == "min_max" and img.info.reliable is False
    assert any("WindowWidth" in w or "WindowCenter" in w for w in img.info.warnings)


@pytest.mark.parametrize("value, expect", [(0, "BitsStored is 0"), (40, "BitsStored is 40")])
def test_bits_stored_out_of_range_is_refused(dcm_dir, value, expect):
    ds = _raw(_rg1(dcm_dir), "BitsStored", "US", struct.pack("<H", value))
    with pytest.raises(InvalidPixelTransform, match=expect):
        load_image(_bytes(ds))


def test_broken_voi_lut_descriptor_is_ignored_with_a_warning(dcm_dir):
    ds = _rg1(dcm_dir)
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 40])  # 40 bits per entry: PS3.3 C.11.2.1.1 allows 8..16
    item.add_new(0x00283006, "OW", np.arange(4096, dtype="<u2").tobytes())
    ds.VOILUTSequence = [item]
    img = load_image(_bytes(ds))
    assert img.info.window == "min_max" and not img.info.reliable
    assert any("LUTDescriptor declares 40 bits" in w for w in img.info.warnings)


# ---------------------------------------------------------------------------------------------
# Decompression bombs: refused from the declared size, before decoding


def _rle_bomb(dcm_dir) -> bytes:
    ds = pydicom.dcmread(dcm_dir / "RG3_UNCR.dcm")
    ds.compress(pydicom.uid.RLELossless)
    ds.Rows = ds.Columns = 65535  # the RLE decoder would allocate 65535 x 65535 x 2 bytes = 8.6 GB
    return _bytes(ds)


def _deflated(ds: Dataset) -> bytes:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    return _bytes(ds)


def _deflate_bomb(dcm_dir, inflated_bytes: int) -> bytes:
    """A deflated DICOM whose pixel data inflates to `inflated_bytes` of zeros (a few hundred KB on disk)."""
    ds = pydicom.dcmread(dcm_dir / "RG3_UNCR.dcm", stop_before_pixels=True)
    head = _deflated(ds)  # preamble, meta and a deflated header without pixel data
    fp = io.BytesIO(head)
    pydicom.filereader.read_preamble(fp, False)
    pydicom.filereader._read_file_meta_info(fp)
    dataset = zlib.decompress(head[fp.tell():], -zlib.MAX_WBITS)
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [packer.compress(dataset + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", inflated_bytes))]
    chunk = bytes(1 << 20)
    body += [packer.compress(chunk) for _ in range(inflated_bytes >> 20)]
    return head[:fp.tell()] + b"".join(body) + packer.flush()


def _png_bomb(side: int = 13000) -> bytes:
    """A real 8-bit grey PNG of side x side zeros: zlib keeps it under 200 KB."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    packer = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + samples
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_declaring(samples: Path, rows: int, cols: int) -> bytes:
    data = bytearray(next(samples.glob("*.jpg")).read_bytes())
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = struct.pack(">HH", rows, cols)
    return bytes(data)


def _j2k_declaring(dcm_dir, rows: int, cols: int, header_too: bool) -> bytes:
    ds = pydicom.dcmread(dcm_dir / "MR2_J2KR.dcm")
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    frame[8:16] = struct.pack(">II", cols, rows)  # SIZ Xsiz, Ysiz (ISO 15444-1 A.5.1)
    ds.PixelData = encapsulate([bytes(frame)])
    if header_too:
        ds.Rows, ds.Columns = rows, cols
    return _bytes(ds)


@pytest.fixture(scope="module")
def bombs(dcm_dir, samples) -> dict[str, bytes]:
    return {
        "rle_65535": _rle_bomb(dcm_dir),
        "deflate_256MiB": _deflate_bomb(dcm_dir, 256 << 20),
        "png_13000": _png_bomb(),
        "jpeg_65000": _jpeg_declaring(samples, 65000, 65000),
        "jpeg_8000": _jpeg_declaring(samples, 8000, 8000),
        "j2k_codestream_60000": _j2k_declaring(dcm_dir, 60000, 60000, header_too=False),
        "j2k_header_60000": _j2k_declaring(dcm_dir, 60000, 60000, header_too=True),
    }


def test_bombs_are_small_files(bombs):
    assert all(len(b) < 8 << 20 for b in bombs.values())
    assert len(bombs["png_13000"]) < 400_000 and len(bombs["deflate_256MiB"]) < 400_000


@pytest.mark.parametrize("name", ["rle_65535", "deflate_256MiB", "png_13000", "jpeg_65000", "jpeg_8000",
                                  "j2k_codestream_60000", "j2k_header_60000"])
def test_bombs_are_refused_by_declared_size(bombs, name):
    with pytest.raises(ImageTooLarge, match="max_pixels|MAX_IMAGE_PIXELS") as exc:
        load_image(bombs[name])
    assert exc.value.code == "image_too_large"


def test_max_pixels_is_a_parameter(dcm_dir, bombs):
    with pytest.raises(ImageTooLarge, match="1,000,000"):
        load_image(dcm_dir / "RG1_UNCR.dcm", max_pixels=1_000_000)
    assert MAX_PIXELS == 50_000_000
    # over the default limit, under this one: decoded (libjpeg pads the missing data)
    assert load_image(bombs["jpeg_8000"], max_pixels=70_000_000).pixels.shape == (8000, 8000)


def test_codestream_size_must_match_the_header(dcm_dir):
    with pytest.raises(UndecodableImage, match="1025x1024"):
        load_image(_j2k_declaring(dcm_dir, 1024, 1025, header_too=False))


def test_deflated_dicom_within_the_bound_decodes(dcm_dir):
    plain = load_image(dcm_dir / "RG3_UNCR.dcm")
    deflated = load_image(_deflated(pydicom.dcmread(dcm_dir / "RG3_UNCR.dcm")))
    assert deflated.info.transfer_syntax == "Deflated Explicit VR Little Endian"
    np.testing.assert_array_equal(plain.pixels, deflated.pixels)


# ---------------------------------------------------------------------------------------------
# Identifying values never reach a message, a warning or a log line

MARKERS = {
    "PatientName": ("PN", b"PHIMARKER_NAME^PHIMARKER_GIVEN"),
    "PatientID": ("LO", b"PHIMARKER_ID"),
    "PatientBirthDate": ("DA", b"19010101"),
    "AccessionNumber": ("SH", b"PHIMARKER_ACC"),
    "InstitutionName": ("LO", b"PHIMARKER_INST"),
    "ReferringPhysicianName": ("PN", b"PHIMARKER_DOC"),
    "StudyDate": ("DA", b"19020202"),
    "StudyID": ("SH", b"PHIMARKER_SID"),
    "OtherPatientIDs": ("LO", b"PHIMARKER_OTHER"),
    # malformed: an unknown character set makes pydicom warn quoting it; a PN component over 64 chars
    "SpecificCharacterSet": ("CS", b"PHIMARKER_CHARSET"),
    "PerformingPhysicianName": ("PN", b"PHIMARKER_LONG" + b"X" * 70),
}
MARKER_TEXT = ["PHIMARKER", "19010101", "19020202"]


def _with_markers(dcm_dir, name: str = "RG1_UNCR.dcm") -> Dataset:
    ds = pydicom.dcmread(dcm_dir / name)
    for keyword, (vr, value) in MARKERS.items():
        _raw(ds, keyword, vr, value + (b" " if len(value) % 2 else b""))
    return ds


def _variants(dcm_dir) -> dict[str, bytes]:
    good = _bytes(_with_markers(dcm_dir))
    patient = good.find(b"PHIMARKER_NAME")
    out = {"good": good, "truncated_in_patient": good[: patient + 5], "truncated_pixels": good[: len(good) - 1000]}
    bad_vr = bytearray(good)
    bad_vr[patient - 4: patient - 2] = b"ZZ"  # PatientName's VR
    out["bad_vr"] = bytes(bad_vr)
    huge_len = bytearray(good)
    huge_len[patient - 2: patient] = b"\xff\xff"  # PatientName's length runs past its neighbours
    out["bad_length"] = bytes(huge_len)
    for keyword, text in (("RescaleSlope", b"NaN "), ("WindowWidth", b"-4 "), ("BitsStored", b"\x28\x00")):
        ds = _with_markers(dcm_dir)
        ds.RescaleIntercept = 0
        out[f"broken_{keyword}"] = _bytes(_raw(ds, keyword, "US" if keyword == "BitsStored" else "DS", text))
    ds = _with_markers(dcm_dir, "MR2_J2KR.dcm")
    frame = bytes(next(generate_frames(ds.PixelData, number_of_frames=1)))
    cod = frame.find(b"\xff\x52")
    ds.PixelData = encapsulate([frame[:cod] + b"\xff\x99" + frame[cod + 2:]])
    out["corrupt_j2k"] = _bytes(ds)
    ds = _with_markers(dcm_dir)
    del ds.PixelData
    out["no_pixels"] = _bytes(ds)
    return out


def test_no_identifying_value_in_messages_warnings_or_logs(dcm_dir, caplog, capfd):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants = _variants(dcm_dir)  # pydicom's own writer warns about the markers: not under test
    capfd.readouterr()
    caplog.clear()  # pydicom's writer logs the markers while building the variants
    texts: list[str] = []
    outcomes = {}
    caplog.set_level(logging.DEBUG)
    logging.getLogger("pydicom").setLevel(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for name, data in variants.items():
                try:
                    img = load_image(data)
                    texts += img.info.warnings + img.info.unreliable_reasons + [json.dumps(img.info.to_dict())]
                    outcomes[name] = "ok"
                except InputError as exc:
                    outcomes[name] = type(exc).__name__
                    e: BaseException | None = exc
                    while e is not None:
                        texts.append(f"{type(e).__name__}: {e}")
                        e = e.__cause__ or e.__context__
    finally:
        logging.getLogger("pydicom").setLevel(logging.NOTSET)
    texts += [str(w.message) for w in caught]
    texts += [r.getMessage() for r in caplog.records]
    out, err = capfd.readouterr()
    texts += [out, err]
    # the variants reach the paths we mean: a good decode, typed refusals, and pydicom warning about a marker
    assert outcomes["good"] == "ok" and outcomes["broken_RescaleSlope"] == "InvalidPixelTransform"
    assert outcomes["corrupt_j2k"] == "UndecodableImage" and outcomes["truncated_in_patient"] in ("TruncatedImage", "NoPixelData")
    assert any("<redacted>" in r.getMessage() for r in caplog.records if r.name == "cxr_embed.dicom")
    leaks = [t for t in texts if any(m in t for m in MARKER_TEXT)]
    assert not leaks, leaks[:3]


# ---------------------------------------------------------------------------------------------
# Random header mutations, decoded in a child process with its address space capped at baseline + 1 GiB

WORKER = r"""
import json, resource, struct, sys
from cxr_embed.errors import InputError
from cxr_embed.ingest import load_image

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

base = status("VmSize")
resource.setrlimit(resource.RLIMIT_AS, (base + (1 << 30), resource.RLIM_INFINITY))
inp, out = sys.stdin.buffer, sys.stdout.buffer
out.write(b"ready\n"); out.flush()
while True:
    head = inp.read(8)
    if len(head) < 8:
        break
    data = inp.read(struct.unpack("<Q", head)[0])
    try:
        if data.startswith(b"ALLOCATE "):  # the harness's own check: the cap is in force
            bytearray(int(data.split()[1]))
            raise InputError("allocated")
        load_image(data)
        reply = {"result": "ok"}
    except InputError as exc:
        chain, e = [], exc
        while e is not None:
            chain.append(type(e).__name__)
            e = e.__cause__ or e.__context__
        memory = any("MemoryError" in n for n in chain)
        reply = {"result": "memory" if memory else "input_error", "type": type(exc).__name__}
    except MemoryError:
        reply = {"result": "memory"}
    except BaseException as exc:
        reply = {"result": "crash", "type": type(exc).__name__, "message": str(exc)[:300]}
    reply["peak_rss_mib"] = status("VmHWM") / 2**20
    out.write((json.dumps(reply) + "\n").encode()); out.flush()
"""


class Worker:
    """A child process that decodes what it is sent, under RLIMIT_AS = its baseline + 1 GiB."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     cwd=ROOT, env=env)
        assert self.proc.stdout.readline() == b"ready\n"

    def decode(self, data: bytes) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(struct.pack("<Q", len(data)) + data)
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = b""
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"result": "died", "returncode": code}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    w.start()
    yield w
    w.close()


def _safe(reply: dict) -> bool:
    return reply["result"] in ("ok", "input_error")


def test_worker_catches_memory_exhaustion(worker):
    """The harness can fail: 1.5 GiB cannot be allocated in the child, and that is reported, not hidden."""
    assert worker.decode(b"ALLOCATE %d" % (3 << 29))["result"] == "memory"
    assert worker.decode(b"ALLOCATE %d" % (1 << 28))["result"] == "input_error"


def test_largest_allowed_16_bit_png_decodes_within_memory(worker):
    side = 7000  # 49 M pixels, just under MAX_PIXELS
    buf = io.BytesIO()
    Image.fromarray(np.full((side, side), 1000, np.uint16)).save(buf, format="PNG", compress_level=1)
    reply = worker.decode(buf.getvalue())
    assert reply["result"] == "ok", reply


@pytest.mark.parametrize("name", ["rle_65535", "deflate_256MiB", "png_13000", "jpeg_65000", "jpeg_8000",
                                  "j2k_codestream_60000", "j2k_header_60000"])
def test_bombs_stay_within_memory(worker, bombs, name):
    reply = worker.decode(bombs[name])
    assert reply["result"] == "input_error" and reply["type"] == "ImageTooLarge", reply


# Values that break numbers: NaN, infinities, overflow, text, empty, several values
_NUMBER_TEXT = [b"nan", b"NaN", b"inf", b"-inf", b"1e999", b"-1e999", b"1e308", b"0", b"-0", b"1", b"-1",
                b"65535", b"1e-300", b"abc", b"", b"1\\2\\3", b" 7", b"\x00\xff"]
_CODE_TEXT = [b"MONOCHROME1", b"MONOCHROME2", b"RGB", b"PALETTE COLOR", b"YBR_FULL", b"SIGMOID", b"LINEAR_EXACT",
              b"FOR PROCESSING", b"", b"\xff\xfe"]
_US_TAGS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
            "PlanarConfiguration"]
_TEXT_TAGS = {"WindowCenter": "DS", "WindowWidth": "DS", "RescaleSlope": "DS", "RescaleIntercept": "DS",
              "NumberOfFrames": "IS"}
_CODE_TAGS = ["PhotometricInterpretation", "VOILUTFunction", "PresentationIntentType"]
_SYNTAXES = [b"1.2.840.10008.1.2", b"1.2.840.10008.1.2.1", b"1.2.840.10008.1.2.2", b"1.2.840.10008.1.2.5",
             b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.90"]

_mutation = st.one_of(
    st.tuples(st.just("us"), st.sampled_from(_US_TAGS),
              st.one_of(st.integers(0, 65535).map(lambda v: struct.pack("<H", v)), st.binary(max_size=5))),
    st.tuples(st.just("text"), st.sampled_from(sorted(_TEXT_TAGS)), st.sampled_from(_NUMBER_TEXT)),
    st.tuples(st.just("code"), st.sampled_from(_CODE_TAGS), st.sampled_from(_CODE_TEXT)),
    st.tuples(st.just("delete"), st.sampled_from(_US_TAGS + sorted(_TEXT_TAGS) + _CODE_TAGS), st.just(b"")),
)


def _mutate_dicom(base: bytes, mutations, syntax: bytes | None, flips) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(base))
    for kind, keyword, value in mutations:
        if kind == "delete":
            if keyword in ds:
                del ds[keyword]
            continue
        vr = "US" if kind == "us" else "CS" if kind == "code" else _TEXT_TAGS[keyword]
        _raw(ds, keyword, vr, value + (b" " if len(value) % 2 else b""))
    data = bytearray(_bytes(ds))
    old = str(ds.file_meta.TransferSyntaxUID).encode()
    if syntax is not None and len(syntax) <= len(old) + (len(old) % 2):
        at = data.find(old)
        data[at: at + len(syntax)] = syntax
        data[at + len(syntax): at + len(old) + len(old) % 2] = bytes(len(old) + len(old) % 2 - len(syntax))
    header_end = data.find(b"\xe0\x7f\x10\x00")  # bytes before Pixel Data
    for position, byte in flips:
        data[132 + position % (header_end - 132)] = byte
    return bytes(data)


@pytest.fixture(scope="module")
def seeds(dcm_dir, samples) -> dict[str, bytes]:
    jpeg = next(samples.glob("*.jpg")).read_bytes()
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(buf, format="PNG")
    return {"RG1_UNCR.dcm": (dcm_dir / "RG1_UNCR.dcm").read_bytes(), "MR2_J2KR.dcm": (dcm_dir / "MR2_J2KR.dcm").read_bytes(),
            "jpeg": jpeg, "png": buf.getvalue()}


_FAST = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
@_FAST
@given(name=st.sampled_from(["RG1_UNCR.dcm", "MR2_J2KR.dcm"]), mutations=st.lists(_mutation, min_size=1, max_size=3),
       syntax=st.none() | st.sampled_from(_SYNTAXES),
       flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3))
def test_mutated_dicom_headers_give_input_errors_within_memory(worker, seeds, name, mutations, syntax, flips):
    reply = worker.decode(_mutate_dicom(seeds[name], mutations, syntax, flips))
    assert _safe(reply), reply


@pytest.mark.slow
@_FAST
@given(name=st.sampled_from(["jpeg", "png"]), size=st.none() | st.tuples(st.integers(0, 65535), st.integers(0, 65535)),
       flips=st.lists(st.tuples(st.integers(0, 600), st.integers(0, 255)), max_size=4),
       cut=st.none() | st.integers(0, 4000))
def test_mutated_raster_headers_give_input_errors_within_memory(worker, seeds, name, size, flips, cut):
    data = bytearray(seeds[name])
    if size is not None:  # the declared size: JPEG SOF0 height/width, PNG IHDR width/height
        at = data.find(b"\xff\xc0") + 5 if name == "jpeg" else 16
        data[at: at + (4 if name == "jpeg" else 8)] = (struct.pack(">HH", *size) if name == "jpeg"
                                                       else struct.pack(">II", *size))
    for position, byte in flips:
        data[position % len(data)] = byte
    if cut is not None:
        data = data[: max(cut, 8)]
    reply = worker.decode(bytes(data))
    assert _safe(reply), reply


# ---------------------------------------------------------------------------------------------
# The same corpus through the real service: 4xx (or a flagged 200), never a 5xx, bounded memory


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_service_answers_the_hostile_corpus_with_4xx_in_bounded_memory(bombs, dcm_dir, samples, tmp_path):
    import httpx

    from servers import Server

    srv = Server(tmp_path, ["--model", "imagenet-effnet-lite0"])
    try:
        url, ctype = srv.url + "/embed", {"content-type": "application/octet-stream"}
        normal = [(dcm_dir / "RG1_UNCR.dcm").read_bytes()] + [p.read_bytes() for p in sorted(samples.glob("*.jpg"))]
        for data in normal:
            kind = "application/dicom" if data[128:132] == b"DICM" else "image/jpeg"
            assert httpx.post(url, content=data, headers={"content-type": kind}, timeout=120).status_code == 200
        baseline = _peak_rss_mib(srv.proc.pid)
        for name, data in bombs.items():
            kind = "image/png" if name.startswith("png") else "image/jpeg" if name.startswith("jpeg") else "application/dicom"
            r = httpx.post(url, content=data, headers={"content-type": kind}, timeout=120)
            assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large", (name, r.text[:300])
        for name, data in _variants(dcm_dir).items():
            r = httpx.post(url, content=data, headers={"content-type": "application/dicom"}, timeout=120)
            assert r.status_code < 500, (name, r.status_code, r.text[:300])
            if r.status_code == 200:  # decoded: finite numbers only, and flagged where a value was ignored
                result = r.json()["results"][0]
                assert np.isfinite(result["embedding"]).all(), name
                assert name != "broken_WindowWidth" or result["findings"]["reliable"] is False
            assert b"PHIMARKER" not in r.content and b"19010101" not in r.content, name
        peak = _peak_rss_mib(srv.proc.pid)
        print(f"service peak RSS: {baseline:.0f} MiB after normal traffic, {peak:.0f} MiB after the bombs")
        assert peak - baseline < 1024, (baseline, peak)
        assert httpx.post(url, content=b"not an image", headers=ctype, timeout=30).status_code == 415
    finally:
        srv.stop()
    log = srv.log_path.read_text()
    assert "PHIMARKER" not in log and "19010101" not in log
