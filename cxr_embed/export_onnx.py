"""The ONNX export of an embedding model, beside the model: versioned, checked, cached per identity.

`export_onnx(model, path)` writes the inference model (BatchNorm folded, `models.inference_model`)
with dynamic batch, height and width, and records the model identity, its preprocessing and the
export format version in the ONNX `metadata_props`; `check_metadata` refuses a file made from
another model (ModelMismatch) or of an unknown format (CheckpointError), and describes the model it
holds (`ExportedModel`). The package ships the export of each registered model (`ModelSpec.onnx_file`,
made by scripts/make_artifacts.py): the OpenVINO backend reads that one, which needs no PyTorch (a
slim install); `cached_onnx(model)` exports any other model (a checkpoint) on first use into the
user's cache folder, one file per model identity. Exporting needs PyTorch and the `onnx` package.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import CheckpointError, ModelMismatch
from .identity import ModelIdentity
from .optional import require
from .preprocess import PreprocessConfig

# /2: height and width are dynamic (the chest check runs its network at 128 px) and the
# preprocessing is recorded in full, so an export describes its model without PyTorch
ONNX_FORMAT = "cxr-embed-onnx/2"
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "pixels", "embedding"
CACHE_ENV = "CXR_EMBED_CACHE"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportedModel:
    """A model as its checked ONNX export describes it: all the runtime needs of a model besides
    running it (name, dimension, preprocessing, identity), with no PyTorch."""

    name: str
    arch: str
    dim: int
    preprocess: PreprocessConfig
    weights_hash: str
    path: Path

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.name, self.weights_hash, self.preprocess.identity, self.dim)


def cache_dir() -> Path:
    """Where exports are cached: $CXR_EMBED_CACHE, else $XDG_CACHE_HOME/cxr-embed, else ~/.cache/cxr-embed."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr-embed"


def export_onnx(model, path: str | os.PathLike, *, opset: int = ONNX_OPSET) -> Path:
    """Write `model`'s (an EmbeddingModel) inference graph (BatchNorm folded; dynamic batch, height
    and width) to `path` as ONNX, with its identity, preprocessing and the format version in the
    metadata; checked by `onnx.checker`. Atomic. Needs PyTorch and onnx (the full package)."""
    onnx = require("onnx", "exporting a model to ONNX")
    torch = require("torch", "exporting a model to ONNX")
    from .models import inference_model

    folded = inference_model(model, "cpu").to(memory_format=torch.contiguous_format)
    size = model.preprocess.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():  # the TorchScript exporter is deprecated; dynamo=True needs onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(folded, (torch.zeros(1, 3, size, size),), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
        meta = {"format": ONNX_FORMAT, **{k: str(v) for k, v in model.identity.to_dict().items()},
                "arch": model.arch, "input_size": str(size), "preprocess": model.preprocess.to_json()}
        del proto.metadata_props[:]
        for key, value in meta.items():
            proto.metadata_props.add(key=key, value=value)
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata_props of an ONNX file, read with the onnx package (CheckpointError if it cannot
    be read). The OpenVINO backend reads the same through OpenVINO (`openvino_backend.py`)."""
    onnx = require("onnx", "reading an ONNX file's metadata")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise CheckpointError(f"cannot read ONNX file {path}: {exc}; delete it to rebuild it") from exc
    return {p.key: p.value for p in proto.metadata_props}


def check_metadata(meta: Mapping[str, str], path: str | os.PathLike,
                   expected: ModelIdentity | str | None = None) -> ExportedModel:
    """The model an export's metadata describes, if it is in a known format and (when `expected` is
    given) of that model identity or model name; else CheckpointError (unknown format, damaged
    metadata) or ModelMismatch (another model)."""
    if meta.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"ONNX file {path} has format {meta.get('format')!r}, not {ONNX_FORMAT!r}: "
                              "re-export it with cxr_embed.export_onnx.export_onnx (or delete it from the cache)")
    try:
        found = ModelIdentity.coerce(meta, f"ONNX file {path}")
        preprocess = PreprocessConfig.from_json(meta["preprocess"])
    except (KeyError, TypeError, ValueError, ModelMismatch) as exc:
        raise CheckpointError(f"ONNX file {path} has damaged metadata ({exc}); re-export it") from None
    if preprocess.identity != found.preprocess_version:
        raise CheckpointError(f"ONNX file {path}: its preprocessing {preprocess.identity} is not the "
                              f"{found.preprocess_version} of its identity; re-export it")
    if isinstance(expected, ModelIdentity):
        expected.check(found, f"ONNX file {path}")
    elif expected is not None and found.model_name != expected:
        raise ModelMismatch(f"ONNX file {path} holds model {found.model_name!r}, not {expected!r}")
    return ExportedModel(found.model_name, meta.get("arch", ""), found.dim, preprocess, found.weights_hash, Path(path))


def check_onnx(path: str | os.PathLike, identity: ModelIdentity) -> dict[str, str]:
    """The metadata of `path` if it is an export of the model `identity` in a known format; else raise
    CheckpointError (unknown format) or ModelMismatch (another model)."""
    meta = onnx_metadata(path)
    check_metadata(meta, path, identity)
    return meta


def cached_onnx(model) -> Path:
    """The checked ONNX export of `model` (an EmbeddingModel) in the cache folder, exported on first
    use (or when the cached file is of an older format or damaged)."""
    ident = model.identity
    path = cache_dir() / "onnx" / f"{ident.model_name}-{ident.weights_hash}.onnx"
    if path.exists():
        try:
            check_onnx(path, ident)
            return path
        except (CheckpointError, ModelMismatch) as exc:  # a cache: rebuild, never trust
            log.warning("rebuilding the cached ONNX export: %s", exc)
    log.warning("exporting %s to ONNX once, for the OpenVINO backend: %s", ident.model_name, path)
    export_onnx(model, path)
    check_onnx(path, ident)
    return path
