"""Running the app under uvicorn: connection limits, a header timeout, and the service's logging.

Slow or idle clients must not exhaust the process: at most `max_connections` connections are
served (more get 503), a connection that has not sent a complete request head within
`header_timeout_s` is closed, idle keep-alive connections close after `keepalive_s`, and a request
body must arrive within `body_timeout_s` (routes.py, 408).
"""

from __future__ import annotations

import json
import logging
import sys
import time

LOG_FORMATS = ("text", "json")  # CXR_EMBED_LOG_FORMAT, serve --log-format


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request id when there is one."""

    FIELDS = ("request_id", "method", "route", "status", "duration_ms", "client", "principal", "images")

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "info", fmt: str = "text") -> None:
    """Logs of the service (and uvicorn's errors) to stderr, as text or JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # faiss says at INFO which of its builds it could not load ("Could not load library with AVX512
    # support ..."), on every start: expected on most CPUs, and alarming to read
    logging.getLogger("faiss.loader").setLevel(max(logging.WARNING, root.level))


def header_timeout_protocol(seconds: float):
    """uvicorn's HTTP protocol, closing connections that send no complete request head in time."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools missing: the pure-Python h11 protocol
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderTimeoutProtocol(Base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(seconds, self._close_if_no_request)

        def _close_if_no_request(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc) -> None:
            self._head_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


def run(app, settings, host: str, port: int, log_level: str = "info") -> None:
    """Serve `app` until stopped (SIGINT/SIGTERM), with the limits above and our logging."""
    import uvicorn

    configure_logging(log_level, settings.log_format)
    uvicorn.run(app, host=host, port=port, log_config=None, log_level=log_level, access_log=False,
                http=header_timeout_protocol(settings.header_timeout_s), limit_concurrency=settings.max_connections,
                timeout_keep_alive=settings.keepalive_s)
