"""Service settings: defaults, overridden by CXR_EMBED_* environment variables, then by CLI flags."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from cxr_embed.embedder import CPU_CHUNK

ENV_PREFIX = "CXR_EMBED_"
IMAGE_CHECK_POLICIES = ("auto", "always", "never")


@dataclass
class ServiceSettings:
    model: str | None = None  # registered name or .safetensors path; None: the shipped default
    probes: str | None = None  # folder of saved probes (*.json)
    store: str | None = None  # HDF5 store for /search
    device: str = "auto"
    token: str | None = None  # bearer token; when set every route but /health needs it
    max_body_bytes: int = 32 * 1024 * 1024
    max_files: int = 16
    max_batch: int = 16  # images per forward pass
    model_threads: int = 0  # torch threads running the model; 0: torch's default (one per core)
    cpu_chunk: int = CPU_CHUNK  # on the CPU, images per model call within a batch (as the Embedder)
    # on the CPU, threads that share a batch's model calls, each running torch on one thread;
    # 0: auto (one per model thread on up to 4 cores, else 1); 1: one team of threads for everything
    cpu_workers: int = 0
    batch_wait_ms: float = 5.0  # how long the batcher waits for more images after the first
    max_queue: int = 64  # images waiting for the model; beyond this requests get 429
    decode_threads: int = 2
    retry_after_s: int = 1
    # "is this a frontal CXR?": auto = by DICOM tags when they say so (CR/DX, chest, AP/PA), else by the
    # image too; always = by the image too, every time; never = by DICOM tags only (no check network)
    image_check: str = "auto"

    def __post_init__(self):
        aliases = {"1": "always", "0": "never", "true": "always", "false": "never"}
        value = aliases.get(str(self.image_check).strip().lower(), str(self.image_check).strip().lower())
        if value not in IMAGE_CHECK_POLICIES:
            raise ValueError(f"{ENV_PREFIX}IMAGE_CHECK={self.image_check!r}: expected one of {', '.join(IMAGE_CHECK_POLICIES)}")
        self.image_check = value

    @classmethod
    def from_env(cls, environ: dict | None = None, **overrides) -> "ServiceSettings":
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            try:
                if kind.startswith("int"):
                    values[f.name] = int(raw)
                elif kind.startswith("float"):
                    values[f.name] = float(raw)
                else:
                    values[f.name] = raw
            except ValueError:
                raise ValueError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def public_limits(self) -> dict:
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_files": self.max_files,
            "max_batch": self.max_batch,
            "batch_wait_ms": self.batch_wait_ms,
            "max_queue": self.max_queue,
        }
