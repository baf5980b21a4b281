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

import logging
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("cxr_embed.runtime")
_said_no_nice = threading.Event()


def single_threaded_torch(nice: int = 0) -> None:
    """Thread initializer: torch ops called from this thread run on this thread alone (where
    torch is loaded at all); with `nice` > 0, this thread gets that scheduling niceness (`lower_priority`)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)
    if nice:
        lower_priority(nice)


def lower_priority(nice: int) -> bool:
    """Give the calling thread (only it) the niceness `nice` (1-19: the kernel runs it after the
    process's other threads when cores are short). Linux only, where a thread id is a scheduling
    entity of its own (elsewhere `setpriority` on that id could name another process): elsewhere, or
    if the kernel refuses, nothing changes and a log line says so once. True when applied."""
    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), int(nice))
            return True
        except OSError as exc:
            reason = exc.strerror or str(exc)
    else:
        reason = f"not on {sys.platform}"
    if not _said_no_nice.is_set():
        _said_no_nice.set()
        log.info("decoding threads keep their priority (%s)", reason)
    return False


def decode_pool(workers: int, prefix: str = "cxr-decode", nice: int = 0) -> ThreadPoolExecutor:
    """A thread pool for decoding and preprocessing whose torch ops never start an OpenMP team, its
    threads at niceness `nice` (0: unchanged)."""
    return ThreadPoolExecutor(max(1, int(workers)), thread_name_prefix=prefix, initializer=single_threaded_torch,
                              initargs=(int(nice),))


def model_threads(threads: int) -> None:
    """Call in the thread that runs a torch model: its ops use `threads` intra-op threads."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
