"""The registry of named embedding models, in the style of timm.create_model: a name resolves to an
architecture, weights, preprocessing, dimension and the package files the model owns.

Torch-free: a slim install lists models and finds their shipped ONNX exports here; building the
PyTorch network from a spec is `models.py`'s job (`create_model`), which needs the full package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .errors import UnknownModel
from .preprocess import PreprocessConfig

WEIGHTS_DIR = Path(__file__).with_name("weights")
SHIPPED_MODEL = "cxr-supcon-effnet-lite0"
BASELINE_MODEL = "imagenet-effnet-lite0"


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: architecture, weights, preprocessing, dimension, and the package files it
    owns (under `cxr_embed/weights/`; the built wheel must hold every one: tests/test_wheel.py)."""

    name: str
    arch: str
    dim: int
    preprocess: PreprocessConfig
    load_state_dict: Callable[[], dict] = field(compare=False, repr=False)  # name -> torch tensor (models.py)
    description: str = ""
    weights_file: str | None = None  # shipped weights, when they are in the package
    reference_file: str | None = None  # the chest-check reference set built with this model
    # its checked ONNX export (export_onnx.py), made by scripts/make_artifacts.py: what the OpenVINO
    # backend runs, and all a slim install (no torch) has of the model
    onnx_file: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(f for f in (self.weights_file, self.reference_file, self.onnx_file) if f)


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def package_files() -> list[Path]:
    """Every file under `weights/` that a registered model loads."""
    return [WEIGHTS_DIR / f for spec in _REGISTRY.values() for f in spec.files]


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise UnknownModel(f"unknown model {name!r}; available: {', '.join(list_models())}")
    return _REGISTRY[name]


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def list_models() -> list[str]:
    return sorted(n for n in _REGISTRY if available(n))


def available(name: str) -> bool:
    """Whether a registered model's weights are in the package (the ImageNet baseline's come from a
    package of their own)."""
    weights = _REGISTRY[name].weights_file
    return weights is None or (WEIGHTS_DIR / weights).exists()


def default_model_name() -> str:
    """The shipped CXR model when its weights are in the package, else the ImageNet baseline."""
    return SHIPPED_MODEL if available(SHIPPED_MODEL) else BASELINE_MODEL


def shipped_onnx(name: str) -> Path | None:
    """The package's ONNX export of the registered model `name`, if the package holds one."""
    spec = _REGISTRY.get(str(name))
    path = WEIGHTS_DIR / spec.onnx_file if spec is not None and spec.onnx_file else None
    return path if path is not None and path.is_file() else None


def _torch_weights(loader: str) -> Callable[[], dict]:
    """A spec's weight loader, which lives in models.py (PyTorch), imported when first called."""
    def load() -> dict:
        from . import models

        return getattr(models, loader)()

    return load


register_model(
    ModelSpec(
        name=BASELINE_MODEL,
        arch="tf_efficientnet_lite0",
        dim=1280,
        preprocess=PreprocessConfig(size=224, mean=0.5, std=0.5),
        load_state_dict=_torch_weights("imagenet_lite0_backbone_state"),
        description="EfficientNet-Lite0 with ImageNet weights: the baseline CXR pretraining must beat",
        reference_file=f"{BASELINE_MODEL}.reference.npz",
        onnx_file=f"{BASELINE_MODEL}.onnx",
    )
)
register_model(
    ModelSpec(
        name=SHIPPED_MODEL,
        arch="tf_efficientnet_lite0",
        dim=1280,
        preprocess=PreprocessConfig(size=224, mean=0.5, std=0.5),
        load_state_dict=_torch_weights("shipped_state"),
        description="EfficientNet-Lite0 SupCon-pretrained on 15k CXRs (normal/abnormal); see MODEL_CARD.md",
        weights_file=f"{SHIPPED_MODEL}.safetensors",
        onnx_file=f"{SHIPPED_MODEL}.onnx",
    )
)
