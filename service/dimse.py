"""What the DICOM listener answers: which SOP classes and transfer syntaxes it accepts, and which DIMSE
status each error gets (one table, as `errors.py` is for HTTP). No networking here.

Statuses (PS3.4 B.2.3 Storage Service Class, PS3.7 C):
  0x0000 success: embedded, scored and durably stored
  0xA700 refused, out of resources: too large, queue full, shutting down, timed out (send again later)
  0xA900 data set does not match SOP class: UIDs other than the request's, no pixel data, several frames
  0xC000 cannot understand: a readable image we do not embed (too small ...)
  0xC210 cannot understand, undecodable: the data set or its pixel data cannot be decoded
  0x0110 processing failure: the model or the store failed (ours, not the sender's)
Every failure carries an Error Comment (0000,0902): the error's code and message, cut to 64 characters.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder

from cxr_embed.errors import (CxrEmbedError, EmptyInput, NonFiniteEmbedding, ImageTooLarge, ImageTooSmall, InputError, MultiFrameImage,
                              NoPixelData, NotAnImage, TruncatedImage, UndecodableImage, UnsupportedImage)

from .engine import NotReady, QueueFull

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
UNDECODABLE = 0xC210
PROCESSING_FAILURE = 0x0110

# Radiographs only: CR, DX for presentation, DX for processing. Every other storage SOP class (CT, MR,
# mammography, secondary capture ...) is refused at association negotiation (presentation context
# result 3, abstract syntax not supported), before any data is sent.
RADIOGRAPH_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
}
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


class InstanceRefused(CxrEmbedError):
    """An instance the listener will not embed, for a reason found before decoding its pixels."""

    code = "refused"


class SopMismatch(InstanceRefused):
    code = "sop_mismatch"


class InstanceTooLarge(InstanceRefused):
    code = "too_large"


class UnreadableDataset(InstanceRefused):
    code = "undecodable_dataset"


class ShuttingDown(InstanceRefused):
    code = "shutting_down"


class Timeout(InstanceRefused):
    code = "timeout"



# first match wins: subclasses before their bases
STATUS_OF_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (SopMismatch, DOES_NOT_MATCH_SOP_CLASS),
    (NoPixelData, DOES_NOT_MATCH_SOP_CLASS),
    (MultiFrameImage, DOES_NOT_MATCH_SOP_CLASS),
    (InstanceTooLarge, OUT_OF_RESOURCES),
    (ImageTooLarge, OUT_OF_RESOURCES),
    (ShuttingDown, OUT_OF_RESOURCES),
    (Timeout, OUT_OF_RESOURCES),
    (QueueFull, OUT_OF_RESOURCES),
    (NotReady, OUT_OF_RESOURCES),
    (UnreadableDataset, UNDECODABLE),
    (NotAnImage, UNDECODABLE),
    (EmptyInput, UNDECODABLE),
    (TruncatedImage, UNDECODABLE),
    (UnsupportedImage, UNDECODABLE),
    (UndecodableImage, UNDECODABLE),
    (ImageTooSmall, CANNOT_UNDERSTAND),
    (InputError, CANNOT_UNDERSTAND),
)


def status_of(error: BaseException) -> int:
    """The DIMSE status for an error; anything unforeseen is our processing failure."""
    for kind, status in STATUS_OF_ERROR:
        if isinstance(error, kind):
            return status
    return PROCESSING_FAILURE


def reason_of(error: BaseException) -> str:
    """'code: message' as stored with a failure (typed errors name no patient data; others only their type)."""
    if isinstance(error, CxrEmbedError):
        return f"{error.code}: {error}"
    return f"internal_error: {type(error).__name__}"


def status_dataset(status: int, reason: str | None = None) -> Dataset:
    """A C-STORE response status, with the reason as Error Comment (LO: 64 characters at most)."""
    ds = Dataset()
    ds.Status = status
    if status != SUCCESS and reason:
        ds.ErrorComment = reason.replace("\\", "/")[:64]
    return ds


def decodable_transfer_syntaxes() -> list[str]:
    """Transfer syntaxes whose pixel data this installation can decode (pydicom's decoders and plugins)."""
    from pynetdicom import ALL_TRANSFER_SYNTAXES

    found = []
    for uid in ALL_TRANSFER_SYNTAXES:
        try:
            if get_decoder(uid).is_available:
                found.append(uid)
        except NotImplementedError:
            continue
    return found
