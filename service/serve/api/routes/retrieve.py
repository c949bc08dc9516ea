"""``POST /retrieve``: nearest gallery pairs to a text (by image) or an image (by caption)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from service.serve.api.deps import Context, CurrentSnapshot
from service.serve.api.errors import ApiError
from service.serve.api.inputs import b64_image, clean_texts, image_tensor
from service.serve.api.schemas import ErrorBody, RetrieveRequest, RetrieveResponse, RetrieveResult

router = APIRouter(tags=["retrieve"])

_INLINE_SEARCH_ROWS = 50_000  # below this a search is cheaper than a thread hop


@router.post(
    "/retrieve",
    response_model=RetrieveResponse,
    responses={code: {"model": ErrorBody} for code in (413, 422, 503)},
)
async def retrieve(body: RetrieveRequest, ctx: Context, snap: CurrentSnapshot) -> RetrieveResponse:
    s = ctx.settings
    if (body.text is None) == (body.image is None):
        raise ApiError(422, "one_query", "give exactly one of 'text' or 'image'")
    if body.k > s.max_k:
        raise ApiError(422, "k_too_large", f"k={body.k}, limit {s.max_k}")
    if body.text is not None:
        text = clean_texts([body.text], what="text", max_items=1, max_chars=s.max_text_chars)
        query = await ctx.batcher.submit(snap, "texts", text)
        against = "images"
    else:
        raw = b64_image(body.image or "", max_bytes=s.max_image_bytes)
        image = await run_in_threadpool(
            image_tensor, raw, snap, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels
        )
        query = await ctx.batcher.submit(snap, "images", image)
        against = "texts"
    index = snap.index
    if len(index) < _INLINE_SEARCH_ROWS:
        hits = index.search(query[0], against=against, k=body.k)
    else:
        hits = await run_in_threadpool(index.search, query[0], against=against, k=body.k)
    return RetrieveResponse(
        model_version=snap.version,
        gallery_size=len(index),
        results=[RetrieveResult(id=index.ids[r], text=index.texts[r], score=sc) for r, sc in hits],
    )
