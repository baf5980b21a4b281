"""Process-wide settings, applied once by each entry point (the CLI, the service, benchmarks).

Nothing in the library changes them as a side effect of building an object: a notebook that
imports cxr_embed keeps its process as it was unless it calls `configure_process()` itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from .allocator import keep_freed_memory


@dataclass
class ProcessConfig:
    """What `configure_process` applied."""

    malloc_tuning: bool  # glibc keeps freed buffers (allocator.py)
    blas_threads: int | None  # numpy's BLAS limited to this many threads (None: left as it was)


_blas_limits = None  # kept alive: threadpoolctl undoes its limits when the object is collected


def configure_process(*, malloc: bool = True, blas_threads: int | None = None) -> ProcessConfig:
    """Apply the process settings: glibc malloc keeps freed memory (unless `malloc=False` or
    CXR_EMBED_MALLOC_TUNING=0), and numpy's BLAS runs on `blas_threads` threads when given.

    The service limits BLAS to one thread: it does only tiny products (probes, chest-check
    similarities), and an idle OpenBLAS pool spinning after each one took a core from the model
    (2 cores: 27 ms instead of 16 per image; BENCHMARKS.md)."""
    global _blas_limits
    applied = keep_freed_memory() if malloc else False
    if blas_threads is not None:
        from threadpoolctl import threadpool_limits

        _blas_limits = threadpool_limits(limits=int(blas_threads), user_api="blas")
    return ProcessConfig(applied, blas_threads)
