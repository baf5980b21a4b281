"""The decoded-image type shared by every reader, and PNG/JPEG decoding."""

from __future__ import annotations

import io
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import ImageTooLarge, InvalidPixelTransform, NotAnImage, TruncatedImage, UnsupportedImage

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

# The most pixel values (rows x columns x frames x samples) a file may declare: a real radiograph
# is at most ~4300x4300 (18.5 M); beyond this a file is refused before a pixel is decoded, so a few
# compressed kilobytes cannot make us allocate gigabytes (a "decompression bomb").
MAX_PIXELS = 50_000_000


@dataclass
class ImageInfo:
    """What ingestion found: reported alongside the embedding, never a reason to refuse by itself."""

    source_format: str
    modality: str | None = None
    view_position: str | None = None
    body_part: str | None = None
    photometric_interpretation: str | None = None
    original_size: tuple[int, int] = (0, 0)  # rows, columns
    bits_stored: int | None = None
    transfer_syntax: str | None = None
    laterality: str | None = None
    window: str | None = None
    warnings: list[str] = field(default_factory=list)
    # False when the pixels are not what a reader would see (e.g. a DX "FOR PROCESSING" image, a
    # broken window we had to ignore): the image is embedded, but callers should not trust it blindly.
    reliable: bool = True
    unreliable_reasons: list[str] = field(default_factory=list)

    def flag_unreliable(self, reason: str) -> None:
        """Mark the image as embedded but unreliable, saying why."""
        self.reliable = False
        self.unreliable_reasons.append(reason)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["original_size"] = list(self.original_size)
        return d


@dataclass
class DecodedImage:
    """A single grey image, float32 in [0, 1], 0 = black (air on a radiograph), plus findings."""

    pixels: np.ndarray
    info: ImageInfo


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of a float RGB array in [0, 1]."""
    return (rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float32)


def array_to_grey(arr: np.ndarray) -> np.ndarray:
    """Grey float32 [0, 1] from a grey or RGB(A) array of integers or floats."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise UnsupportedImage(f"expected a 2-D grey or RGB array, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.integer):
        info = np.iinfo(arr.dtype)
        if info.min < 0:
            raise UnsupportedImage(f"signed integer arrays ({arr.dtype}) are ambiguous: pass floats in [0, 1]")
        out = arr.astype(np.float32) / float(info.max)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise UnsupportedImage("array holds NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise UnsupportedImage(f"float arrays must be in [0, 1], got [{lo:g}, {hi:g}]")
        out = arr.astype(np.float32)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.float32)
    else:
        raise UnsupportedImage(f"unsupported array dtype {arr.dtype}")
    return rgb_to_grey(out) if out.ndim == 3 else out


def check_declared_size(rows: int, cols: int, max_pixels: int, what: str, frames: int = 1, samples: int = 1) -> None:
    """Refuse an image whose declared size is over `max_pixels` pixel values, before decoding it."""
    total = int(rows) * int(cols) * max(int(frames), 1) * max(int(samples), 1)
    if total > max_pixels:
        detail = f"{cols}x{rows}" + (f"x{frames} frames" if frames > 1 else "") + (f"x{samples} samples" if samples > 1 else "")
        raise ImageTooLarge(
            f"{what} declares {detail} = {total:,} pixel values, over the limit of {max_pixels:,}; "
            "raise it with CXR_EMBED_MAX_PIXELS (serve, listen) or load_image(..., max_pixels=N)"
        )


def check_finite(pixels: np.ndarray, what: str) -> np.ndarray:
    """Last defence: a decoded image never holds NaN or infinity."""
    # min and max propagate NaN and reach +-inf, without the boolean copy np.isfinite(pixels).all() makes
    if pixels.size and not (np.isfinite(pixels.min()) and np.isfinite(pixels.max())):
        raise InvalidPixelTransform(f"decoding the {what} gave non-finite pixel values")
    return pixels


def read_raster(data: bytes, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    """Decode PNG or JPEG bytes (8- or 16-bit, grey or colour) into a grey image.

    The size is checked from the header (Image.open reads no pixels) before `load()`.
    """
    fmt = "png" if data.startswith(PNG_MAGIC) else "jpeg" if data.startswith(JPEG_MAGIC) else None
    if fmt is None:
        raise NotAnImage("not a DICOM, PNG or JPEG file")
    try:
        with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as im:
            check_declared_size(im.height, im.width, max_pixels, fmt.upper())
            im.load()
            mode = im.mode
            if mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16-bit PNGs come as mode I or I;16; their full scale is 65535. In place, in float32:
                # the largest allowed image stays a few hundred MB
                grey = np.asarray(im).astype(np.float32)
                grey *= np.float32(1.0 / 65535.0)
                np.clip(grey, 0.0, 1.0, out=grey)
                bits = 16
            elif mode == "F":
                raise UnsupportedImage("floating-point images are not supported")
            else:
                if mode not in ("L", "RGB"):
                    im = im.convert("RGB" if mode in ("RGBA", "P", "CMYK", "YCbCr", "LA", "PA", "RGBX") else "L")
                arr = np.asarray(im)
                grey = array_to_grey(arr)
                bits = 8
            size = (im.height, im.width)
    except (UnsupportedImage, ImageTooLarge):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(
            f"{fmt.upper()} declares more pixels than Pillow allows (PIL.Image.MAX_IMAGE_PIXELS="
            f"{Image.MAX_IMAGE_PIXELS:,}, refused at twice that)"
        ) from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        # Pillow's text names its stream object, with an address ("<_io.BytesIO object at 0x...>")
        detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(exc)).strip()
        raise TruncatedImage(f"{fmt.upper()} data is truncated or corrupt: {detail or type(exc).__name__}") from exc
    info = ImageInfo(
        source_format=fmt,
        photometric_interpretation="MONOCHROME2" if mode in ("L", "I", "I;16", "I;16B", "I;16L") else mode,
        original_size=size,
        bits_stored=bits,
    )
    if mode not in ("L", "I", "I;16", "I;16B", "I;16L"):
        info.warnings.append(f"colour image ({mode}) converted to grey")
    return DecodedImage(pixels=check_finite(grey, fmt.upper()), info=info)
