"""Is this a frontal chest radiograph? DICOM tags where present, the image itself where not.

Policies (the service's `image_check` setting): `auto` trusts DICOM tags that say all of CR/DX,
chest and AP/PA, and runs the image-based test on everything else (PNG/JPEG, DICOMs with missing or
other tags); `always` runs it on every image; `never` judges by tags alone.

The image-based test compares an embedding with a reference set of CXR embeddings shipped beside the
model weights (`weights/<model>.reference.npz`): an input whose most similar reference is less
similar than every reference is to its own nearest neighbour does not look like a CXR.

It always uses the ImageNet backbone's embedding (CHECK_MODEL), whichever model serves: SupCon
training on a binary label folds the space around that label, and in it photographs, CT and
extremity radiographs sit as close to the references as real CXRs do (measured, see BENCHMARKS.md),
while the ImageNet space keeps them far apart.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .errors import UnknownModel
from .image import ImageInfo
from .registry import WEIGHTS_DIR, get_spec
from .resize import resize

CHEST_MODALITIES = {"CR", "DX"}
CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "TORSO", "PORT CHEST"}
FRONTAL_VIEWS = {"AP", "PA", "APS", "PAS", "AP SUPINE", "FRONTAL"}
CHECK_MODEL = "imagenet-effnet-lite0"
CHECK_SIZE = 128  # the check looks at a 128 px copy: a third of a 224 px forward pass, same separation (BENCHMARKS.md)


def check_input(batch: np.ndarray, size: int = CHECK_SIZE) -> np.ndarray:
    """The check network's input: canonical model inputs (N, C, S, S) resized to `size` px
    (antialiased bilinear, `resize.py`), float32. A channel equal to the first (the canonical input's
    three are copies of one grey image) is resized once."""
    batch = np.asarray(batch, dtype=np.float32)
    if batch.shape[-2:] == (size, size):
        return batch
    out = np.empty((*batch.shape[:-2], size, size), dtype=np.float32)
    for n in range(len(batch)):
        first = out[n, 0] = resize(batch[n, 0], size, size)
        for c in range(1, batch.shape[1]):
            out[n, c] = first if np.array_equal(batch[n, c], batch[n, 0]) else resize(batch[n, c], size, size)
    return out


def check_embeddings(model, batch, size: int = CHECK_SIZE) -> np.ndarray:
    """Embeddings for the chest check by a torch model (an EmbeddingModel) from canonical model
    inputs (N, 3, 224, 224), resized to `size` (`check_input`). Needs PyTorch."""
    from .torch_backend import TorchNetwork

    return TorchNetwork(model, next(model.parameters()).device)(check_input(np.asarray(batch), size))


@dataclass
class ChestCheck:
    is_frontal_cxr: bool
    reasons: list[str] = field(default_factory=list)
    nearest_reference_similarity: float | None = None
    reference_threshold: float | None = None
    checked_by: list[str] = field(default_factory=list)  # "dicom_tags" and/or "image"

    def to_dict(self) -> dict:
        return asdict(self)


def tag_reasons(info: ImageInfo) -> list[str]:
    """Reasons, from DICOM tags alone, to think an image is not a frontal chest radiograph."""
    reasons = []
    if info.modality and info.modality.upper() not in CHEST_MODALITIES:
        reasons.append(f"DICOM modality is {info.modality}, not CR or DX radiography")
    if info.body_part and info.body_part.upper() not in CHEST_BODY_PARTS:
        reasons.append(f"DICOM body part examined is {info.body_part}, not CHEST")
    if info.view_position and info.view_position.upper() not in FRONTAL_VIEWS:
        reasons.append(f"DICOM view position is {info.view_position}, not a frontal (AP/PA) view")
    return reasons


def tags_confirm_frontal_cxr(info: ImageInfo) -> bool:
    """True when DICOM tags say all three: CR/DX radiography, chest, frontal (AP/PA) view."""
    return bool(info.modality and info.modality.upper() in CHEST_MODALITIES
                and info.body_part and info.body_part.upper() in CHEST_BODY_PARTS
                and info.view_position and info.view_position.upper() in FRONTAL_VIEWS)


def needs_image_check(info: ImageInfo, policy: str) -> bool:
    """Whether the image-based test should run under `policy` (auto, always or never)."""
    if policy == "never":
        return False
    return policy == "always" or not tags_confirm_frontal_cxr(info)


class ReferenceSet:
    """Normalised CXR embeddings of one model and the similarity below which an input is flagged."""

    def __init__(self, embeddings: np.ndarray, threshold: float, weights_hash: str, size: int = CHECK_SIZE):
        e = embeddings.astype(np.float32)
        self.embeddings = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        self.threshold = float(threshold)
        self.weights_hash = weights_hash
        self.size = int(size)

    @staticmethod
    def path_for(model_name: str) -> Path:
        """Where the model's spec says its reference set lives in the package."""
        try:
            name = get_spec(model_name).reference_file
        except UnknownModel:  # a checkpoint of one's own: beside the package's, by name
            name = None
        return WEIGHTS_DIR / (name or f"{model_name}.reference.npz")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceSet":
        with np.load(path, allow_pickle=False) as z:
            return cls(z["embeddings"], float(z["threshold"]), str(z["weights_hash"]), int(z["size"]))

    @classmethod
    def size_for(cls, model_name: str) -> int:
        """The input size the model's shipped reference set was embedded at (CHECK_SIZE if none)."""
        path = cls.path_for(model_name)
        if not path.exists():
            return CHECK_SIZE
        with np.load(path, allow_pickle=False) as z:
            return int(z["size"])

    @classmethod
    def for_model(cls, model) -> "ReferenceSet | None":
        """The shipped reference set of `model` (anything with `name` and `weights_hash`: an
        EmbeddingModel, or an ExportedModel), None when missing or made with other weights."""
        path = cls.path_for(model.name)
        if not path.exists():
            return None
        ref = cls.load(path)
        return ref if ref.weights_hash == model.weights_hash else None

    @classmethod
    def build(cls, embeddings: np.ndarray, weights_hash: str, size: int = CHECK_SIZE, quantile: float = 0.0) -> "ReferenceSet":
        """Threshold: the `quantile` (default: the minimum) of the references' leave-one-out
        nearest-neighbour similarities."""
        ref = cls(embeddings, 0.0, weights_hash, size)
        sims = ref.embeddings @ ref.embeddings.T
        np.fill_diagonal(sims, -np.inf)
        ref.threshold = float(np.quantile(sims.max(axis=1), quantile))
        return ref

    def save(self, path: str | os.PathLike) -> None:
        np.savez_compressed(path, embeddings=self.embeddings.astype(np.float16), threshold=self.threshold,
                            weights_hash=self.weights_hash, size=self.size)

    def nearest_similarity(self, embeddings: np.ndarray) -> np.ndarray:
        e = np.atleast_2d(embeddings).astype(np.float32)
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        return (e @ self.embeddings.T).max(axis=1)


