"""Service settings: defaults, overridden by CXR_EMBED_* environment variables, then by CLI flags.

The runtime's own settings (model, device, threads, chest-check policy, input limits) live in
`cxr_embed.runtime.RuntimeSettings`, shared with `cxr-embed embed` and the DICOM listener; this adds
only what is about HTTP and batching across requests. Every field of both is read from the
environment as CXR_EMBED_<FIELD>.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace

from cxr_embed.errors import ConfigError, parse_flag
from cxr_embed.runtime import RuntimeSettings

ENV_PREFIX = "CXR_EMBED_"
# the service's defaults where they differ from the Python API's
SERVICE_RUNTIME_DEFAULTS = {"image_check": "auto", "cpu_workers": 0}


def _service_runtime() -> RuntimeSettings:
    return RuntimeSettings(**SERVICE_RUNTIME_DEFAULTS)


@dataclass
class ServiceSettings:
    runtime: RuntimeSettings = field(default_factory=_service_runtime)
    probes: str | None = None  # folder of saved probes (*.json), or one probe file; "none": none
    store: str | None = None  # HDF5 store for /search
    token: str | None = None  # bearer token; when set every route but /health needs it
    max_body_bytes: int = 32 * 1024 * 1024
    max_files: int = 16
    max_batch: int = 16  # images per forward pass
    batch_wait_ms: float = 5.0  # how long the batcher waits for more images after the first
    # batcher threads, each running its own batches: 0 (auto) = the runtime's cpu_workers where the model
    # runs on single-threaded CPU workers (model_threads 1), else 1 (engine.py)
    model_workers: int = 0
    max_queue: int = 64  # images waiting for the model; beyond this requests get 429
    retry_after_s: int = 1
    # stored metadata fields that /search may return beside ids and distances (comma-separated in
    # CXR_EMBED_SEARCH_METADATA); default none: a store's metadata may hold patient ids
    search_metadata: tuple = ()
    max_connections: int = 256  # open connections; more get 503 (slow or idle clients cannot take every fd)
    header_timeout_s: float = 10.0  # a connection must send a complete request head within this
    body_timeout_s: float = 60.0  # a request body must arrive within this (else 408)
    keepalive_s: int = 5  # idle keep-alive connections close after this
    log_format: str = "text"  # text or json (one JSON object per line, with request ids)

    def __post_init__(self):
        # `--probes none` / CXR_EMBED_PROBES=none: no probes, not even the CLI's default example
        self.no_probes = isinstance(self.probes, str) and self.probes.strip().lower() == "none"
        if self.no_probes:
            self.probes = None
        if isinstance(self.search_metadata, str):
            self.search_metadata = tuple(f.strip() for f in self.search_metadata.split(",") if f.strip())
        self.search_metadata = tuple(self.search_metadata)
        from .server import LOG_FORMATS

        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"{ENV_PREFIX}LOG_FORMAT={self.log_format!r}: expected text or json")
        if int(self.model_workers) < 0:
            raise ConfigError(f"{ENV_PREFIX}MODEL_WORKERS must be 0 (auto) or more, not {self.model_workers!r}")
        for name in ("max_body_bytes", "max_files", "max_batch", "max_queue", "max_connections"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{ENV_PREFIX}{name.upper()} must be at least 1, not {getattr(self, name)!r}")

    @classmethod
    def build(cls, **values) -> "ServiceSettings":
        """Settings from keyword values of either dataclass (`model=`, `probes=`, `image_check=` ...)."""
        own = {f.name for f in fields(cls)} - {"runtime"}
        rt = {f.name for f in fields(RuntimeSettings)}
        unknown = set(values) - own - rt
        if unknown:
            raise ConfigError(f"unknown service setting(s): {', '.join(sorted(unknown))}")
        runtime = replace(_service_runtime(), **{k: v for k, v in values.items() if k in rt})
        return cls(runtime=runtime, **{k: v for k, v in values.items() if k in own})

    @classmethod
    def from_env(cls, environ: dict | None = None, defaults: dict | None = None, **overrides) -> "ServiceSettings":
        """Defaults (the service's, then `defaults`), then CXR_EMBED_* variables of `environ` (default:
        os.environ), then `overrides` that are not None."""
        env = os.environ if environ is None else environ
        values = dict(defaults or {})
        for f in [*fields(RuntimeSettings), *(f for f in fields(cls) if f.name != "runtime")]:
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.build(**values)

    def __getattr__(self, name: str):
        # settings.model, settings.image_check ...: the runtime's fields read through
        if name != "runtime" and "runtime" in self.__dict__ and hasattr(self.runtime, name):
            return getattr(self.runtime, name)
        raise AttributeError(name)

    def public_limits(self) -> dict:
        return {
            "max_body_bytes": self.max_body_bytes,
            "max_files": self.max_files,
            "max_batch": self.max_batch,
            "batch_wait_ms": self.batch_wait_ms,
            "max_queue": self.max_queue,
            "min_side": self.runtime.min_side,
            "max_pixels": self.runtime.max_pixels,
        }


def _parse(f, raw: str):
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        return parse_flag(ENV_PREFIX + f.name.upper(), raw)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        return raw
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{f.name.upper()}={raw!r} is not a valid {kind}") from None
