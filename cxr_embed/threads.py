"""Threads that decode images next to a thread that runs the model, without slowing it down.

PyTorch's CPU ops run on an OpenMP team owned by the thread that calls them. When more than one
thread owns a multi-threaded team, the OpenMP runtime manages more threads than there are cores,
switches to short spin waits, and every op of the model then pays for waking sleeping threads: on
2 cores the EfficientNet-Lite0 forward pass took 27 ms instead of 12 in the service (measured with
py-spy and a micro-benchmark; BENCHMARKS.md). So: threads beside the model's (decoding, which now
runs no torch op at all, and the helpers of `Runtime._forward_shared`) run torch on one thread, and
one thread per process, the one that runs the model, keeps the team. Torch is never imported here:
without it (a slim install, or the OpenVINO backend) these do nothing.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor

# warnings.catch_warnings swaps process-wide state: two threads inside it at once can leave warnings
# shown that one of them meant to catch (pydicom's quote header values). Every `catch_warnings` of the
# package (the DICOM header phase, the torch backend's tracing) holds this lock; each is short.
WARNINGS_LOCK = threading.Lock()


def single_threaded_torch() -> None:
    """Thread initializer: torch ops called from this thread run on this thread alone (where
    torch is loaded at all)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def decode_pool(workers: int, prefix: str = "cxr-decode") -> ThreadPoolExecutor:
    """A thread pool for decoding and preprocessing whose torch ops never start an OpenMP team."""
    return ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix=prefix, initializer=single_threaded_torch)


def model_threads(threads: int) -> None:
    """Call in the thread that runs a torch model: its ops use `threads` intra-op threads."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
