"""Pure ASGI middleware: bearer token, request metrics, and no exception ever becomes a dropped
connection. (Starlette's BaseHTTPMiddleware would relay every body chunk of a 7 MB DICOM through a
stream of its own, which cost milliseconds per request.)"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
import uuid

from starlette.requests import ClientDisconnect

from .errors import HTTPProblem, problem, status_for

log = logging.getLogger("cxr_embed.service")
access = logging.getLogger("cxr_embed.access")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID when it is a short plain token, else a new one."""
    given = next((v.decode("latin-1") for k, v in headers if k.lower() == b"x-request-id"), "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex[:16]


# answered without a token: they hold no data (the web page, the API docs and their assets, in web.py)
OPEN_ROUTES = {"/health", "/", "/docs", "/openapi.json"}
OPEN_PREFIXES = ("/static/",)


def is_open(path: str) -> bool:
    """Whether `path` is answered without the bearer token."""
    return path in OPEN_ROUTES or path.startswith(OPEN_PREFIXES)


def check_bearer(headers: list[tuple[bytes, bytes]], token: str) -> None:
    """Accept exactly one `Authorization: Bearer <token>` header (scheme in any case, RFC 7235),
    compared in constant time; raise HTTPProblem 401 (or 400 for two headers) otherwise."""
    values = [v for k, v in headers if k.lower() == b"authorization"]
    if len(values) > 1:
        raise HTTPProblem(400, "ambiguous_authorization", "send one Authorization header, not several")
    scheme, _, given = (values[0].decode("latin-1") if values else "").strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPProblem(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
                          {"WWW-Authenticate": "Bearer"})


class Guard:
    def __init__(self, app, settings, metrics, known_routes):
        self.app, self.settings, self.metrics, self.known_routes = app, settings, metrics, known_routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        route = scope.get("path", "")
        status = {"code": 500, "started": False}
        rid = request_id(scope.get("headers") or [])
        scope.setdefault("state", {})["request_id"] = rid

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            if self.settings.token and not is_open(route):
                check_bearer(scope.get("headers") or [], self.settings.token)
            await self.app(scope, receive, send_wrapper)
        except ClientDisconnect:  # the client went away: nobody to answer, nothing went wrong here
            status["code"] = 499
            log.info("client disconnected during %s", route)
        except Exception as exc:  # never let an exception become a dropped connection
            if status_for(exc) >= 500:
                log.exception("unhandled error on %s", route)
            if status["started"]:
                raise
            await problem(exc, self.settings.retry_after_s)(scope, receive, send_wrapper)
        name = route if route in self.known_routes else "other"
        seconds = time.perf_counter() - start
        self.metrics.observe(name, scope.get("method", ""), status["code"], seconds)
        self._access_log(scope, rid, name, status["code"], seconds)

    def _access_log(self, scope, rid: str, route: str, status: int, seconds: float) -> None:
        """Who asked for what: client address, credential fingerprint, route, status, image count;
        never a body, a query string or a header value that could carry patient data."""
        client = scope.get("client") or ("-", 0)
        principal = "bearer:" + hashlib.sha256(self.settings.token.encode()).hexdigest()[:8] \
            if self.settings.token and not is_open(route) and status != 401 else "anonymous"
        fields = {"request_id": rid, "method": scope.get("method", ""), "route": route, "status": status,
                  "duration_ms": round(seconds * 1000, 1), "client": client[0], "principal": principal,
                  "images": scope.get("state", {}).get("images", 0)}
        access.info("%s %s %s %d %.1f ms %s images=%d", rid, fields["method"], route, status, fields["duration_ms"],
                    client[0], fields["images"], extra=fields)
