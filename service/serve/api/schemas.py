"""Request and response bodies of the serving API (they are also its OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code")
    reason: str = Field(description="what was wrong, for a person")


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(description="base64 of JPEG/PNG/WebP bytes")
    labels: list[str] = Field(min_length=1, description="class names; softmax is over these")
    templates: list[str] | None = Field(
        None, min_length=1, description='prompt templates with "{c}"; default ["{c}"]'
    )
    top_k: int | None = Field(None, ge=1, description="predictions returned; default all")


class Prediction(BaseModel):
    label: str
    score: float = Field(description="softmax probability over the request's labels")


class ClassifyResponse(BaseModel):
    model_version: str
    predictions: list[Prediction] = Field(description="sorted by score, best first")


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="text query: ranks the gallery's images")
    image: str | None = Field(None, description="base64 image query: ranks the gallery's texts")
    k: int = Field(10, ge=1)


class RetrieveResult(BaseModel):
    id: str
    text: str
    score: float = Field(description="cosine similarity")


class RetrieveResponse(BaseModel):
    model_version: str
    gallery_size: int
    results: list[RetrieveResult]


class ModelInfo(BaseModel):
    model_version: str
    model: str | None
    strategy: str | None
    chunks: int | None
    loaded_at: float
    gallery_size: int
    index: str = Field(description='"exact" or "hnsw"')
    swaps: int
    failed_versions: list[str]
    versions: list[dict[str, Any]] = Field(description="registry history: version, strategy, chunks, metrics")


class IngestAccepted(BaseModel):
    id: str | None
    topic: str
    partition: int
    offset: int
