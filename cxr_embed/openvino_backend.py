"""The OpenVINO backend: a model's checked ONNX export, compiled for the CPU at an explicit precision.

The runtime calls it where it would call the torch model (`Runtime.forward`): same input (N, 3, S, S)
float32, same output (N, dim) float32 numpy. Precision is always set, never OpenVINO's default (which
is bf16 on CPUs that have it: faster, but embeddings off by up to about 0.5, BENCHMARKS.md "Backends"):
"f32" gives the torch embeddings within 1e-4 (tests/test_openvino.py), "bf16" is opt-in.
Needs `pip install 'cxr-embed[openvino]'`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, ModelError
from .export_onnx import cached_onnx, check_onnx
from .models import EmbeddingModel

PRECISIONS = {"f32": "f32", "bf16": "bf16"}  # our name -> OpenVINO's INFERENCE_PRECISION_HINT
_OV_TYPE_NAMES = {"f32": ("f32", "float32"), "bf16": ("bf16", "bfloat16")}


def _openvino():
    try:
        import openvino
    except ImportError:
        raise ConfigError("backend 'openvino' needs the openvino package: pip install 'cxr-embed[openvino]', "
                          "or use backend 'torch'") from None
    return openvino


def openvino_version() -> str:
    return _openvino().__version__.split("-")[0]


class OpenVINONetwork:
    """`model`'s forward pass run by OpenVINO on the CPU: a callable tensor (N, 3, S, S) -> numpy (N, dim).

    Reads `onnx_path` (default: the cached export of `model`, built on first use) after checking that
    it records `model`'s identity. Not thread-safe: one inference request, used by the building thread."""

    def __init__(self, model: EmbeddingModel, precision: str = "f32", threads: int = 0,
                 onnx_path: str | os.PathLike | None = None):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
        ov = _openvino()
        core = ov.Core()
        if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            raise ConfigError("precision 'bf16': this CPU has no bfloat16 support; use precision 'f32'")
        self.path = Path(onnx_path) if onnx_path is not None else cached_onnx(model)
        self.metadata = check_onnx(self.path, model.identity)
        config = {"INFERENCE_PRECISION_HINT": PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        self.compiled = core.compile_model(core.read_model(str(self.path)), "CPU", config)
        actual = str(self.compiled.get_property("INFERENCE_PRECISION_HINT")).lower()
        if not any(name in actual for name in _OV_TYPE_NAMES[precision]):  # never run at a precision not asked for
            raise ModelError(f"OpenVINO compiled {model.name} at {actual}, not the {precision} asked for")
        self.precision = precision
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))
        self._request = self.compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        self._request.infer({0: arr})
        return np.array(self._request.get_output_tensor(0).data, dtype=np.float32, copy=True)
