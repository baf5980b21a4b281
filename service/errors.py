"""Errors to HTTP: the one table that maps each error type to a status code, and the error body."""

from __future__ import annotations

from fastapi.responses import JSONResponse

from cxr_embed.errors import (
    CxrEmbedError,
    EmptyInput,
    ImageTooLarge,
    InputError,
    ModelMismatch,
    NotAnImage,
    TruncatedImage,
)

from .engine import NoStore, NotReady, QueueFull, TooManyImages, UnknownProbe


class HTTPProblem(Exception):
    """An error found by the HTTP layer itself (content type, body size, auth)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


# (error type, status), first match wins: subclasses before their bases
STATUS_TABLE: list[tuple[type, int]] = [
    (EmptyInput, 400),
    (NotAnImage, 400),
    (TruncatedImage, 400),
    (ImageTooLarge, 413),
    (InputError, 422),
    (TooManyImages, 413),
    (QueueFull, 429),
    (NotReady, 503),
    (NoStore, 409),
    (ModelMismatch, 409),
    (UnknownProbe, 404),
]


def status_for(exc: BaseException) -> int:
    """The HTTP status of an error: HTTPProblem's own, else the table's, else 500."""
    if isinstance(exc, HTTPProblem):
        return exc.status
    for kind, status in STATUS_TABLE:
        if isinstance(exc, kind):
            return status
    return 500


def problem(exc: BaseException, retry_after_s: int = 1) -> JSONResponse:
    """The JSON error reply: {"error": {"code", "message"}}; a 500 never shows its internals."""
    status = status_for(exc)
    code = exc.code if isinstance(exc, (HTTPProblem, CxrEmbedError)) else "internal_error"
    message = str(exc) if status != 500 else "internal error; the server log has the details"
    headers = dict(getattr(exc, "headers", {}) or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", str(retry_after_s))
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)
