"""The torch backend: a model's inference copy (`models.inference_model`) run by PyTorch on the CPU or
a GPU, as a function of numpy arrays (N, 3, S, S) -> (N, dim) float32, the contract the runtime calls
for every backend (`openvino_backend.py` is the other). Needs PyTorch: the full package."""

from __future__ import annotations

import logging
import threading
import warnings

import numpy as np

from .errors import ConfigError
from .optional import require
from .threads import WARNINGS_LOCK

torch = require("torch", "the torch backend (--runtime torch)")

log = logging.getLogger("cxr_embed")
SCRIPT_TOLERANCE = 1e-4  # a TorchScript copy whose output differs more on its check batch is not used


def pick_device(device: str | None = None) -> "torch.device":
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"device {device!r}: {exc}") from None


class TorchNetwork:
    """`model` on `device` as a callable numpy (N, 3, S, S) -> numpy (N, dim) float32 (channels_last
    on the CPU: the layout its inference copy's weights have).

    `script=True` (the runtime's default on the CPU): the model runs as a frozen TorchScript copy,
    traced for each input size (`prepare`, or the first call) and checked against the model. The
    copy runs its whole forward pass in C++ without Python's GIL, where the eager model takes the GIL
    back after each of its ~200 ops: beside threads running Python (decoding, a DICOM listener's
    network threads) an eager forward pass waited for the GIL ~30x longer than it computed
    (BENCHMARKS.md). Where tracing fails or the copy differs, the model runs eagerly (with a warning)."""

    def __init__(self, model: "torch.nn.Module", device: "torch.device | str", script: bool = False):
        self.model = model
        self.device = torch.device(device)
        self.script = bool(script) and self.device.type == "cpu"
        self._scripted: dict = {}  # input shape (C, H, W) -> TorchScript copy, or None (run eagerly)
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device, non_blocking=True)
        if self.device.type == "cpu":
            t = t.contiguous(memory_format=torch.channels_last)
        # the TorchScript copy without the profiling executor's per-shape re-optimisation (thread-local):
        # measured as fast, and no slow first call for each new batch size
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return self._runner(t)(t).float().cpu().numpy()

    def prepare(self, shape: tuple[int, int, int]) -> None:
        """Trace the TorchScript copy for inputs of `shape` (C, H, W) now rather than at the first call."""
        if self.script:
            self._runner(torch.zeros((1, *shape)).contiguous(memory_format=torch.channels_last))

    def _runner(self, t: "torch.Tensor"):
        if not self.script:
            return self.model
        key = tuple(t.shape[1:])
        if key not in self._scripted:
            with self._lock:
                if key not in self._scripted:
                    self._scripted[key] = scripted_copy(self.model, t)
        return self._scripted[key] or self.model


def scripted_copy(model: "torch.nn.Module", example: "torch.Tensor"):
    """A frozen TorchScript trace of `model` (eval mode) on `example`, or None where tracing fails or the
    copy's output differs from the model's by more than SCRIPT_TOLERANCE."""
    try:
        # torch.jit's deprecation notices are silenced; the warnings filters are process-wide, so under the
        # package's lock for them (threads.WARNINGS_LOCK), which the DICOM decoders also hold
        with WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.inference_mode(), torch.jit.optimized_execution(True):  # freezing then inlines (else broken)
                copy = torch.jit.freeze(torch.jit.trace(model.eval(), example[:1].clone(), check_trace=False))
            with torch.inference_mode(), torch.jit.optimized_execution(False):  # as __call__ runs it
                # a batch of 2, not the traced input: checks that neither is baked into the copy
                probe = torch.randn((2, *example.shape[1:]), generator=torch.Generator().manual_seed(0)).contiguous(
                    memory_format=torch.channels_last).to(example.device)
                expected, got = model(probe), copy(probe)
        diff = float((expected.float() - got.float()).abs().max())
    except Exception as exc:  # any failure of tracing: the eager model is right, only slower
        log.warning("the model runs eagerly (TorchScript tracing failed: %s)", type(exc).__name__)
        return None
    if not diff <= SCRIPT_TOLERANCE:
        log.warning("the model runs eagerly (its TorchScript copy differs by %.3g)", diff)
        return None
    return copy
