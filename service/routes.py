"""The routes: thin handlers over the engine (`request.app.state.engine`)."""

from __future__ import annotations

import asyncio
import base64

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from cxr_embed.errors import EmptyInput
from probes.examples import is_example_probe

from .engine import Engine, ImageResult, NoStore, NotReady
from .errors import HTTPProblem, status_for
from .schemas import ERROR_REPLIES, IMAGE_BODY, EmbedResponse, SearchResponse

SINGLE_TYPES = {"application/dicom": "dicom", "image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg"}
router = APIRouter()


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, refused with 413 as soon as it passes `limit` bytes, and with 408 when it has
    not arrived within `timeout_s` (a slow client must not hold a connection and a buffer forever)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _read_body(request, limit)
    except TimeoutError:
        raise HTTPProblem(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s "
                          "(CXR_EMBED_BODY_TIMEOUT_S)") from None


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPProblem(413, "body_too_large", f"body of {declared} bytes exceeds the limit of {limit} "
                          "(CXR_EMBED_MAX_BODY_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise HTTPProblem(413, "body_too_large", f"body exceeds the limit of {limit} bytes (CXR_EMBED_MAX_BODY_BYTES)")
    return b"".join(chunks)  # one copy of a body of many megabytes, not two


async def read_files(request: Request) -> list[tuple[str | None, bytes]]:
    """The request's images: one raw DICOM/PNG/JPEG body, or the files of a multipart form."""
    settings = request.app.state.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in SINGLE_TYPES and ctype != "multipart/form-data":
        raise HTTPProblem(415, "unsupported_media_type", f"content type {ctype or '(missing)'} is not accepted; send "
                          "application/dicom, image/png, image/jpeg or multipart/form-data")
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout_s)
    if ctype in SINGLE_TYPES:
        if not body:
            raise EmptyInput("empty request body")
        return [(None, body)]
    request._body = body  # let Starlette parse the multipart form from what we read
    try:
        form = await request.form(max_files=settings.max_files + 1, max_fields=100)
    except Exception as exc:  # Starlette's multipart parser raises several kinds on a bad body
        raise HTTPProblem(400, "bad_multipart", f"the multipart body could not be parsed: {exc}") from None
    files = [(v.filename, await v.read()) for _, v in form.multi_items() if hasattr(v, "read")]
    await form.close()
    if not files:
        raise HTTPProblem(400, "no_files", "the multipart form holds no file")
    if len(files) > settings.max_files:
        raise HTTPProblem(413, "too_many_files", f"{len(files)} files exceed the limit of {settings.max_files} per "
                          "request (CXR_EMBED_MAX_FILES)")
    return files


def image_json(res: ImageResult, with_embedding: bool, encoding: str = "list", with_scores: bool = True) -> dict:
    """One image's reply: its error, or its embedding (optional), findings, chest check and scores."""
    out: dict = {"index": res.index}
    if res.filename is not None:
        out["filename"] = res.filename
    if res.error is not None:
        out.update(ok=False, error={"code": res.error.code, "message": str(res.error), "status": status_for(res.error)})
        return out
    out["ok"] = True
    if with_embedding and encoding == "base64":
        out["embedding_base64"] = base64.b64encode(res.embedding.astype("<f4").tobytes()).decode()
    elif with_embedding:
        out["embedding"] = [round(float(v), 7) for v in res.embedding]
    out["findings"] = res.info.to_dict()
    out["chest_check"] = res.chest.to_dict()
    warnings = []
    if not res.chest.is_frontal_cxr:
        warnings.append("this does not look like a frontal chest radiograph: " + "; ".join(res.chest.reasons))
    if not res.info.reliable:
        warnings.append("the embedding is unreliable: " + "; ".join(res.info.unreliable_reasons))
    if warnings:
        out["warning"] = ". ".join(warnings) + ". Scores on it are unreliable."
    if with_scores:
        out["scores"] = res.scores
    return out


async def process(request: Request, probe_names=None) -> list[ImageResult]:
    files = await read_files(request)
    request.state.images = len(files)  # for the access log
    results = await request.app.state.engine.process(files, probe_names)
    if len(files) == 1 and results[0].error is not None and files[0][0] is None:
        raise results[0].error  # a single raw image: its error is the request's error
    return results


def _engine(request: Request) -> Engine:
    return request.app.state.engine


def _reply(engine: Engine, items: list[dict]) -> JSONResponse:
    # plain JSON data already: JSONResponse skips FastAPI's jsonable_encoder walk over every float
    return JSONResponse({"model": engine.runtime.identity.to_dict(), "results": items})


@router.post("/embed", summary="Embedding, findings and probe scores of each image", openapi_extra=IMAGE_BODY,
             responses={200: {"model": EmbedResponse}, **ERROR_REPLIES})
