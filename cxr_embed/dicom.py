"""DICOM decoding: the PS3.3 C.11 grey-level chain, colour, compressed syntaxes, hostile headers.

The grey chain is a sequence of small pure steps, each one section of DICOM PS3.3:

    stored values -> modality LUT (C.11.1) -> VOI: LUT (C.11.2.1.1) or window with its function
    (C.11.2.1.2, C.11.2.1.3) -> photometric interpretation (C.7.6.3.1.2) -> output range [0, 1]

Header values are read and checked before a pixel is decoded: the declared size against a limit,
non-finite rescale values, bit depths out of range. Messages, warnings and log lines never carry
the value of an identifying attribute (patient, study, visit, institution, physicians).
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import logging
import math
import re
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import pydicom.pixels  # noqa: F401  (imports pydicom's pixel loggers, filtered below)
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag
from pydicom.filereader import read_dataset, read_preamble
from pydicom.pixels import apply_color_lut
from pydicom.pixels.utils import _get_jpg_parameters  # pydicom's own JPEG/JPEG-LS header parser

from .errors import (
    ImageTooLarge,
    InputError,
    InvalidPixelTransform,
    MultiFrameImage,
    NoPixelData,
    NotAnImage,
    TruncatedImage,
    UndecodableImage,
    UnsupportedImage,
)
from .image import MAX_PIXELS, DecodedImage, ImageInfo, check_declared_size, check_finite, rgb_to_grey
from .threads import WARNINGS_LOCK

LOG = logging.getLogger(__name__)

_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"}
_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_DEFLATED = "1.2.840.10008.1.2.1.99"
_J2K = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201",
        "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}
_JPEG = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
         "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"}


def looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def inflate_bound(max_pixels: int) -> int:
    """Most bytes a deflated dataset may inflate to: 4 bytes per allowed pixel value, plus 16 MiB of header."""
    return 4 * int(max_pixels) + (16 << 20)


# --------------------------------------------------------------------------------------------------
# Identifying values: kept out of every message, warning and log line

# Patient (0010), study/requesting (0032), visit (0038), procedure step (0040) groups, and these:
_IDENTIFYING_GROUPS = {0x0010, 0x0032, 0x0038, 0x0040}
_IDENTIFYING_KEYWORDS = {
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
    "ReferringPhysicianName", "ReferringPhysicianAddress", "PerformingPhysicianName",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "OperatorsName", "StationName",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "StudyTime", "SeriesTime",
    "AcquisitionTime", "ContentTime", "AcquisitionDateTime", "InstanceCreationDate",
    "InstanceCreationTime", "StudyID", "StudyDescription", "SeriesDescription", "DeviceSerialNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "ImageComments", "RequestingPhysician", "AdmittingDiagnosesDescription",
}
_QUOTED = re.compile(r"""b?'[^']*'|b?"[^"]*\"""")
_PRINTABLE_RUN = re.compile(rb"[\x20-\x7e]{3,}")


