"""Untrusted request inputs -> model inputs, with the size limits; every fault is a 422."""

from __future__ import annotations

import base64
import binascii
import unicodedata

from torch import Tensor

from ctp.images import ImageDecodeError, decode_image
from service.serve.api.errors import ApiError
from service.serve.snapshot import Snapshot


def b64_image(data: str, *, max_bytes: int) -> bytes:
    if len(data) > max_bytes * 4 // 3 + 4:
        raise ApiError(413, "image_too_large", f"image is over {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "bad_base64", f"image is not valid base64 ({e})") from None


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
    out = []
    for v in values:
        t = unicodedata.normalize("NFC", v).strip()
        if not t:
            raise ApiError(422, f"empty_{what}", f"one of the {what} is empty")
        if len(t) > max_chars:
            raise ApiError(422, f"{what}_too_long", f"{what} of {len(t)} characters, limit {max_chars}")
        if any(unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") for c in t):
            raise ApiError(422, f"{what}_control_chars", f"{what} hold control or unassigned characters")
        out.append(t)
    if len(set(out)) != len(out):
        raise ApiError(422, f"duplicate_{what}", f"{what} must be distinct")
    return out
