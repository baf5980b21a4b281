"""One entry point from anything a user holds (path, bytes, array, PIL image) to a decoded image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image

from .dicom import looks_like_dicom, read_dicom, scrub
from .errors import EmptyInput, ImageTooLarge, ImageTooSmall, InputError, NotAnImage, UnsupportedImage
from .image import (
    JPEG_MAGIC,
    MAX_PIXELS,
    PNG_MAGIC,
    DecodedImage,
    ImageInfo,
    array_to_grey,
    check_declared_size,
    read_raster,
)

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, Image.Image, DecodedImage]

# The smallest side we accept: below this a picture cannot show a chest at useful detail.
MIN_SIDE = 128


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file; anything else (missing, a folder, a FIFO that would block, a file
    we may not read) is an InputError naming the path."""
    import stat

    p = Path(path)
    try:
        mode = os.stat(p).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, socket or device)"
            raise InputError(f"{p} is {kind}, not an image file")
        return p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"no such file: {p}") from None
    except OSError as exc:
        raise InputError(f"cannot read {p}: {exc.strerror or exc}") from None


def load_image(source: ImageSource, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode `source` into a grey [0, 1] image, refusing what is not a usable radiograph image.

    Files declaring more than `max_pixels` pixel values (rows x columns x frames x samples) are
    refused from their header, before decoding (ImageTooLarge).
    """
    if isinstance(source, DecodedImage):
        decoded = source
    elif isinstance(source, (str, os.PathLike)):
        decoded = decode_bytes(read_bytes(source), max_pixels)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        decoded = decode_bytes(bytes(source), max_pixels)
    elif isinstance(source, Image.Image):
        check_declared_size(source.height, source.width, max_pixels, "PIL image")
        decoded = decode_bytes(_pil_to_png(source), max_pixels)
    elif isinstance(source, np.ndarray):
        if source.ndim >= 2:
            check_declared_size(source.shape[0], source.shape[1], max_pixels, "array")
        grey = array_to_grey(source)
        decoded = DecodedImage(grey, ImageInfo(source_format="array", original_size=grey.shape[:2]))
    else:
        raise InputError(f"cannot read an image from a {type(source).__name__}")
    rows, cols = decoded.pixels.shape
    if min(rows, cols) < min_side:
        raise ImageTooSmall(
            f"image is {cols}x{rows} pixels; a radiograph needs at least {min_side} pixels on its short side"
        )
    return decoded


def decode_bytes(data: bytes, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode DICOM/PNG/JPEG bytes; whatever goes wrong inside a decoder becomes an InputError."""
    try:
        return _decode_bytes(data, max_pixels)
    except InputError:
        raise
    except MemoryError as exc:
        raise ImageTooLarge("decoding the image ran out of memory") from exc
    except Exception as exc:  # a decoder library's own failure on hostile or odd input
        # quoted parts of a library's message may be header values: left out
        raise UnsupportedImage(f"the image could not be decoded: {type(exc).__name__}: {scrub(str(exc), [])}") from exc


def _decode_bytes(data: bytes, max_pixels: int) -> DecodedImage:
    if len(data) == 0:
        raise EmptyInput("empty file (0 bytes)")
    if data.startswith(PNG_MAGIC) or data.startswith(JPEG_MAGIC):
        return read_raster(data, max_pixels)
    if looks_like_dicom(data):
        return read_dicom(data, max_pixels)
    # DICOM files without the 128-byte preamble exist; try them only if they parse as DICOM.
    if len(data) > 8 and data[:2] in (b"\x08\x00", b"\x02\x00"):
        return read_dicom(data, max_pixels)
    raise NotAnImage("not a DICOM, PNG or JPEG file (unrecognised header)")


def _pil_to_png(im: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