def identifying_values(ds: Dataset) -> list[str]:
    """Text of every identifying element (and of everything inside an identifying sequence), longest first.

    Raw bytes are read without converting them, so reading them cannot itself warn.
    """
    found: set[str] = set()

    def walk(dataset: Dataset, inside: bool) -> None:
        for tag in list(dataset.keys()):
            try:
                elem = dataset.get_item(tag)
            except Exception:  # a deferred or broken element: nothing we can read
                continue
            keyword = pydicom.datadict.keyword_for_tag(tag)
            identifying = inside or tag.group in _IDENTIFYING_GROUPS or tag.is_private or keyword in _IDENTIFYING_KEYWORDS
            value = elem.value
            if isinstance(value, pydicom.Sequence) or (isinstance(value, list) and value and isinstance(value[0], Dataset)):
                for item in value:
                    walk(item, identifying)
            elif identifying and value is not None:
                raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
                for run in _PRINTABLE_RUN.findall(raw):
                    text = run.decode("ascii").strip()
                    found.add(text)
                    found.update(p for p in re.split(r"[\^\\=\s]+", text) if len(p) >= 3)
        return None

    walk(ds, False)
    return sorted((t for t in found if len(t) >= 3), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """`text` with identifying values and anything quoted (how pydicom shows a value) removed."""
    for secret in secrets:
        text = text.replace(secret, "<redacted>")
    return _QUOTED.sub("<redacted>", text)


_STASH: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("cxr_embed_pydicom_stash", default=None)


class _StashPydicomRecords(logging.Filter):
    """While we decode (in this thread/context), pydicom's log records are held back, to be logged scrubbed."""

    def filter(self, record: logging.LogRecord) -> bool:
        stash = _STASH.get()
        if stash is None:
            return True
        try:
            stash.append(record.getMessage())
        except Exception:
            stash.append(str(record.msg))
        return False


_STASH_FILTER = _StashPydicomRecords()
for _name in ["pydicom", *(n for n in list(logging.root.manager.loggerDict) if n.startswith("pydicom."))]:
    logging.getLogger(_name).addFilter(_STASH_FILTER)


@contextlib.contextmanager
def _header_phase(caught: list[str]) -> Iterator[list]:
    """Catch pydicom's warnings (yielded, and added to `caught`) while the header is parsed and read."""
    with WARNINGS_LOCK, warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        try:
            yield records
        finally:
            caught.extend(str(w.message) for w in records)


def _log_scrubbed(messages: list[str], secrets: list[str], logger: logging.Logger = LOG) -> None:
    for message in dict.fromkeys(messages):  # pydicom both logs and warns the same text
        logger.debug("pydicom: %s", scrub(message, secrets))


@contextlib.contextmanager
def pydicom_warnings_logged(logger: logging.Logger = LOG) -> Iterator[None]:
    """pydicom's warnings within the block (they quote element values, UIDs included): caught as
    while a header is read here, not printed, and logged at DEBUG to `logger` with anything quoted
    left out (`scrub`). For callers that read a header with pydicom themselves (the DICOM listener)."""
    caught: list[str] = []
    with _header_phase(caught):
        yield
    _log_scrubbed(caught, [], logger)


# --------------------------------------------------------------------------------------------------
# Reading the file


def read_dicom(data: bytes, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode one DICOM file given as bytes into a grey float image in [0, 1].

    Multi-frame objects are refused (MultiFrameImage): a radiograph is one frame, and a clip or a
    tomosynthesis stack has no single picture to embed. Single-frame enhanced objects (DX/CR/MR with
    functional groups) are read, with their rescale and window taken from the functional groups.
    """
    stash: list[str] = []
    caught: list[str] = []
    secrets: list[str] = []
    token = _STASH.set(stash)
    try:
        with _header_phase(caught) as records:
            ds = _parse(data, max_pixels)
            secrets = identifying_values(ds)
            if any("end of file" in m.lower() for m in [*(str(w.message) for w in records), *stash]):
                raise TruncatedImage("DICOM file is truncated: it ends inside a data element")
            info, attrs = _check_header(ds, max_pixels)
            pixels = pixel_dataset(ds)
        arr = _decode_pixels(pixels, info, max_pixels, secrets)
        grey = _to_grey(pixels, arr, attrs, info)
        return DecodedImage(pixels=check_finite(grey, "DICOM"), info=info)
    finally:
        _STASH.reset(token)
        _log_scrubbed(caught + stash, secrets)


def _parse(data: bytes, max_pixels: int) -> Dataset:
    """Parse the whole dataset (pixel data stays encoded), inflating a deflated one within a bound."""
    try:
        if looks_like_dicom(data) and _DEFLATED.encode() in data[132:4096]:
            return _read_deflated(data, inflate_bound(max_pixels))
        native = _read_native(data) if looks_like_dicom(data) else None
        return native if native is not None else pydicom.dcmread(io.BytesIO(data), force=not looks_like_dicom(data))
    except InvalidDicomError as exc:
        raise NotAnImage("not a DICOM file (no DICOM header found)") from exc
    except InputError:
        raise
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError,
            IndexError, OverflowError, RecursionError, MemoryError, zlib.error) as exc:
        # pydicom's text can quote element values: only the kind of failure is reported, and the
        # exception is not chained (a logged traceback would show its text)
        raise TruncatedImage(f"DICOM file is truncated or malformed ({type(exc).__name__} while parsing)") from None
    except Exception as exc:  # pydicom raises many kinds on malformed data elements
        raise TruncatedImage(f"DICOM file is malformed ({type(exc).__name__} while parsing)") from None


def _read_native(data: bytes) -> Dataset | None:
    """Explicit VR little endian with its pixel data in one element of defined length that fits the file:
    the header parsed by pydicom up to the pixel data, which is then a view of `data`, not a copy (a
    radiograph's 7 MB were copied while this module's warning lock was held: decoding threads waited
    on each other), and what follows it parsed by pydicom. None for anything else (then pydicom reads
    the whole file as before)."""
    if _EXPLICIT_LE.encode() not in data[132:4096]:  # other transfer syntaxes: no header parse before the whole read
        return None
    fp = io.BytesIO(data)
    ds = pydicom.dcmread(fp, stop_before_pixels=True)
    pos = fp.tell()
    if str(ds.file_meta.get("TransferSyntaxUID", "")) != _EXPLICIT_LE or len(data) < pos + 12:
        return None
    group, element, vr = *struct.unpack_from("<HH", data, pos), bytes(data[pos + 4 : pos + 6])
    length = struct.unpack_from("<L", data, pos + 8)[0]
    start = pos + 12
    if (group, element) != (0x7FE0, 0x0010) or vr not in (b"OB", b"OW") or start + length > len(data):
        return None  # undefined length (encapsulated) is 0xFFFFFFFF: never fits
    try:
        tail = read_dataset(io.BytesIO(data[start + length :]), is_implicit_VR=False, is_little_endian=True)
    except Exception:  # what follows does not parse: pydicom's whole read says how, as before
        return None
    if _any_implicit(ds) or _any_implicit(tail):
        return None  # pydicom switched to implicit VR somewhere: its whole read decides element by element
    ds[0x7FE00010] = RawDataElement(Tag(0x7FE00010), vr.decode(), length, memoryview(data)[start : start + length],
                                    start, False, True)
    ds.update(tail)
    return ds


def _any_implicit(ds: Dataset) -> bool:
    """Whether pydicom read any top-level element of `ds` as implicit VR (its raw elements say so)."""
    return any(getattr(elem, "is_implicit_VR", False) for _, elem in ds.items())


def _read_deflated(data: bytes, bound: int) -> Dataset:
    """Deflated Explicit VR Little Endian (PS3.5 A.5): inflate at most `bound` bytes, then parse.

    pydicom inflates the whole stream at once, so a 1 MB file could become gigabytes in memory.
    """
    fp = io.BytesIO(data)
    preamble = read_preamble(fp, False)
    meta = pydicom.filereader._read_file_meta_info(fp)
    if str(meta.get("TransferSyntaxUID", "")) != _DEFLATED:
        return pydicom.dcmread(io.BytesIO(data))
    deflated = memoryview(data)[fp.tell():]
    if inflated_size(deflated, bound) > bound:
        raise ImageTooLarge(
            f"deflated DICOM inflates to more than {bound:,} bytes (the bound for max_pixels); "
            "pass load_image(..., max_pixels=N) to raise it"
        )
    ds = read_dataset(io.BytesIO(zlib.decompress(deflated, -zlib.MAX_WBITS)), is_implicit_VR=False, is_little_endian=True)
    return FileDataset(None, ds, preamble=preamble, file_meta=meta, is_implicit_VR=False, is_little_endian=True)


def inflated_size(deflated: bytes | memoryview, bound: int, chunk: int = 1 << 24) -> int:
    """Bytes a raw deflate stream inflates to, counted in 16 MiB chunks and stopping past `bound`."""
    inflater, total, pending = zlib.decompressobj(-zlib.MAX_WBITS), 0, bytes(deflated)
    while pending and total <= bound and not inflater.eof:
        total += len(inflater.decompress(pending, chunk))
        pending = inflater.unconsumed_tail
    return total


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """An element's value, or `default` when it is absent or cannot be converted (a hostile header)."""
    try:
        value = ds[keyword].value if keyword in ds else default
    except Exception:
        return default
    return default if value is None or value == "" else value


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = _get(ds, keyword, default)
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        return default


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def _numbers(ds: Dataset, keyword: str) -> list[float] | None:
    """The values of a DS/FD element as floats (NaN for text that is not a number), or None if absent."""
    if keyword not in ds:
        return None
    try:
        value = ds[keyword].value
    except Exception:
        return [math.nan]  # present but not a number pydicom can read
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError, OverflowError):
            out.append(math.nan)
    return out or None


def _check_header(ds: Dataset, max_pixels: int) -> tuple[ImageInfo, Dataset]:
    """Everything read from the header before a pixel is decoded: findings, frame attributes, limits."""
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "Rows" in ds:
            raise TruncatedImage("DICOM declares an image (Rows/Columns) but holds no pixel data: truncated file?")
        modality = _text(ds, "Modality") or "unknown modality"
        raise NoPixelData(f"DICOM has no pixel data (modality {modality}, SOP class {_text(ds, 'SOPClassUID')})")

    frames = _int(ds, "NumberOfFrames", 1) or 1
    if frames > 1:
        raise MultiFrameImage(f"multi-frame DICOM ({frames} frames): send one radiograph per file")
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    samples = _int(ds, "SamplesPerPixel", 1)
    check_declared_size(rows, cols, max_pixels, "DICOM", frames=frames, samples=samples)
    _check_pixel_module(ds, rows, cols, samples)

    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    transfer = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    info = ImageInfo(
        source_format="dicom",
        modality=_text(ds, "Modality"),
        view_position=_text(ds, "ViewPosition"),
        body_part=_text(ds, "BodyPartExamined"),
        photometric_interpretation=photometric or None,
        original_size=(rows, cols),
        bits_stored=_int(ds, "BitsStored", 0) or None,
        transfer_syntax=transfer.name if transfer is not None else None,
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
    )
    if (_text(ds, "PresentationIntentType") or "").upper() == "FOR PROCESSING":
        # PS3.3 C.8.11.1.1.1: raw detector data meant for further processing, not for a reader's eyes
        info.flag_unreliable("DX image 'FOR PROCESSING': raw detector values, not the processed image a reader sees")
    attrs = frame_attributes(ds)
    return info, attrs


def _check_pixel_module(ds: Dataset, rows: int, cols: int, samples: int) -> None:
    """PS3.3 C.7.6.3: values the decoders and the grey chain rely on, checked before decoding."""
    if rows < 1 or cols < 1:
        raise UndecodableImage(f"DICOM declares an image of {cols}x{rows} pixels")
    if samples not in (1, 3):
        raise InvalidPixelTransform(f"SamplesPerPixel is {samples}; 1 (grey) or 3 (colour) expected")
    allocated = _int(ds, "BitsAllocated", 0)
    if "PixelData" in ds and allocated not in (1, 8, 16, 32, 64):
        raise InvalidPixelTransform(f"BitsAllocated is {allocated}; 1, 8, 16, 32 or 64 expected")
    stored = _int(ds, "BitsStored", allocated)
    if "PixelData" in ds and not 1 <= stored <= allocated:
        raise InvalidPixelTransform(f"BitsStored is {stored}, outside 1..BitsAllocated ({allocated})")
    if _int(ds, "PixelRepresentation", 0) not in (0, 1):
        raise InvalidPixelTransform("PixelRepresentation is neither 0 (unsigned) nor 1 (signed)")


# Attributes of the grey chain that an enhanced object keeps in its functional groups (PS3.3 C.7.6.16)
_FRAME_MACROS = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_CHAIN_KEYWORDS = (
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "WindowCenter", "WindowWidth",
    "VOILUTFunction", "WindowCenterWidthExplanation", "VOILUTSequence", "PixelRepresentation", "BitsStored",
    "PhotometricInterpretation",
)


def frame_attributes(ds: Dataset) -> Dataset:
    """The first frame's grey-chain attributes: top level, then shared, then per-frame functional groups.

    PS3.3 C.7.6.16.2.9 (Pixel Value Transformation) and C.7.6.16.2.10 (Frame VOI LUT): in enhanced
    objects the rescale and window sit in these macros; a per-frame value overrides a shared one.
    """
    flat = Dataset()
    for keyword in _CHAIN_KEYWORDS:
        if keyword in ds:
            with contextlib.suppress(Exception):
                flat[keyword] = ds[keyword]
    for groups_keyword in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        groups = _get(ds, groups_keyword)
        if not groups:
            continue
        for macro in _FRAME_MACROS:
            items = _get(groups[0], macro)
            if items:
                for keyword in _CHAIN_KEYWORDS:
                    if keyword in items[0]:
                        with contextlib.suppress(Exception):
                            flat[keyword] = items[0][keyword]
    return flat


_PIXEL_KEYWORDS = (
    "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
    "PixelRepresentation", "PlanarConfiguration", "NumberOfFrames", "PixelData", "FloatPixelData",
    "DoubleFloatPixelData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    *(f"{c}PaletteColorLookupTable{part}" for c in ("Red", "Green", "Blue", "Alpha") for part in ("Descriptor", "Data")),
    *(f"Segmented{c}PaletteColorLookupTableData" for c in ("Red", "Green", "Blue", "Alpha")),
)


def pixel_dataset(ds: Dataset) -> Dataset:
    """The Image Pixel module (PS3.3 C.7.6.3) alone, values converted now: what the decoders may read.

    pydicom's decoders read the dataset lazily; given the whole file they can convert (and warn about,
    quoting it) any element, such as an unknown SpecificCharacterSet. Given only this, they cannot.
    """
    pixels = Dataset()
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            with contextlib.suppress(Exception):
                pixels[keyword] = ds[keyword]
    pixels.file_meta = ds.file_meta if hasattr(ds, "file_meta") else pydicom.dataset.FileMetaDataset()
    encoding = getattr(ds, "original_encoding", None)
    if encoding and encoding[0] is not None:
        pixels.set_original_encoding(encoding[0], encoding[1], "iso8859")
    return pixels


def _little_endian(ds: Dataset) -> bool:
    """Byte order of OW lookup-table data: the transfer syntax's, else the order the file was read in."""
    transfer = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if transfer is not None and str(transfer) == "1.2.840.10008.1.2.2":
        return False
    return bool(getattr(ds, "original_encoding", (None, True))[1] in (True, None))


# --------------------------------------------------------------------------------------------------
# Pixel decoding


def _decode_pixels(ds: Dataset, info: ImageInfo, max_pixels: int, secrets: list[str]) -> np.ndarray:
    """Stored values as an array: the native fast path, else pydicom's decoders; failures typed."""
    transfer = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if transfer in _J2K or transfer in _JPEG:
        _check_codestream_size(ds, transfer, max_pixels)
    try:
        arr = _native_pixels(ds)
        if arr is None:
            arr = ds.pixel_array
    except InputError:
        raise
    except NotImplementedError as exc:
        raise UnsupportedImage(f"cannot decode transfer syntax {info.transfer_syntax}: {scrub(str(exc), secrets)}") from exc
    except MemoryError as exc:
        raise ImageTooLarge("decoding the pixel data ran out of memory") from exc
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes a typed InputError
        raise _decoder_error(exc, info, secrets) from exc
    return arr


_TRUNCATION_WORDS = ("truncat", "end of", "too short", "less than expected", "insufficient",
                     "doesn't match the expected length", "does not match the expected length")


def _decoder_error(exc: Exception, info: ImageInfo, secrets: list[str]) -> InputError:
    """A decoder's exception as a typed error: missing plugin, missing data, or a codestream it rejects."""
    text = scrub(str(exc), secrets)
    lower = text.lower()
    if "missing dependencies" in lower or "no plugin" in lower:  # pydicom: no decoder installed for it
        return UnsupportedImage(f"cannot decode transfer syntax {info.transfer_syntax}: {text}")
    if isinstance(exc, (EOFError, IndexError)) or any(w in lower for w in _TRUNCATION_WORDS):
        return TruncatedImage(f"DICOM pixel data is truncated: {type(exc).__name__}: {text}")
    return UndecodableImage(f"DICOM pixel data could not be decoded ({info.transfer_syntax}): {type(exc).__name__}: {text}")


def codestream_size(fragment: bytes, transfer: str) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG/JPEG-LS/JPEG 2000 codestream declares, or None if unreadable."""
    if transfer in _J2K:
        offset = 0
        if fragment.startswith(b"\x00\x00\x00\x0cjP  "):  # JP2 boxes: find the jp2c codestream box
            offset = 12
            while offset + 8 <= len(fragment) and fragment[offset + 4: offset + 8] != b"jp2c":
                length = int.from_bytes(fragment[offset: offset + 4], "big")
                if length < 8:
                    return None
                offset += length
            offset += 8
        siz = fragment[offset: offset + 42]
        if len(siz) < 42 or siz[:4] != b"\xff\x4f\xff\x51":  # SOC then SIZ (ISO 15444-1 A.5.1)
            return None
        x, y, x0, y0 = (int.from_bytes(siz[i: i + 4], "big") for i in (8, 12, 16, 20))
        if x <= x0 or y <= y0:  # an image area of no size: garbage, not a bomb
            return None
        return y - y0, x - x0, int.from_bytes(siz[40:42], "big")
    params = _get_jpg_parameters(fragment)
    if "height" not in params or "width" not in params:
        return None
    return int(params["height"]), int(params["width"]), int(params.get("components", 1))


def _check_codestream_size(ds: Dataset, transfer: str, max_pixels: int) -> None:
    """A compressed frame is decoded at the size its codestream declares, whatever the header says."""
    from pydicom.encaps import generate_fragments

    try:
        fragments = generate_fragments(ds.PixelData)
        next(fragments, b"")  # the Basic Offset Table item (PS3.5 A.4)
        fragment = next(fragments, b"")
    except Exception as exc:
        raise TruncatedImage(f"encapsulated pixel data is malformed ({type(exc).__name__})") from exc
    size = codestream_size(bytes(fragment), transfer)
    if size is None:
        raise UndecodableImage("cannot read the image size from the compressed pixel data's header")
    rows, cols, comps = size
    check_declared_size(rows, cols, max_pixels, "compressed pixel data", samples=comps)
    if (rows, cols) != (_int(ds, "Rows", 0), _int(ds, "Columns", 0)):
        raise UndecodableImage(
            f"compressed pixel data is {cols}x{rows} but the DICOM header declares "
            f"{_int(ds, 'Columns', 0)}x{_int(ds, 'Rows', 0)}"
        )


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """Zero-copy view of uncompressed little-endian single-frame grey pixel data, or None.

    pydicom's general decoder copies and validates; for the common uncompressed radiograph the
    array is just the bytes, so read them directly (and mask bits above BitsStored, as pydicom does).
    """
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if str(tsyntax) not in _NATIVE_LE or "PixelData" not in ds:
        return None
    if _int(ds, "SamplesPerPixel", 1) != 1 or _int(ds, "PixelRepresentation", 0) != 0:
        return None
    bits_alloc, bits_stored = _int(ds, "BitsAllocated", 0), _int(ds, "BitsStored", 0)
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    dtype = {8: np.uint8, 16: np.dtype("<u2")}.get(bits_alloc)
    if dtype is None or not rows or not cols or not 0 < bits_stored <= bits_alloc:
        return None
    raw = ds.PixelData
    need = rows * cols * np.dtype(dtype).itemsize
    if len(raw) < need:
        raise TruncatedImage(f"pixel data holds {len(raw)} bytes, {rows}x{cols}x{bits_alloc} bits need {need}")
    arr = np.frombuffer(raw, dtype=dtype, count=rows * cols).reshape(rows, cols)
    if bits_stored < bits_alloc:
        arr = arr & np.asarray((1 << bits_stored) - 1, dtype=arr.dtype)
    return arr


def _to_grey(ds: Dataset, arr: np.ndarray, attrs: Dataset, info: ImageInfo) -> np.ndarray:
    photometric = info.photometric_interpretation or ""
    if photometric in _GREY:
        if arr.ndim != 2:
            raise MultiFrameImage(f"expected one grey frame, got pixel array of shape {arr.shape}")
        return grey_pipeline(arr, attrs, info, _little_endian(ds))
    if photometric in _COLOUR:
        if photometric == "PALETTE COLOR":
            rgb = palette_to_rgb(arr, ds)
        else:
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise MultiFrameImage(f"expected one colour frame, got pixel array of shape {arr.shape}")
            top = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else float(arr.max() or 1)
            rgb = arr.astype(np.float32) / top
        info.warnings.append(f"colour image ({photometric}) converted to grey")
        return rgb_to_grey(rgb)
    raise UnsupportedImage(f"unsupported PhotometricInterpretation {photometric or '(missing)'}")


def palette_to_rgb(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """PS3.3 C.7.6.3.1.5-6: palette indices to RGB in [0, 1], scaled by the palette's declared bit depth.

    The LUT data is read in the file's byte order (pydicom reads non-segmented OW palettes as little
    endian, which turns a big-endian palette almost black).
    """
    if arr.ndim != 2:
        raise MultiFrameImage(f"expected one palette frame, got pixel array of shape {arr.shape}")
    try:
        descriptor = [int(v) for v in ds.RedPaletteColorLookupTableDescriptor]
        entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
    except Exception as exc:
        raise InvalidPixelTransform("RedPaletteColorLookupTableDescriptor is missing or malformed") from exc
    if bits not in (8, 16):
        raise InvalidPixelTransform(f"RedPaletteColorLookupTableDescriptor declares {bits} bits; 8 or 16 expected")
    if "RedPaletteColorLookupTableData" not in ds:  # segmented palettes: pydicom expands them in file order
        rgb = apply_color_lut(arr, ds)[..., :3].astype(np.float32)
        return rgb / float((1 << bits) - 1)
    dtype = np.dtype("<u2" if _little_endian(ds) else ">u2")
    channels = []
    for colour in ("Red", "Green", "Blue"):
        raw = _get(ds, f"{colour}PaletteColorLookupTableData", b"")
        lut = np.frombuffer(raw, dtype=np.uint8) if len(raw) == entries else np.frombuffer(raw, dtype=dtype, count=len(raw) // 2)
        if len(lut) < entries:
            raise InvalidPixelTransform(f"{colour}PaletteColorLookupTableData holds fewer entries than its descriptor")
        channels.append(lut[:entries].astype(np.float32))
    index = np.clip(arr.astype(np.int64) - first, 0, entries - 1)
    return np.stack([c[index] for c in channels], axis=-1) / float((1 << bits) - 1)


# --------------------------------------------------------------------------------------------------
# The grey chain, PS3.3 C.11: each step a pure function


@dataclass(frozen=True)
class Rescale:
    """PS3.3 C.11.1.1.2 linear modality transform: output = slope * stored value + intercept."""

    slope: float
    intercept: float


@dataclass(frozen=True)
class Lut:
    """PS3.3 C.11.1.1.1 / C.11.2.1.1 lookup table: first mapped input value, entries, declared bit depth."""

    first: int
    data: np.ndarray
    bits: int


@dataclass(frozen=True)
class Window:
    """PS3.3 C.11.2.1.2 window centre and width, with its VOI LUT Function (C.11.2.1.3)."""

    centre: float
    width: float
    function: str = "LINEAR"


def read_lut(item: Dataset, little_endian: bool, what: str) -> Lut:
    """A LUT Descriptor + LUT Data item as a Lut; InvalidPixelTransform names what is broken."""
    try:
        descriptor = [int(v) for v in item.LUTDescriptor]
        entries, first, bits = descriptor[0] or 65536, descriptor[1], descriptor[2]
        elem = item["LUTData"]
    except Exception as exc:
        raise InvalidPixelTransform(f"{what} LUTDescriptor or LUTData is missing or malformed") from exc
    if not 1 <= bits <= 16:
        raise InvalidPixelTransform(f"{what} LUTDescriptor declares {bits} bits per entry; 1..16 expected")
    value = elem.value
    if isinstance(value, (bytes, bytearray)):  # OW: 16-bit words in the file's byte order
        data = np.frombuffer(value, dtype="<u2" if little_endian else ">u2", count=len(value) // 2)
    else:
        data = np.asarray(list(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [value], dtype=np.int64)
    if len(data) < entries:
        raise InvalidPixelTransform(f"{what} LUTData holds {len(data)} entries, its LUTDescriptor declares {entries}")
    return Lut(first=first, data=data[:entries].astype(np.int64), bits=bits)


def modality_transform(attrs: Dataset, little_endian: bool) -> Rescale | Lut | None:
    """PS3.3 C.11.1: the Modality LUT Sequence, else rescale slope/intercept, else identity (None).

    A modality transform gives the pixels their meaning (HU, optical density...): if it is broken
    the image cannot be read, so it is refused rather than guessed.
    """
    if _get(attrs, "ModalityLUTSequence"):
        return read_lut(attrs.ModalityLUTSequence[0], little_endian, "ModalityLUTSequence")
    slope, intercept = _numbers(attrs, "RescaleSlope"), _numbers(attrs, "RescaleIntercept")
    for keyword, values in (("RescaleSlope", slope), ("RescaleIntercept", intercept)):
        if values is not None and not math.isfinite(values[0]):
            raise InvalidPixelTransform(f"{keyword} is not a finite number")
    if slope is None or intercept is None:  # as pydicom: both or neither (C.11.1.1.2)
        return None
    return Rescale(slope[0], intercept[0])


def apply_modality(values: np.ndarray, transform: Rescale | Lut | None) -> np.ndarray:
    """PS3.3 C.11.1: stored values to modality values (float64)."""
    if transform is None:
        return values.astype(np.float64)
    if isinstance(transform, Lut):
        return lut_lookup(values, transform).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused by the caller, by name
        return values.astype(np.float64) * transform.slope + transform.intercept


def lut_lookup(values: np.ndarray, lut: Lut) -> np.ndarray:
    """PS3.3 C.11.1.1.1 / C.11.2.1.1: inputs below the first mapped value take the first entry, above the last the last."""
    index = np.clip(np.floor(values).astype(np.int64) - lut.first, 0, len(lut.data) - 1)
    return lut.data[index]


_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


def voi_transform(attrs: Dataset, little_endian: bool, info: ImageInfo) -> Window | Lut | None:
    """PS3.3 C.11.2: the first window if it is usable, else the first VOI LUT, else None (stretch).

    Several windows (or VOI LUTs) are alternative views (C.11.2.1.2): the standard ranks none, so we use
    the first, as pydicom and CXR Foundation do, and say so in the findings. When a window and a VOI LUT
    are both present the window is used (the standard lets the application choose; unchanged since v1).
    A broken window or LUT (NaN, width out of range, short LUT data) is ignored with a warning and the
    image flagged unreliable: the pixels are still fine, only their presentation is lost.
    """
    window = _first_window(attrs, info)
    if window is not None:
        return window
    luts = _get(attrs, "VOILUTSequence")
    if luts:
        if len(luts) > 1:
            info.warnings.append(f"{len(luts)} VOI LUTs; used the first")
        try:
            return read_lut(luts[0], little_endian, "VOILUTSequence")
        except InvalidPixelTransform as exc:
            _ignore(info, f"{exc}: VOI LUT ignored")
    return None


def _ignore(info: ImageInfo, reason: str) -> None:
    info.warnings.append(reason)
    info.flag_unreliable(reason)


def _first_window(attrs: Dataset, info: ImageInfo) -> Window | None:
    centres, widths = _numbers(attrs, "WindowCenter"), _numbers(attrs, "WindowWidth")
    if centres is None or widths is None:
        if centres is not None or widths is not None:
            missing = "WindowWidth" if widths is None else "WindowCenter"
            info.warnings.append(f"window ignored: {missing} is missing")
        return None
    if max(len(centres), len(widths)) > 1:
        info.warnings.append(f"{max(len(centres), len(widths))} windows; used the first")
    centre, width = centres[0], widths[0]
    function = (_text(attrs, "VOILUTFunction") or "LINEAR").upper()
    if function not in _FUNCTIONS:
        _ignore(info, "VOILUTFunction is not LINEAR, LINEAR_EXACT or SIGMOID: LINEAR used")
        function = "LINEAR"
    for keyword, value in (("WindowCenter", centre), ("WindowWidth", width)):
        if not math.isfinite(value):
            _ignore(info, f"{keyword} is not a finite number: window ignored")
            return None
    if width < 1 if function == "LINEAR" else width <= 0:  # C.11.2.1.2.1: LINEAR needs width >= 1, others > 0
        _ignore(info, f"WindowWidth {width:g} is out of range for {function}: window ignored")
        return None
    return Window(centre, width, function)


def apply_window(values: np.ndarray, window: Window) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT), C.11.2.1.3.1 (SIGMOID), onto [0, 1]."""
    x = values.astype(np.float64, copy=False)
    c, w = window.centre, window.width
    if window.function == "SIGMOID":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
    if window.function == "LINEAR":
        c, w = c - 0.5, w - 1.0  # LINEAR's half-pixel offsets; LINEAR_EXACT has none
    if w == 0:  # LINEAR with width 1: a threshold at c - 0.5
        return (x > c).astype(np.float64)
    # equal to the standard's three cases: <= c - w/2 -> 0, > c + w/2 -> 1, linear between
    return np.clip((x - c) / w + 0.5, 0.0, 1.0)