async def embed(request: Request, encoding: str = Query("list", pattern="^(list|base64)$",
                                                        description="list of floats, or base64 float32")):
    results = await process(request)
    return _reply(_engine(request), [image_json(r, True, encoding) for r in results])


@router.post("/predict", summary="Probe scores only (optionally for named probes)", openapi_extra=IMAGE_BODY,
             responses={200: {"model": EmbedResponse}, **ERROR_REPLIES})
async def predict(request: Request, probes: str | None = Query(None, description="comma-separated probe names")):
    names = [p.strip() for p in probes.split(",") if p.strip()] if probes else None
    engine = _engine(request)
    if names and engine.ready:
        engine.check_probe_names(names)  # unknown names: 404 before any work
    results = await process(request, names)
    return _reply(engine, [image_json(r, False) for r in results])


@router.post("/search", summary="The k most similar images of the store loaded at start", openapi_extra=IMAGE_BODY,
             responses={200: {"model": SearchResponse}, **ERROR_REPLIES})
async def search(request: Request, k: int = Query(5, ge=1, le=100, description="neighbours per image")):
    engine = _engine(request)
    if engine.ready and engine.index is None:
        raise NoStore("no store was loaded at start (--store): search is not available")
    out = []
    for r in await process(request):
        item = image_json(r, False, with_scores=False)
        if r.error is None:
            item["neighbours"] = [neighbour_json(n, request.app.state.settings) for n in engine.search(r.embedding, k)]
        out.append(item)
    return _reply(engine, out)


@router.post("/preview", summary="What the model sees: its input for one image, as a grey PNG", openapi_extra=IMAGE_BODY,
             responses={200: {"content": {"image/png": {}}, "description": "the letterboxed model input"},
                        **ERROR_REPLIES}, response_class=Response)
async def preview(request: Request):
    files = await read_files(request)
    if len(files) > 1:
        raise HTTPProblem(400, "one_file_only", f"/preview takes one image, not {len(files)}")
    png = await _engine(request).preview(files[0][1])
    return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})


def neighbour_json(n, settings) -> dict:
    """A neighbour's id and distances, plus only the metadata fields the store's owner exposes."""
    item = {"image_id": n.image_id, "similarity": round(n.similarity, 6), "distance": round(n.distance, 6)}
    fields = settings.search_metadata
    if fields:
        item["metadata"] = {k: v for k, v in (n.metadata or {}).items() if k in fields}
    return item


@router.get("/health", summary="The process is up")
async def health():
    return {"status": "ok"}


@router.get("/ready", summary="200 once the model and probes are loaded, 503 before")
async def ready(request: Request):
    engine, settings = _engine(request), request.app.state.settings
    if engine.ready:
        return {"status": "ready"}
    body = {"status": "failed" if engine.load_error else "loading"}
    if engine.load_error:
        body["error"] = engine.load_error
    return JSONResponse(body, status_code=503, headers={"Retry-After": str(settings.retry_after_s)})


@router.get("/info", summary="Model, loaded probes and limits")
async def info(request: Request):
    engine, settings = _engine(request), request.app.state.settings
    if not engine.ready:
        raise NotReady("the model is still loading; retry when /ready answers 200")
    rt = engine.runtime
    return {
        "model": rt.identity.to_dict(),
        "chest_check": {"policy": settings.image_check, "by_image": rt.reference is not None,
                        "model": None if rt.reference is None else rt.check_model.name,
                        "reference_images": 0 if rt.reference is None else len(rt.reference.embeddings),
                        "threshold": None if rt.reference is None else rt.reference.threshold},
        "probes": {n: probe_info(p) for n, p in engine.probes.items()},
        "probes_source": probes_source(settings.probes),
        "store": None if engine.index is None else {"images": len(engine.index),
                                                    "metadata_exposed": list(settings.search_metadata)},
        "limits": settings.public_limits(),
        "accepted_content_types": sorted(SINGLE_TYPES) + ["multipart/form-data"],
        "device": str(rt.device),
        "runtime": rt.describe(),
    }


def probes_source(path) -> str:
    """Where the served probes come from, in words (never a server path)."""
    if not path:
        return "none"
    if is_example_probe(path):
        return ("the shipped example probe (NIH pneumonia vs no finding, linear, on cxr-supcon-effnet-lite0; "
                "research use only): start with --probes to serve your own, --probes none for none")
    return "probes given with --probes / CXR_EMBED_PROBES"


def probe_info(p) -> dict:
    return {"classes": [c.item() if hasattr(c, "item") else c for c in p.classes_], "kind": p.kind,
            "threshold": p.threshold_, "threshold_info": p.threshold_info_, "description": getattr(p, "description", "")}


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def prometheus(request: Request):
    return PlainTextResponse(request.app.state.metrics.render(_engine(request)), media_type="text/plain; version=0.0.4")
