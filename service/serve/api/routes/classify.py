"""``POST /classify``: zero-shot classification of one image over the request's labels."""

from __future__ import annotations

import asyncio

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from torch import Tensor

from service.serve.api.deps import Context, CurrentSnapshot, ServeContext
from service.serve.api.errors import ApiError
from service.serve.api.inputs import b64_image, clean_texts, image_tensor
from service.serve.api.schemas import ClassifyRequest, ClassifyResponse, ErrorBody, Prediction
from service.serve.snapshot import Snapshot

router = APIRouter(tags=["classify"])

ERRORS = {code: {"model": ErrorBody} for code in (413, 415, 422, 503)}

_MULTIPART = {
    "type": "object",
    "required": ["file", "labels"],
    "properties": {
        "file": {"type": "string", "format": "binary"},
        "labels": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 1,
            "description": "one field per label, or one field of comma-separated labels",
        },
        "templates": {"type": "array", "items": {"type": "string"}},
        "top_k": {"type": "integer", "minimum": 1},
    },
}
_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": ClassifyRequest.model_json_schema()},
            "multipart/form-data": {"schema": _MULTIPART},
        },
    }
}


async def _parse(
    request: Request, ctx: ServeContext
) -> tuple[bytes, list[str], list[str] | None, int | None]:
    s = ctx.settings
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=s.max_labels + s.max_templates + 2)
        except ApiError:
            raise
        except Exception as e:  # malformed multipart, too many parts
            raise ApiError(422, "bad_form", f"cannot parse the form: {e}") from None
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise ApiError(422, "missing_file", "multipart form needs a 'file' part with the image")
        raw = await file.read(s.max_image_bytes + 1)
        if len(raw) > s.max_image_bytes:
            raise ApiError(413, "image_too_large", f"image is over {s.max_image_bytes} bytes")
        labels = [v for v in form.getlist("labels") if isinstance(v, str)]
        if len(labels) == 1 and "," in labels[0]:  # `-F labels=cat,dog`: one field, comma-separated
            labels = [x.strip() for x in labels[0].split(",") if x.strip()]
        if not labels:
            raise ApiError(422, "missing_labels", "form needs one or more 'labels' fields")
        templates = [v for v in form.getlist("templates") if isinstance(v, str)] or None
        top_k = form.get("top_k")
        if top_k is not None and (
            not isinstance(top_k, str) or not top_k.strip().isdigit() or int(top_k) < 1
        ):
            raise ApiError(422, "bad_top_k", "top_k must be a positive integer")
        return raw, labels, templates, int(top_k) if top_k is not None else None
    if ctype and not ctype.startswith("application/json"):
        raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    try:
        req = ClassifyRequest.model_validate_json(await request.body())
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, "invalid_request", f"{where}: {first['msg']}") from None
    return b64_image(req.image, max_bytes=s.max_image_bytes), req.labels, req.templates, req.top_k


async def label_matrix(ctx: ServeContext, snap: Snapshot, labels: list[str], templates: list[str]) -> Tensor:
    """Class embeddings ``[C, D]``: per label the renormalised mean over templates (open_clip's
    zero-shot classifier); text embeddings come from the LRU or one batched forward."""
    keys = [((snap.version, snap.load_id), t, c) for c in labels for t in templates]  # label-major
    rows = [ctx.labels.get(k) for k in keys]
    missing = [i for i, r in enumerate(rows) if r is None]
    if missing:
        emb = await ctx.batcher.submit(
            snap, "texts", [keys[i][1].replace("{c}", keys[i][2]) for i in missing]
        )
        for i, row in zip(missing, emb, strict=True):
            rows[i] = row.clone()
            ctx.labels.put(keys[i], rows[i])
    emb = torch.stack(rows).view(len(labels), len(templates), -1).mean(dim=1)  # [C, D]
    return F.normalize(emb, dim=-1)


@router.post("/classify", response_model=ClassifyResponse, responses=ERRORS, openapi_extra=_BODY)
async def classify(request: Request, ctx: Context, snap: CurrentSnapshot) -> ClassifyResponse:
    """Softmax over the labels (model's logit scale) of the image against each label's prompts."""
    s = ctx.settings
    raw, labels, templates, top_k = await _parse(request, ctx)
    labels = clean_texts(labels, what="labels", max_items=s.max_labels, max_chars=s.max_label_chars)
    templates = clean_texts(
        templates or ["{c}"], what="templates", max_items=s.max_templates, max_chars=s.max_text_chars
    )
    if any("{c}" not in t for t in templates):
        raise ApiError(422, "bad_template", 'every template must contain "{c}"')
    image = await run_in_threadpool(
        image_tensor, raw, snap, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
    )  # [1, 3, H, W]
    image_emb, classes = await asyncio.gather(
        ctx.batcher.submit(snap, "images", image), label_matrix(ctx, snap, labels, templates)
    )
    probs = (snap.logit_scale * image_emb[0] @ classes.T).softmax(dim=-1)  # [C]
    order = probs.argsort(descending=True)[: top_k or len(labels)].tolist()
    return ClassifyResponse(
        model_version=snap.version,
        predictions=[Prediction(label=labels[i], score=float(probs[i])) for i in order],
    )