def check_chest(info: ImageInfo, embedding: np.ndarray | None, reference: ReferenceSet | None) -> ChestCheck:
    """Tag reasons, plus the image-based test when a check embedding is given."""
    reasons = tag_reasons(info)
    checked_by = ["dicom_tags"] if (info.modality or info.body_part or info.view_position) else []
    sim = thr = None
    if reference is not None and embedding is not None:
        checked_by.append("image")
        sim = float(reference.nearest_similarity(embedding)[0])
        thr = reference.threshold
        if not sim >= thr:  # a NaN similarity is no evidence of a chest radiograph
            reasons.append(f"the image does not look like a chest radiograph: its embedding's similarity to the "
                           f"nearest reference CXR is {sim:.3f}, below {thr:.3f}")
    return ChestCheck(not reasons, reasons, sim, thr, checked_by)


def build_reference(sources: list, model: str = CHECK_MODEL, size: int = CHECK_SIZE, batch: int = 32,
                    progress: bool = False) -> ReferenceSet:
    """A reference set from images of frontal CXRs (paths or bytes), embedded by `model` at `size` px."""
    from tqdm import tqdm

    from .embedder import Embedder

    embedder = Embedder(model, device="cpu")
    try:
        tensors = [embedder.prepare(s)[0] for s in tqdm(sources, desc="reference images", unit="img",
                                                         disable=not progress, mininterval=1.0)]
    finally:
        embedder.close()
    embs = np.concatenate([check_embeddings(embedder.model, np.stack(tensors[i : i + batch]), size)
                           for i in range(0, len(tensors), batch)])
    return ReferenceSet.build(embs, embedder.model.weights_hash, size=size)


def is_reliable(info: ImageInfo, chest: ChestCheck) -> bool:
    """Whether scores on an image can be trusted: a frontal CXR, decoded without a flag (a DX image
    "for processing", a broken window ignored). The one rule for the service, predict and listen."""
    return bool(chest.is_frontal_cxr and info.reliable)
