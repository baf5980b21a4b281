"""The web page at `/` and the API docs at `/docs`, every asset served by this app.

Hospital networks often have no internet: nothing here names another host. The page's own files are
in `service/static/` (shipped in the wheel); Swagger UI's come from the `fastapi-offline` package.
No /redoc: ReDoc's page fetches its vendor's logo from the internet. URLs are relative, so that all
of it works behind a proxy under a path prefix too. The page, the docs and their assets hold no data and load without the bearer token
(`middleware.OPEN_ROUTES`, `OPEN_PREFIXES`); the page sends the token itself to the API routes."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from .errors import HTTPProblem
from .middleware import is_open

PAGE_DIR = Path(__file__).parent / "static"
DOCS_DIR = Path(fastapi_offline.__file__).parent / "static"  # swagger-ui-bundle.js, swagger-ui.css, favicon.png
ASSET_FOLDERS = {"web": PAGE_DIR, "docs": DOCS_DIR}
# the page talks to this server only, and shows images it fetched itself (blob: URLs)
PAGE_POLICY = "default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
router = APIRouter(include_in_schema=False)


@router.get("/")
async def page():
    return FileResponse(PAGE_DIR / "index.html", headers={"Content-Security-Policy": PAGE_POLICY})


@router.get("/static/{folder}/{name}")
async def asset(folder: str, name: str):
    """A file of one of the asset folders, by its bare name (nothing else on disk is reachable)."""
    base = ASSET_FOLDERS.get(folder)
    if base is None or name not in {p.name for p in base.iterdir() if p.is_file()}:
        raise HTTPProblem(404, "not_found", f"no asset {folder}/{name}")
    return FileResponse(base / name, headers={"Cache-Control": "public, max-age=3600"})


@router.get("/docs")
async def swagger(request: Request) -> HTMLResponse:
    app = request.app
    return get_swagger_ui_html(
        openapi_url=app.openapi_url.lstrip("/"), title=f"{app.title} - API", oauth2_redirect_url=None,
        swagger_js_url="static/docs/swagger-ui-bundle.js", swagger_css_url="static/docs/swagger-ui.css",
        swagger_favicon_url="static/docs/favicon.png",
        # validatorUrl None: no badge fetched from the public validator
        swagger_ui_parameters={"validatorUrl": None, "tryItOutEnabled": True})


def document_bearer(app: FastAPI) -> None:
    """Declare the bearer token in the OpenAPI document (for a server that has one), so that /docs
    offers "Authorize" and its "Try it out" uploads send the token."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            for path, operations in schema["paths"].items():
                for op in operations.values():
                    op["security"] = [] if is_open(path) else [{"bearer": []}]
        return app.openapi_schema

    app.openapi = openapi
