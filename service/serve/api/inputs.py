"""Untrusted request inputs -> model inputs, with the size limits; every fault is a 422."""

from __future__ import annotations

from torch import Tensor

from ctp.images import ImageDecodeError, decode_image
from service.messages import InvalidMessage, clean_text, decode_base64
from service.serve.api.errors import ApiError
from service.serve.snapshot import Snapshot


def b64_image(data: str, *, max_bytes: int) -> bytes:
    """The ingest contract's base64 rule (``service.messages.decode_base64``); too large is a 413."""
    try:
        return decode_base64(data, max_bytes=max_bytes)
    except InvalidMessage as e:
        raise ApiError(413 if e.code == "image_too_large" else 422, e.code, e.reason) from None


def image_tensor(raw: bytes, snap: Snapshot, *, max_bytes: int, max_pixels: int) -> Tensor:
    """Encoded bytes -> preprocessed ``[1, 3, H, W]`` for ``snap``'s model."""
    try:
        pil = decode_image(raw, key="request", max_bytes=max_bytes, max_pixels=max_pixels)
    except ImageDecodeError as e:
        raise ApiError(422, "bad_image", e.reason) from None
    return snap.preprocess(pil)[None]


def clean_texts(values: list[str], *, what: str, max_items: int, max_chars: int) -> list[str]:
    """NFC-normalised, stripped, non-empty, distinct, within the limits."""
    if len(values) > max_items:
        raise ApiError(422, f"too_many_{what}", f"{len(values)} {what}, limit {max_items}")
    try:  # the ingest contract's text rule, stricter: no tabs or newlines in labels and queries
        out = [clean_text(v, what=what, max_chars=max_chars, allow="") for v in values]
    except InvalidMessage as e:
        raise ApiError(422, e.code, e.reason) from None
    if len(set(out)) != len(out):
        raise ApiError(422, f"duplicate_{what}", f"{what} must be distinct")
    return out
