"""cxr-embed: chest X-ray embeddings with open weights, from DICOM to probes.

Importing it loads no PyTorch: what needs it (`create_model`, checkpoints) loads on first use, so a
slim install (no torch; README) imports the same package and runs the OpenVINO backend.
"""

from .embedder import Embedder
from .errors import (
    ConfigError,
    CxrEmbedError,
    ImageTooSmall,
    InputError,
    ModelMismatch,
    MultiFrameImage,
    NoPixelData,
    NotAnImage,
    TruncatedImage,
    UnknownModel,
    UnsupportedImage,
)
from .identity import ModelIdentity
from .image import DecodedImage, ImageInfo
from .ingest import load_image
from .registry import default_model_name, list_models
from .labels import LabelTable, read_labels
from .preprocess import PREPROCESS_VERSION, PreprocessConfig, preprocess
from .process import configure_process
from .runtime import EmbeddingResult, Runtime, RuntimeSettings
from .store import Store, StoreWriter, merge_stores

__version__ = "0.1.0"


_TORCH_NAMES = ("create_model", "load_checkpoint", "save_checkpoint")


def __getattr__(name: str):
    # faiss loads only when the index is used: pretraining hosts need not have it
    if name == "EmbeddingIndex":
        from .index import EmbeddingIndex

        return EmbeddingIndex
    if name in _TORCH_NAMES:  # PyTorch: on a slim install, MissingDependency says to install the full package
        from . import models

        return getattr(models, name)
    raise AttributeError(f"module 'cxr_embed' has no attribute {name!r}")
