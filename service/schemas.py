"""Request and response schemas: what OpenAPI (`/openapi.json`, `/docs`) documents.

Replies are built as plain JSON for speed (no validation walk over 1,280 floats per image); these
models say what they hold. Request bodies are raw bytes or multipart files, described by
`IMAGE_BODY`, so that `/docs` offers a file upload."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable error code, e.g. not_an_image, image_too_small")
    message: str = Field(description="what went wrong and what to do")


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelIdentityModel(BaseModel):
    model_name: str
    weights_hash: str = Field(description="SHA-256 (first 16 hex digits) of the weights")
    preprocess_version: str
    dim: int


class ChestCheckModel(BaseModel):
    is_frontal_cxr: bool
    reasons: list[str] = Field(description="why the image was judged not to be a frontal chest radiograph")
    nearest_reference_similarity: float | None = None
    reference_threshold: float | None = None
    checked_by: list[str] = Field(description="tests that ran: dicom_tags and/or image")


class ProbeScore(BaseModel):
    classes: list[Any]
    probabilities: list[float]
    reliable: bool = Field(description="false when the input is not a frontal CXR: the score means little")
    probability: float | None = Field(None, description="binary probes: probability of the positive class")
    threshold: float | None = None
    positive: bool | None = Field(None, description="binary probes: probability >= threshold")
    positive_class: str | None = Field(None, description="binary probes: the class `probability` is of, as the "
                                       "probe's training labels named it (probes saved before this was recorded: absent)")
    threshold_method: str | None = None
    predicted: Any | None = Field(None, description="multi-class probes: the most probable class")


class ImageError(ErrorBody):
    status: int = Field(description="the HTTP status this error has on its own")


class ImageReply(BaseModel):
    index: int
    filename: str | None = None
    ok: bool
    error: ImageError | None = None
    embedding: list[float] | None = Field(None, description="with ?encoding=list (default)")
    embedding_base64: str | None = Field(None, description="with ?encoding=base64: little-endian float32")
    findings: dict[str, Any] | None = Field(None, description="what ingestion found: modality, view, size, window ...")
    chest_check: ChestCheckModel | None = None
    warning: str | None = None
    scores: dict[str, ProbeScore] | None = None


class EmbedResponse(BaseModel):
    model: ModelIdentityModel
    results: list[ImageReply]


class Neighbour(BaseModel):
    image_id: str
    similarity: float
    distance: float
    metadata: dict[str, Any] | None = Field(None, description="only the fields the store's owner exposes")


class SearchReply(ImageReply):
    neighbours: list[Neighbour] | None = None


class SearchResponse(BaseModel):
    model: ModelIdentityModel
    results: list[SearchReply]


_BINARY = {"schema": {"type": "string", "format": "binary"}}
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "one image as the raw body (DICOM, PNG or JPEG), or several as multipart form files",
        "content": {
            "application/dicom": _BINARY,
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        },
    }
}
ERROR_REPLIES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 415, 422, 429, 503)}
