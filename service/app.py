"""The FastAPI app: middleware, routes and error handlers put together, and the model loaded in the
background at start-up (`/ready` answers 503 until it is)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxr_embed import __version__
from cxr_embed.errors import CxrEmbedError

from .engine import Engine
from .errors import HTTPProblem, problem
from .metrics import Metrics
from .middleware import Guard
from .routes import router
from .settings import ServiceSettings
from .web import document_bearer, router as web_router

log = logging.getLogger("cxr_embed.service")


def _load_in_background(engine: Engine, exit_on_load_error: bool) -> None:
    def load():
        try:
            engine.load()
            log.info("model %s ready (%d probes)", engine.model.name, len(engine.probes))
        except Exception as exc:  # reported by /ready, or the server stops (exit_on_load_error)
            engine.load_error = str(exc) if isinstance(exc, CxrEmbedError) else f"{type(exc).__name__}: {exc}"
            log.error("loading failed: %s", engine.load_error)
            if exit_on_load_error:
                os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=load, name="cxr-load", daemon=True).start()


def create_app(settings: ServiceSettings | None = None, engine: Engine | None = None,
               exit_on_load_error: bool = False) -> FastAPI:
    """The app. With `exit_on_load_error` a failed load (say, a probe of another model) stops the
    server instead of leaving /ready at 503."""
    settings = settings or ServiceSettings.from_env()
    engine = engine or Engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine.ready:
            _load_in_background(engine, exit_on_load_error)
        yield
        engine.close()

    app = FastAPI(title="cxr-embed", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Chest X-ray embeddings and probe scores. Send a DICOM, PNG or JPEG.")
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, Metrics()
    app.include_router(router)
    app.include_router(web_router)  # the page at / and the offline /docs (docs_url=None above)
    if settings.token:
        document_bearer(app)
    # routes named in metrics; any other path counts as "other" (no unbounded label values)
    known = {r.path for r in [*router.routes, *web_router.routes]} | {app.openapi_url}
    app.add_middleware(Guard, settings=settings, metrics=app.state.metrics, known_routes=known)

    async def on_error(request: Request, exc: Exception):
        return problem(exc, settings.retry_after_s)

    async def on_invalid_request(request: Request, exc: RequestValidationError):
        # FastAPI's own reply is {"detail": [...]}; ours is one shape for every error, naming the parameter
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("query", "path", "header", "body"))
        message = f"{where or 'request'}: {first.get('msg', 'invalid')}"
        return problem(HTTPProblem(422, "invalid_parameter", message), settings.retry_after_s)

    async def on_http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return problem(HTTPProblem(exc.status_code, code, message, dict(exc.headers or {})), settings.retry_after_s)

    app.add_exception_handler(CxrEmbedError, on_error)
    app.add_exception_handler(HTTPProblem, on_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory service.app:app_from_env`, configured by CXR_EMBED_* variables."""
    return create_app(ServiceSettings.from_env())