def apply_voi_lut_output(values: np.ndarray, lut: Lut, info: ImageInfo) -> np.ndarray:
    """PS3.3 C.11.2.1.1: VOI LUT output, whose range is 0 .. 2**bits - 1 (LUTDescriptor's third value), onto [0, 1]."""
    top = float((1 << lut.bits) - 1)
    highest = float(lut.data.max()) if len(lut.data) else 0.0
    if highest > top:
        info.warnings.append(f"VOI LUT entries exceed its declared {lut.bits} bits: scaled by its largest entry")
        top = highest
    return lut_lookup(values, lut) / top


def stretch(values: np.ndarray, lo: float, hi: float, info: ImageInfo) -> np.ndarray:
    """No VOI given: map [lo, hi] (the image's modality values) onto [0, 1], as radiograph JPEG exports do."""
    if not hi > lo:
        info.warnings.append("image has a single grey level")
        return np.zeros(values.shape, np.float64)
    return (values - lo) * (1.0 / (hi - lo))


def invert_monochrome1(grey: np.ndarray) -> np.ndarray:
    """PS3.3 C.7.6.3.1.2: MONOCHROME1 shows the minimum value as white; we store 0 = black."""
    return 1.0 - grey


def grey_values(modality_values: np.ndarray, voi: Window | Lut | None, bounds: tuple[float, float],
                monochrome1: bool, info: ImageInfo) -> np.ndarray:
    """VOI (window, LUT or stretch over `bounds`), photometric interpretation, output range [0, 1] (float32)."""
    if isinstance(voi, Window):
        grey = apply_window(modality_values, voi)
        info.window = f"{voi.centre:g}/{voi.width:g}" + ("" if voi.function == "LINEAR" else f" {voi.function}")
    elif isinstance(voi, Lut):
        grey = apply_voi_lut_output(modality_values, voi, info)
        info.window = "voi_lut"
    else:
        grey = stretch(modality_values, *bounds, info)
        info.window = "min_max"
    if monochrome1:
        grey = invert_monochrome1(grey)
    return np.clip(grey, 0.0, 1.0).astype(np.float32)


