"""cxr-embed: chest X-ray embeddings with open weights, from DICOM to probes."""

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
from .models import create_model, default_model_name, list_models, load_checkpoint, save_checkpoint
from .labels import LabelTable, read_labels
from .preprocess import PREPROCESS_VERSION, PreprocessConfig, preprocess
from .process import configure_process
from .runtime import EmbeddingResult, Runtime, RuntimeSettings
from .store import Store, StoreWriter, merge_stores

__version__ = "0.1.0"


def __getattr__(name: str):
    # faiss loads only when the index is used: pretraining hosts need not have it
    if name == "EmbeddingIndex":
        from .index import EmbeddingIndex

        return EmbeddingIndex
    raise AttributeError(f"module 'cxr_embed' has no attribute {name!r}")
