"""The ingest message contract and its validation.

A Kafka value is UTF-8 JSON: ``{"id": str (optional), "text": str, "image": base64 of
JPEG/PNG/WebP bytes, "label": str (optional), "meta": object (optional)}``. ``validate_message``
returns a ``ValidPair`` or raises ``InvalidMessage`` with a short machine-readable ``code`` and a
human reason; ingest sends the original bytes and both to the dead-letter topic.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import unicodedata
from dataclasses import dataclass, field

from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from ctp.images import ImageDecodeError, decode_image


class InvalidMessage(ValueError):
    def __init__(self, code: str, reason: str):
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class IngestMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: StrictStr | None = None
    text: StrictStr
    image: StrictStr
    label: StrictStr | None = None
    meta: dict | None = None


@dataclass(frozen=True)
class Limits:
    max_message_bytes: int = 8_000_000
    max_image_bytes: int = 5_000_000
    max_image_pixels: int = 16_000_000
    max_text_chars: int = 1000
    max_label_chars: int = 200
    max_id_chars: int = 200
    max_meta_bytes: int = 16_000
    max_json_depth: int = 32  # arrays/objects nested deeper: ``too_deep``
    max_int_digits: int = 100  # longer integer literals: ``number_too_large``


@dataclass
class ValidPair:
    id: str
    text: str
    image: bytes  # decoded-and-verified image bytes, as sent
    ext: str  # "jpg" | "png" | "webp"
    label: str | None = None
    meta: dict = field(default_factory=dict)


def pair_digest(pair: ValidPair) -> bytes:
    """8 bytes naming a pair's content (its text and image bytes; not its label or meta): ingest
    tells a resend (same id, same digest: dropped) from a different pair under a used id
    (``id_conflict``)."""
    h = hashlib.blake2b(digest_size=8)
    for part in (pair.text.encode(), pair.image):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def clean_text(value: str, *, what: str, max_chars: int, allow: str = "\t\n") -> str:
    """NFC-normalised and stripped; refused (``InvalidMessage``, codes ``empty_{what}``,
    ``{what}_too_long``, ``{what}_control_chars``) when empty, too long, or holding control,
    surrogate or unassigned characters other than those in ``allow``. Shared with the API."""
    text = unicodedata.normalize("NFC", value).strip()
    if not text:
        raise InvalidMessage(f"empty_{what}", f"{what} is empty")
    if len(text) > max_chars:
        raise InvalidMessage(f"{what}_too_long", f"{what} has {len(text)} characters, limit {max_chars}")
    bad = [c for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in allow]
    if bad:
        raise InvalidMessage(
            f"{what}_control_chars", f"{what} holds control, surrogate or unassigned characters ({bad[0]!r})"
        )
    return text


def decode_base64(data: str, *, max_bytes: int, what: str = "image") -> bytes:
    """Strict base64 of at most ``max_bytes`` bytes (codes ``{what}_too_large``, ``bad_base64``),
    refused before decoding when the text alone is too long. Shared with the API."""
    if len(data) > max_bytes * 4 // 3 + 4:  # base64 is 4/3 of the bytes
        raise InvalidMessage(f"{what}_too_large", f"{what} is over {max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidMessage("bad_base64", f"{what} is not valid base64 ({e})") from None


def image_ext(raw: bytes) -> str:
    """The shard extension of verified image bytes: ``jpg``, ``webp`` or ``png``."""
    if raw.startswith(b"\xff\xd8"):
        return "jpg"
    if raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        return "webp"
    return "png"


DEFAULT_LIMITS = Limits()


def _parse_int(s: str, *, max_digits: int) -> int:
    # refused before int() so Python's own int-string limit (a ValueError) is never reached
    if len(s.lstrip("-")) > max_digits:
        raise InvalidMessage(
            "number_too_large", f"integer of {len(s.lstrip('-'))} digits, limit {max_digits}"
        )
    return int(s)


def json_depth(obj: object, *, limit: int) -> int:
    """Nesting depth of parsed JSON (a scalar: 0), counted without recursion; stops at ``limit + 1``."""
    depth, level = 0, [(obj, 1)]
    while level:
        node, d = level.pop()
        if isinstance(node, dict | list):
            depth = max(depth, d)
            if depth > limit:
                return depth
            level.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return depth


def validate_message(value: bytes | None, *, default_id: str, limits: Limits = DEFAULT_LIMITS) -> ValidPair:
    if value is None:
        raise InvalidMessage("empty", "message has no value (tombstone)")
    if len(value) > limits.max_message_bytes:
        raise InvalidMessage("too_large", f"message of {len(value)} bytes, limit {limits.max_message_bytes}")
    try:
        decoded = value.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidMessage("not_utf8", f"value is not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        obj = json.loads(decoded, parse_int=functools.partial(_parse_int, max_digits=limits.max_int_digits))
    except json.JSONDecodeError as e:
        raise InvalidMessage(
            "not_json", f"value is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    except RecursionError:  # deeper than the interpreter's recursion limit (~1000)
        raise InvalidMessage("too_deep", f"JSON nested deeper than {limits.max_json_depth} levels") from None
    if (depth := json_depth(obj, limit=limits.max_json_depth)) > limits.max_json_depth:
        raise InvalidMessage(
            "too_deep", f"JSON nested {depth}+ levels deep, limit {limits.max_json_depth}"
        ) from None
    if not isinstance(obj, dict):
        raise InvalidMessage("not_object", f"value is a JSON {type(obj).__name__}, expected an object")
    try:
        msg = IngestMessage.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "message"
        raise InvalidMessage("schema", f"{where}: {first['msg']}") from None
    text = clean_text(msg.text, what="text", max_chars=limits.max_text_chars)
    label = (
        clean_text(msg.label, what="label", max_chars=limits.max_label_chars)
        if msg.label is not None
        else None
    )
    pair_id = msg.id if msg.id is not None else default_id
    pair_id = clean_text(pair_id, what="id", max_chars=limits.max_id_chars)
    meta = msg.meta or {}
    if len(json.dumps(meta)) > limits.max_meta_bytes:
        raise InvalidMessage("meta_too_large", f"meta is over {limits.max_meta_bytes} bytes of JSON")
    raw = decode_base64(msg.image, max_bytes=limits.max_image_bytes)
    try:
        decode_image(raw, key=pair_id, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels)
    except ImageDecodeError as e:
        raise InvalidMessage("bad_image", e.reason) from None
    return ValidPair(id=pair_id, text=text, image=raw, ext=image_ext(raw), label=label, meta=meta)


def encode_message(
    *, text: str, image: bytes, id: str | None = None, label: str | None = None, meta: dict | None = None
) -> bytes:
    """The producer side of the contract."""
    obj = {"text": text, "image": base64.b64encode(image).decode("ascii")}
    if id is not None:
        obj["id"] = id
    if label is not None:
        obj["label"] = label
    if meta:
        obj["meta"] = meta
    return json.dumps(obj).encode()