def _finite_modality(values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all():
        raise InvalidPixelTransform("the modality transform (RescaleSlope/RescaleIntercept) overflows")
    return values


GATHER_STEP = 1 << 16  # pixels per np.take call in `gather`


def gather(table: np.ndarray, index: np.ndarray) -> np.ndarray:
    """np.take(table, index), in steps of GATHER_STEP pixels: numpy casts the indices to int64 first,
    and for a whole radiograph that is a temporary of 8 bytes per pixel (29 MB for 1955 x 1841), made,
    faulted in and read again; a step's cast stays in the cache. The same values as one np.take."""
    out = np.empty(index.shape, dtype=table.dtype)
    flat_index, flat_out = index.reshape(-1), out.reshape(-1)
    for start in range(0, flat_index.size, GATHER_STEP):
        np.take(table, flat_index[start : start + GATHER_STEP], out=flat_out[start : start + GATHER_STEP])
    return out


def grey_pipeline(arr: np.ndarray, attrs: Dataset, info: ImageInfo, little_endian: bool = True) -> np.ndarray:
    """Stored values to grey [0, 1] through the C.11 chain, computed once per stored value and gathered.

    Integer pixel data takes few distinct values (at most 2**BitsStored), so the chain runs over a
    table of the stored range and one gather maps the pixels: one pass instead of several.
    """
    modality = modality_transform(attrs, little_endian)
    voi = voi_transform(attrs, little_endian, info)
    monochrome1 = info.photometric_interpretation == "MONOCHROME1"
    if np.issubdtype(arr.dtype, np.integer) and arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        # a table from 0 lets the stored values index it as they are (no shifted int32 copy)
        start = 0 if 0 <= lo and hi <= (1 << 20) else lo
        if hi - start <= (1 << 20):
            domain = np.arange(start, hi + 1, dtype=np.int64)
            index = arr if start == 0 else np.subtract(arr, start, dtype=np.int32)
            mod = _finite_modality(apply_modality(domain, modality))
            if voi is None and isinstance(modality, Lut):  # a LUT need not be monotonic: bounds of values present
                present = mod[np.bincount(index.ravel(), minlength=len(domain)) > 0]
            else:
                present = mod[lo - start:]  # rescale is monotonic: its extremes over lo..hi
            bounds = (float(present.min()), float(present.max()))
            return gather(grey_values(mod, voi, bounds, monochrome1, info), index)
    if not np.isfinite(arr).all():
        raise InvalidPixelTransform("pixel data holds NaN or infinite values")
    mod = _finite_modality(apply_modality(arr, modality))
    return grey_values(mod, voi, (float(mod.min()), float(mod.max())), monochrome1, info)
