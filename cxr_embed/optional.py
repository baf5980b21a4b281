"""Packages an install may lack: import them, or raise MissingDependency saying what to install.

A slim install (requirements/slim.txt plus the wheel without its dependencies: README, "A slim
serving install") has no PyTorch, timm or onnx; it embeds, scores and serves through OpenVINO on the
models' shipped ONNX exports. Everything that needs one of these packages imports it through
`require`, so asking a slim install for it (the torch backend, pretraining, an ONNX export) fails
with one clear message instead of a ModuleNotFoundError from deep inside.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependency

FULL_PACKAGE = ("install the full package (pip install cxr-embed, which brings PyTorch); a slim install "
                "embeds, scores and serves with --runtime openvino only")
INSTALL = {
    "torch": FULL_PACKAGE,
    "timm": FULL_PACKAGE,
    "onnx": "pip install 'cxr-embed[openvino]' (with the full package: exporting a model needs PyTorch too)",
    "openvino": "pip install 'cxr-embed[openvino]', or use --runtime torch",
}


def has(module: str) -> bool:
    """Whether `module` can be imported here (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, what: str) -> ModuleType:
    """`module`, imported; MissingDependency naming `what` needed it and how to get it if it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if exc.name is not None and exc.name.split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken: its own error says more
        hint = INSTALL.get(module.split(".")[0], f"pip install {module}, or install the full package (pip install "
                                                 "cxr-embed)")
        raise MissingDependency(f"{what} needs the {module} package, which this install lacks: {hint}") from None
