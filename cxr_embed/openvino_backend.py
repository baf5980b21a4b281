"""The OpenVINO backend: a model's checked ONNX export, compiled for the CPU at an explicit precision.

The runtime calls it where it would call the torch model (`Runtime.forward`): same input (N, 3, S, S)
float32, same output (N, dim) float32 numpy. Precision is always set, never OpenVINO's default (which
is bf16 on CPUs that have it: faster, but embeddings off by up to about 0.5, BENCHMARKS.md "Backends"):
"f32" gives the torch embeddings within 1e-4 (tests/test_openvino.py), "bf16" is opt-in.

Which export runs (`open_network`): a registered model's is the one shipped in the package
(`registry.shipped_onnx`), read with no PyTorch at all (a slim install); a checkpoint, a model object
or a model without a shipped export is exported once into the cache (`export_onnx.cached_onnx`,
which needs PyTorch). Needs `pip install 'cxr-embed[openvino]'`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import CheckpointError, ConfigError, ModelError
from .export_onnx import ExportedModel, cached_onnx, check_metadata
from .identity import ModelIdentity
from .optional import require
from .registry import default_model_name, shipped_onnx

PRECISIONS = {"f32": "f32", "bf16": "bf16"}  # our name -> OpenVINO's INFERENCE_PRECISION_HINT
_OV_TYPE_NAMES = {"f32": ("f32", "float32"), "bf16": ("bf16", "bfloat16")}


def _openvino():
    return require("openvino", "backend 'openvino'")


def openvino_version() -> str:
    return _openvino().__version__.split("-")[0]


def ov_metadata(model) -> dict[str, str]:
    """The ONNX metadata_props of a model read by OpenVINO (its rt_info "framework" section)."""
    info = model.get_rt_info()
    if "framework" not in info:
        return {}
    section = info["framework"]
    section = section.astype(dict) if hasattr(section, "astype") else section  # an OVAny in some releases
    return {str(k): v.astype(str) if hasattr(v, "astype") else str(v) for k, v in section.items()}


class OpenVINONetwork:
    """An ONNX export run by OpenVINO on the CPU: a callable (N, 3, S, S) -> numpy (N, dim) float32.

    Checks the export first (`export_onnx.check_metadata`: its format, and `expected`, a model
    identity or name, when given); `self.model` describes the model it holds. Compiled for inputs of
    `size` px (default: the model's preprocessing size; the export's height and width are dynamic).
    Not thread-safe: one inference request, used by the building thread."""

    def __init__(self, path: str | os.PathLike, precision: str = "f32", threads: int = 0, *,
                 expected: ModelIdentity | str | None = None, size: int | None = None):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        ov = _openvino()
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ConfigError("precision 'bf16': this CPU has no bfloat16 support; use precision 'f32'")
        self.path = Path(path)
        try:
            graph = core.read_model(str(self.path))
        except RuntimeError as exc:  # OpenVINO's one type for a missing, damaged or foreign file
            raise CheckpointError(f"cannot read ONNX file {self.path}: {exc}") from None
        self.metadata = ov_metadata(graph)
        self.model: ExportedModel = check_metadata(self.metadata, self.path, expected)
        self.size = int(size or self.model.preprocess.size)
        graph.reshape({0: ov.PartialShape([-1, 3, self.size, self.size])})  # static pixels, dynamic batch
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(graph, "CPU", config)
        actual = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        if not any(name in actual for name in _OV_TYPE_NAMES[precision]):  # never run at a precision not asked for
            raise ModelError(f"OpenVINO compiled {self.model.name} at {actual}, not the {precision} asked for")
        self.precision = precision
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self.compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self._request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)


def open_network(model=None, precision: str = "f32", threads: int = 0, size: int | None = None) -> OpenVINONetwork:
    """The OpenVINO network of `model`: a registered name (None: the default model) runs the export
    shipped in the package, which needs no PyTorch; a `.onnx` path runs that export as it describes
    itself; a checkpoint path, a model object, or a name without a shipped export runs its cached
    export (exported on first use: needs PyTorch, the full package)."""
    name = default_model_name() if model is None else model
    if isinstance(name, (str, os.PathLike)):
        if str(name).endswith(".onnx"):
            return OpenVINONetwork(name, precision, threads, size=size)
        path = shipped_onnx(str(name))
        if path is not None:
            return OpenVINONetwork(path, precision, threads, expected=str(name), size=size)
        from .models import create_model  # PyTorch: a slim install says to install the full package

        model = create_model(name, device="cpu")
    return OpenVINONetwork(cached_onnx(model), precision, threads, expected=model.identity, size=size)
