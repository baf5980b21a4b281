"""Typed errors raised where a problem is found; the service maps them to HTTP codes in one place."""

from __future__ import annotations


class CxrEmbedError(Exception):
    """Base class of every error cxr-embed raises on purpose."""

    code = "error"


class InputError(CxrEmbedError, ValueError):
    """The input cannot be turned into a model input. The message names the problem."""

    code = "bad_input"


class EmptyInput(InputError):
    code = "empty_input"


class NotAnImage(InputError):
    """Bytes that are neither DICOM, PNG nor JPEG."""

    code = "not_an_image"


class TruncatedImage(InputError):
    """A file that starts like an image but whose data ends early or is corrupt."""

    code = "truncated_or_corrupt"


class NoPixelData(InputError):
    code = "no_pixel_data"


class MultiFrameImage(InputError):
    code = "multi_frame"


class ImageTooSmall(InputError):
    code = "image_too_small"


class UnsupportedImage(InputError):
    """A real image we do not handle (photometric interpretation, bit depth, codec...)."""

    code = "unsupported_image"


class UndecodableImage(InputError):
    """A compressed image whose decoder failed for a reason other than missing data."""

    code = "undecodable_image"


class InvalidPixelTransform(InputError):
    """A header value the grey-level pipeline cannot use (NaN/infinite rescale, BitsStored out of range...).

    The message names the attribute (never the value of an identifying one)."""

    code = "invalid_pixel_transform"


class ImageTooLarge(InputError):
    """An image whose declared size is over the decoding limit: refused before any pixel is decoded."""

    code = "image_too_large"


class ModelError(CxrEmbedError):
    code = "model_error"


class UnknownModel(ModelError, KeyError):
    code = "unknown_model"

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown model"


class CheckpointError(ModelError):
    code = "bad_checkpoint"


class ModelMismatch(ModelError):
    """Embeddings, stores or probes made by different models (or preprocessing) are being mixed."""

    code = "model_mismatch"


class StoreError(CxrEmbedError):
    code = "store_error"


class StoreCorrupt(StoreError):
    """A store or index whose bytes changed after they were written; nothing from it is returned as data."""

    code = "store_corrupt"


class StoreTooNew(StoreError):
    """A store of a format version this cxr-embed does not know: a newer release wrote it."""

    code = "store_too_new"


class StoreWriteFailed(StoreError):
    """A commit that could not be written (full disk, read-only folder...); the previous store is intact."""

    code = "store_write_failed"


class StoreBusy(StoreError):
    """A store that another writer holds (`STORE.h5.lock`): one writer at a time, or their commits
    would overwrite each other's and damage its journal. Nothing was changed."""

    code = "store_busy"


class InvalidEmbedding(StoreError):
    """An embedding a store refuses to hold: NaN/inf values or the wrong dimension."""

    code = "invalid_embedding"


class UnknownImageIds(StoreError):
    """Ids asked for (e.g. to remove) that the store does not hold; nothing was changed."""

    code = "unknown_image_ids"


class StaleIndex(StoreError):
    """A saved index built from another state of its store (images added or removed since)."""

    code = "stale_index"


class LabelError(CxrEmbedError, ValueError):
    """A label file or label array that cannot be used; the message names the row or class."""

    code = "bad_labels"


class ConfigError(CxrEmbedError, ValueError):
    """A setting (command-line option, environment variable, argument) has a value we cannot use."""

    code = "bad_setting"


FLAG_VALUES = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def parse_flag(name: str, raw: str) -> bool:
    """An on/off setting's text (an environment variable's value): 1/0, true/false, yes/no or on/off,
    in any case; anything else is a ConfigError that names the setting, never a silent default."""
    value = FLAG_VALUES.get(raw.strip().lower())
    if value is None:
        raise ConfigError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")
    return value


class NonFiniteEmbedding(ModelError):
    """The model gave NaN or infinite values for an image (damaged weights, a broken backend):
    a failure of ours for that image, never an embedding."""

    code = "non_finite_embedding"


class MissingDependency(ConfigError):
    """Something asked for needs a package this install lacks (PyTorch on a slim install, OpenVINO
    without the extra); the message says what to install, or what to use instead."""

    code = "missing_dependency"


class DistributedJobError(CxrEmbedError):
    """A job on a Ray cluster that could not finish (workers kept dying, or no worker made progress);
    what it finished is saved, and running the same command again goes on from there."""

    code = "distributed_job_error"
