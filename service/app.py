"""The FastAPI app: thin routes over the Engine. Errors map to HTTP status codes in one place."""

from __future__ import annotations

import base64
import logging
import os
import signal
import threading
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from cxr_embed.errors import (
    CxrEmbedError,
    EmptyInput,
    InputError,
    ModelMismatch,
    NotAnImage,
    TruncatedImage,
)

from .engine import Engine, NoStore, NotReady, QueueFull, UnknownProbe
from .metrics import Metrics
from .settings import ServiceSettings

log = logging.getLogger("cxr_embed.service")

SINGLE_TYPES = {"application/dicom": "dicom", "image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg"}


class HTTPProblem(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


def status_for(exc: Exception) -> int:
    """The one place where error types become HTTP status codes."""
    if isinstance(exc, HTTPProblem):
        return exc.status
    if isinstance(exc, (EmptyInput, NotAnImage, TruncatedImage)):
        return 400
    if isinstance(exc, InputError):
        return 422
    if isinstance(exc, QueueFull):
        return 429
    if isinstance(exc, NotReady):
        return 503
    if isinstance(exc, (NoStore, ModelMismatch)):
        return 409
    if isinstance(exc, UnknownProbe):
        return 404
    return 500


def problem(exc: Exception, settings: ServiceSettings) -> JSONResponse:
    status = status_for(exc)
    code = exc.code if isinstance(exc, (HTTPProblem, CxrEmbedError)) else "internal_error"
    message = exc.message if isinstance(exc, HTTPProblem) else str(exc) if status < 500 else "internal error"
    headers = dict(getattr(exc, "headers", {}) or {})
    if status in (429, 503):
        headers.setdefault("Retry-After", str(settings.retry_after_s))
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def create_app(settings: ServiceSettings | None = None, engine: Engine | None = None,
               exit_on_load_error: bool = False) -> FastAPI:
    """The app. The model loads in the background at start-up; with `exit_on_load_error` a failed
    load (say, a probe of another model) stops the server instead of leaving /ready at 503."""
    settings = settings or ServiceSettings.from_env()
    engine = engine or Engine(settings)
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Load in the background so /health answers at once and /ready says 503 until done.
        def load():
            try:
                engine.load()
                log.info("model %s ready (%d probes)", engine.model.name, len(engine.probes))
            except Exception as exc:  # reported by /ready, or the server stops (exit_on_load_error)
                engine.load_error = str(exc) if isinstance(exc, CxrEmbedError) else f"{type(exc).__name__}: {exc}"
                log.error("loading failed: %s", engine.load_error)
                if exit_on_load_error:
                    os.kill(os.getpid(), signal.SIGINT)

        if not engine.ready:
            threading.Thread(target=load, name="cxr-load", daemon=True).start()
        yield
        engine.close()

    app = FastAPI(title="cxr-embed", version="0.1.0", lifespan=lifespan,
                  description="Chest X-ray embeddings and probe scores. Send a DICOM, PNG or JPEG.")
    app.state.engine, app.state.settings, app.state.metrics = engine, settings, metrics

    known_routes: set[str] = set()

    class Guard:
        """Pure ASGI middleware: bearer token, metrics, and no exception ever becomes a dropped
        connection. (Starlette's BaseHTTPMiddleware would relay every body chunk of a 7 MB DICOM
        through a stream of its own, which cost milliseconds per request.)"""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.app(scope, receive, send)
            start = time.perf_counter()
            route = scope.get("path", "")
            status = {"code": 500, "started": False}

            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    status["code"], status["started"] = message["status"], True
                await send(message)

            try:
                if settings.token and route != "/health":
                    auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                    if auth != f"Bearer {settings.token}":
                        raise HTTPProblem(401, "unauthorized", "a valid 'Authorization: Bearer <token>' header is required",
                                          {"WWW-Authenticate": "Bearer"})
                await self.app(scope, receive, send_wrapper)
            except Exception as exc:  # never let an exception become a dropped connection
                if status_for(exc) >= 500:
                    log.exception("unhandled error on %s", route)
                if status["started"]:
                    raise
                await problem(exc, settings)(scope, receive, send_wrapper)
            if not known_routes:
                known_routes.update(r.path for r in app.routes)
            metrics.observe(route if route in known_routes else "other", scope.get("method", ""), status["code"],
                            time.perf_counter() - start)

    app.add_middleware(Guard)

    @app.exception_handler(CxrEmbedError)
    async def on_cxr_error(request: Request, exc: CxrEmbedError):
        return problem(exc, settings)

    @app.exception_handler(HTTPProblem)
    async def on_problem(request: Request, exc: HTTPProblem):
        return problem(exc, settings)

    async def read_files(request: Request) -> list[tuple[str | None, bytes]]:
        """The request's images: one raw DICOM/PNG/JPEG body, or the files of a multipart form."""
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype not in SINGLE_TYPES and ctype != "multipart/form-data":
            raise HTTPProblem(415, "unsupported_media_type",
                              f"content type {ctype or '(missing)'} is not accepted; send application/dicom, "
                              "image/png, image/jpeg or multipart/form-data")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
            raise HTTPProblem(413, "body_too_large", f"body of {declared} bytes exceeds the limit of {settings.max_body_bytes}")
        chunks, size = [], 0
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > settings.max_body_bytes:
                raise HTTPProblem(413, "body_too_large", f"body exceeds the limit of {settings.max_body_bytes} bytes")
        body = b"".join(chunks)  # one copy of a body of many megabytes, not two
        del chunks
        if ctype in SINGLE_TYPES:
            if not body:
                raise EmptyInput("empty request body")
            return [(None, body)]
        request._body = body  # let Starlette parse the multipart form from what we read
        try:
            form = await request.form(max_files=settings.max_files + 1, max_fields=100)
        except Exception as exc:
            raise HTTPProblem(400, "bad_multipart", f"the multipart body could not be parsed: {exc}") from None
        files = []
        for _, value in form.multi_items():
            if hasattr(value, "read"):
                files.append((value.filename, await value.read()))
        await form.close()
        if not files:
            raise HTTPProblem(400, "no_files", "the multipart form holds no file")
        if len(files) > settings.max_files:
            raise HTTPProblem(413, "too_many_files", f"{len(files)} files exceed the limit of {settings.max_files} per request")
        return files

    def image_json(res, with_embedding: bool, encoding: str) -> dict:
        out: dict = {"index": res.index}
        if res.filename is not None:
            out["filename"] = res.filename
        if res.error is not None:
            out["ok"] = False
            out["error"] = {"code": res.error.code, "message": str(res.error), "status": status_for(res.error)}
            return out
        out["ok"] = True
        if with_embedding:
            if encoding == "base64":
                out["embedding_base64"] = base64.b64encode(res.embedding.astype("<f4").tobytes()).decode()
            else:
                out["embedding"] = [round(float(v), 7) for v in res.embedding]
        out["findings"] = res.info.to_dict()
        out["chest_check"] = res.chest.to_dict()
        if not res.chest.is_frontal_cxr:
            out["warning"] = "this does not look like a frontal chest radiograph: " + "; ".join(res.chest.reasons) + \
                             ". Scores on it are unreliable."
        out["scores"] = res.scores
        return out

    async def process(request: Request, probe_names=None):
        files = await read_files(request)
        results = await engine.process(files, probe_names)
        if len(files) == 1 and results[0].error is not None and files[0][0] is None:
            raise results[0].error  # a single raw image: its error is the request's error
        return results

    async def handle(request: Request, with_embedding: bool, encoding: str = "list", probe_names=None):
        results = await process(request, probe_names)
        # plain JSON data already: JSONResponse skips FastAPI's jsonable_encoder walk over every float
        return JSONResponse({"model": engine.model.identity,
                             "results": [image_json(r, with_embedding, encoding) for r in results]})

    @app.post("/embed", summary="Embedding, findings and probe scores of each image")
    async def embed(request: Request, encoding: str = Query("list", pattern="^(list|base64)$")):
        return await handle(request, True, encoding)

    @app.post("/predict", summary="Probe scores only (optionally for named probes)")
    async def predict(request: Request, probes: str | None = Query(None, description="comma-separated probe names")):
        names = [p.strip() for p in probes.split(",") if p.strip()] if probes else None
        if names and engine.ready:
            engine.score(np.zeros(engine.model.dim, np.float32), names)  # unknown names: 404 before any work
        return await handle(request, False, probe_names=names)

    @app.post("/search", summary="The k most similar images of the store loaded at start")
    async def search(request: Request, k: int = Query(5, ge=1, le=100)):
        if engine.ready and engine.index is None:
            raise NoStore("no store was loaded at start (--store): search is not available")
        results = await process(request)
        out = []
        for r in results:
            item = image_json(r, False, "list")
            if r.error is None:
                item.pop("scores", None)
                item["neighbours"] = [{"image_id": n.image_id, "similarity": round(n.similarity, 6),
                                       "distance": round(n.distance, 6), "metadata": n.metadata}
                                      for n in engine.search(r.embedding, k)]
            out.append(item)
        return {"model": engine.model.identity, "results": out}

    @app.get("/health", summary="The process is up")
    async def health():
        return {"status": "ok"}

    @app.get("/ready", summary="200 once the model and probes are loaded, 503 before")
    async def ready():
        if engine.ready:
            return {"status": "ready"}
        body = {"status": "failed" if engine.load_error else "loading"}
        if engine.load_error:
            body["error"] = engine.load_error
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})

    @app.get("/info", summary="Model, loaded probes and limits")
    async def info():
        if not engine.ready:
            raise NotReady("the model is still loading")
        return {
            "model": engine.model.identity,
            "chest_check": {"policy": settings.image_check, "by_image": engine.reference is not None,
                            "model": None if engine.reference is None else engine.check_model.name,
                            "reference_images": 0 if engine.reference is None else len(engine.reference.embeddings),
                            "threshold": None if engine.reference is None else engine.reference.threshold},
            "probes": {n: {"classes": [c.item() if hasattr(c, "item") else c for c in p.classes_],
                           "kind": p.kind, "threshold": p.threshold_, "threshold_info": p.threshold_info_,
                           "description": getattr(p, "description", "")} for n, p in engine.probes.items()},
            "store": None if engine.index is None else {"images": len(engine.index)},
            "limits": settings.public_limits(),
            "accepted_content_types": sorted(SINGLE_TYPES) + ["multipart/form-data"],
            "device": str(engine.device),
        }

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    return app


def app_from_env() -> FastAPI:
    """Factory for `uvicorn --factory service.app:app_from_env`, configured by CXR_EMBED_* variables."""
    return create_app(ServiceSettings.from_env())
