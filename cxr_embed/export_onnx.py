"""The ONNX export of an embedding model, beside the model: versioned, checked, cached per identity.

`export_onnx(model, path)` writes the inference model (BatchNorm folded, `models.inference_model`)
with a dynamic batch dimension and records the model identity and the export format version in the
ONNX `metadata_props`; `check_onnx(path, identity)` refuses a file made from another model
(ModelMismatch) or of an unknown format (CheckpointError). `cached_onnx(model)` is what the OpenVINO
backend reads: built on first use under the user's cache folder, one file per model identity.
Needs the `onnx` package (`pip install cxr-embed[openvino]`).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import torch

from .errors import CheckpointError, ConfigError, ModelMismatch
from .identity import ModelIdentity
from .models import EmbeddingModel, inference_model

ONNX_FORMAT = "cxr-embed-onnx/1"  # bump when the graph's inputs, outputs or metadata change
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "pixels", "embedding"
CACHE_ENV = "CXR_EMBED_CACHE"
log = logging.getLogger(__name__)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise ConfigError("the ONNX export needs the onnx package: pip install 'cxr-embed[openvino]'") from None
    return onnx


def cache_dir() -> Path:
    """Where exports are cached: $CXR_EMBED_CACHE, else $XDG_CACHE_HOME/cxr-embed, else ~/.cache/cxr-embed."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cxr-embed"


@torch.no_grad()
def export_onnx(model: EmbeddingModel, path: str | os.PathLike, *, opset: int = ONNX_OPSET) -> Path:
    """Write `model`'s inference graph (BatchNorm folded, dynamic batch) to `path` as ONNX, with its
    identity and the format version in the metadata; checked by `onnx.checker`. Atomic."""
    onnx = _onnx()
    folded = inference_model(model, "cpu").to(memory_format=torch.contiguous_format)
    size = model.preprocess.size
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated; dynamo=True needs onnxscript
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(folded, (torch.zeros(1, 3, size, size),), str(tmp), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        proto = onnx.load(str(tmp))
        meta = {"format": ONNX_FORMAT, **{k: str(v) for k, v in model.identity.to_dict().items()},
                "arch": model.arch, "input_size": str(size)}
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
    """The metadata_props of an ONNX file (CheckpointError if it cannot be read)."""
    onnx = _onnx()
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several types for a damaged file
        raise CheckpointError(f"cannot read ONNX file {path}: {exc}; delete it to rebuild it") from exc
    return {p.key: p.value for p in proto.metadata_props}


def check_onnx(path: str | os.PathLike, identity: ModelIdentity) -> dict[str, str]:
    """The metadata of `path` if it is an export of the model `identity` in a known format; else raise
    CheckpointError (unknown format) or ModelMismatch (another model)."""
    meta = onnx_metadata(path)
    if meta.get("format") != ONNX_FORMAT:
        raise CheckpointError(f"ONNX file {path} has format {meta.get('format')!r}, not {ONNX_FORMAT!r}: "
                              "re-export it with cxr_embed.export_onnx.export_onnx (or delete it from the cache)")
    identity.check(meta, f"ONNX file {path}")
    return meta


def cached_onnx(model: EmbeddingModel) -> Path:
    """The checked ONNX export of `model` in the cache folder, exported on first use (or when the
    cached file is of an older format or damaged)."""
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
