"""DICOM decoding: modality LUT, VOI LUT / window, MONOCHROME1, bit depth, compressed syntaxes."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from .errors import (
    MultiFrameImage,
    NoPixelData,
    NotAnImage,
    TruncatedImage,
    UnsupportedImage,
)
from .image import DecodedImage, ImageInfo, rgb_to_grey

# Tags that may identify a patient: never copied into findings, logs or stores.
_GREY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR"}


def looks_like_dicom(data: bytes) -> bool:
    return len(data) >= 132 and data[128:132] == b"DICM"


def _first(value: Any) -> float | None:
    """Window centre/width may be multi-valued: the first one is the default presentation."""
    if value is None or value == "":
        return None
    if isinstance(value, (pydicom.multival.MultiValue, list, tuple)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    value = str(value).strip()
    return value or None


def read_dicom(data: bytes) -> DecodedImage:
    """Decode one DICOM file given as bytes into a grey float image in [0, 1]."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data), force=not looks_like_dicom(data))
        for w in caught:
            if "end of file" in str(w.message).lower():
                raise TruncatedImage(f"DICOM file is truncated: {w.message}")
    except InvalidDicomError as exc:
        raise NotAnImage(f"not a DICOM file: {exc}") from exc
    except TruncatedImage:
        raise
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError) as exc:
        raise TruncatedImage(f"DICOM file is truncated or malformed: {exc}") from exc
    except Exception as exc:  # pydicom raises many kinds on malformed data elements
        raise TruncatedImage(f"DICOM file is malformed: {type(exc).__name__}: {exc}") from exc

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if "Rows" in ds:
            raise TruncatedImage("DICOM declares an image (Rows/Columns) but holds no pixel data: truncated file?")
        modality = _text(ds, "Modality") or "unknown modality"
        raise NoPixelData(f"DICOM has no pixel data (modality {modality}, SOP class {_text(ds, 'SOPClassUID')})")

    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise MultiFrameImage(f"multi-frame DICOM ({frames} frames): send one radiograph per file")

    photometric = (_text(ds, "PhotometricInterpretation") or "").upper()
    transfer = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    info = ImageInfo(
        source_format="dicom",
        modality=_text(ds, "Modality"),
        view_position=(_text(ds, "ViewPosition") or None),
        body_part=_text(ds, "BodyPartExamined"),
        photometric_interpretation=photometric or None,
        original_size=(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)),
        bits_stored=int(ds.get("BitsStored", 0) or 0) or None,
        transfer_syntax=transfer.name if transfer is not None else None,
        laterality=_text(ds, "ImageLaterality") or _text(ds, "Laterality"),
    )

    try:
        arr = _native_pixels(ds)
        if arr is None:
            arr = ds.pixel_array
    except (ValueError, EOFError, OSError, IndexError) as exc:
        text = str(exc)
        if "plugin" in text.lower() or "decod" in text.lower() and "available" in text.lower():
            raise UnsupportedImage(f"cannot decode transfer syntax {info.transfer_syntax}: {text}") from exc
        raise TruncatedImage(f"DICOM pixel data is truncated or corrupt: {text}") from exc
    except NotImplementedError as exc:
        raise UnsupportedImage(f"cannot decode transfer syntax {info.transfer_syntax}: {exc}") from exc
    except Exception as exc:
        raise TruncatedImage(f"DICOM pixel data could not be decoded: {type(exc).__name__}: {exc}") from exc

    if photometric in _GREY:
        if arr.ndim != 2:
            raise MultiFrameImage(f"expected one grey frame, got pixel array of shape {arr.shape}")
        grey = _grey_pipeline(ds, arr, info)
    elif photometric in _COLOUR:
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise MultiFrameImage(f"expected one colour frame, got pixel array of shape {arr.shape}")
        top = float(np.iinfo(arr.dtype).max) if np.issubdtype(arr.dtype, np.integer) else float(arr.max() or 1)
        grey = rgb_to_grey(arr.astype(np.float32) / top)
        info.warnings.append(f"colour image ({photometric}) converted to grey")
    else:
        raise UnsupportedImage(f"unsupported PhotometricInterpretation {photometric or '(missing)'}")
    return DecodedImage(pixels=grey, info=info)


_NATIVE_LE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}  # implicit / explicit VR little endian


def _native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Zero-copy view of uncompressed little-endian single-frame grey pixel data, or None.

    pydicom's general decoder copies and validates; for the common uncompressed radiograph the
    array is just the bytes, so read them directly (and mask bits above BitsStored, as pydicom does).
    """
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if str(tsyntax) not in _NATIVE_LE or "PixelData" not in ds:
        return None
    if ds.get("SamplesPerPixel", 1) != 1 or ds.get("PixelRepresentation", 0) != 0:
        return None
    bits_alloc, bits_stored = int(ds.get("BitsAllocated", 0) or 0), int(ds.get("BitsStored", 0) or 0)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
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


def _grey_pipeline(ds: pydicom.Dataset, arr: np.ndarray, info: ImageInfo) -> np.ndarray:
    """Map stored values to grey through a lookup table built over the stored range.

    Integer pixel data takes few distinct values (at most 2**BitsStored), so the whole chain is
    computed once per value and gathered: one pass over the pixels instead of several.
    """
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if hi - lo <= (1 << 20):
            domain = np.arange(lo, hi + 1, dtype=np.int64).astype(arr.dtype)
            table = _grey_values(ds, domain, info)
            if lo == 0 and not np.issubdtype(arr.dtype, np.signedinteger):
                return table[arr]
            return table[np.subtract(arr, lo, dtype=np.int32)]
    return _grey_values(ds, arr, info)


def _grey_values(ds: pydicom.Dataset, values: np.ndarray, info: ImageInfo) -> np.ndarray:
    """Modality LUT, then the first VOI window (or VOI LUT), then stretch and MONOCHROME1 inversion."""
    values = apply_modality_lut(values, ds)
    centre = _first(ds.get("WindowCenter"))
    width = _first(ds.get("WindowWidth"))
    if "VOILUTSequence" in ds and centre is None:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        info.window = "voi_lut"
    values = values.astype(np.float32, copy=False)
    if info.window == "voi_lut":
        lo, hi = float(values.min()), float(values.max())
    elif centre is not None and width is not None and width >= 1:
        # DICOM PS3.3 C.11.2.1.2.1 linear window, mapped onto [0, 1]
        lo = centre - 0.5 - (width - 1) / 2
        hi = centre - 0.5 + (width - 1) / 2
        info.window = f"{centre:g}/{width:g}"
    else:
        # No presentation given: stretch the stored range, as the JPEG exports of radiographs do.
        lo, hi = float(values.min()), float(values.max())
        info.window = "min_max"
    if hi <= lo:
        info.warnings.append("image has a single grey level")
        grey = np.zeros_like(values, dtype=np.float32)
    else:
        grey = np.clip((values - lo) * (1.0 / (hi - lo)), 0.0, 1.0).astype(np.float32, copy=False)
    if info.photometric_interpretation == "MONOCHROME1":
        grey = 1.0 - grey
    return grey
