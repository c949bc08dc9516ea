"""Ingest message validation: every kind of bad input gets a code and a reason."""

import base64
import io
import json
import struct
import zlib

import pytest
from PIL import Image

from service.messages import InvalidMessage, Limits, encode_message, validate_message


def png(w=8, h=8, color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 0, 255)).save(buf, "JPEG")
    return buf.getvalue()


def bomb_png(w=100_000, h=100_000) -> bytes:
    """A valid PNG header claiming a huge image (the data is tiny)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


def msg(**fields) -> bytes:
    base = {"text": "a red square", "image": base64.b64encode(png()).decode()}
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_valid_message_round_trip():
    pair = validate_message(
        encode_message(text=" a red square ", image=png(), label="square", meta={"src": "t"}),
        default_id="ctp.pairs-0-17",
    )
    assert pair.text == "a red square" and pair.label == "square" and pair.meta == {"src": "t"}
    assert pair.id == "ctp.pairs-0-17" and pair.ext == "png"
    assert (
        validate_message(msg(image=base64.b64encode(jpeg()).decode(), id="x1"), default_id="d").ext == "jpg"
    )


BAD = {
    "tombstone": (None, "empty"),
    "not utf-8": (b"\xff\xfe\x00garbage", "not_utf8"),
    "not json": (b"{text: 1", "not_json"),
    "json array": (b"[1, 2]", "not_object"),
    "json string": (b'"hello"', "not_object"),
    "missing text": (msg(text=...), "schema"),
    "missing image": (msg(image=...), "schema"),
    "text not a string": (msg(text=42), "schema"),
    "label not a string": (msg(label=["a"]), "schema"),
    "meta not an object": (msg(meta="x"), "schema"),
    "unknown field": (msg(extra=1), "schema"),
    "bad base64": (msg(image="not*base64!"), "bad_base64"),
    "non-image bytes": (msg(image=base64.b64encode(b"hello world, not an image").decode()), "bad_image"),
    "truncated image": (msg(image=base64.b64encode(png(64, 64)[:60]).decode()), "bad_image"),
    "decompression bomb": (msg(image=base64.b64encode(bomb_png()).decode()), "bad_image"),
    "gif not allowed": (None, "bad_image"),
    "empty text": (msg(text="   "), "empty_text"),
    "huge text": (msg(text="a" * 5000), "text_too_long"),
    "unicode junk": (msg(text="a\x00b\x07c"), "text_control_chars"),
    "lone surrogate": (
        b'{"text": "\\ud800 x", "image": "' + base64.b64encode(png()) + b'"}',
        "text_control_chars",
    ),
    "oversized message": (b"{" + b" " * 9_000_000 + b"}", "too_large"),
    "oversized image": (None, "image_too_large"),
    "huge meta": (msg(meta={"k": "v" * 20_000}), "meta_too_large"),
    "empty id": (msg(id=""), "empty_id"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, "too_deep"),
    "nesting in meta": (msg(meta={"a": json.loads("[" * 40 + "]" * 40)}), "too_deep"),
    "huge integer": (msg(meta={"n": int("9" * 4000)}), "number_too_large"),
    "integer over python's limit": (
        b'{"text": "a", "image": "", "n": ' + b"7" * 5000 + b"}",
        "number_too_large",
    ),
}


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, "GIF")
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_gets_a_code_and_a_reason(kind):
    value, code = BAD[kind]
    limits = Limits()
    if kind == "gif not allowed":
        value = msg(image=base64.b64encode(_gif()).decode())
    if kind == "oversized image":
        limits = Limits(max_image_bytes=100)
        value = msg(image=base64.b64encode(png(64, 64, (1, 2, 3)) + b"\0" * 200).decode())
    with pytest.raises(InvalidMessage) as info:
        validate_message(value, default_id="t-0-0", limits=limits)
    assert info.value.code == code, info.value
    assert info.value.reason


def test_at_least_fifteen_kinds_of_bad_input():
    assert len(BAD) >= 15


def test_nesting_and_integers_within_the_limits_pass():
    pair = validate_message(
        msg(meta={"a": json.loads("[" * 30 + "1" + "]" * 30), "n": int("9" * 100)}), default_id="d"
    )
    assert pair.meta["n"] == int("9" * 100)


@pytest.mark.parametrize("kind", ["deep nesting", "huge integer", "integer over python's limit"])
def test_hostile_json_gets_its_own_code(kind):
    value, code = BAD[kind]
    with pytest.raises(InvalidMessage) as info:
        validate_message(value, default_id="t-0-0")
    assert info.value.code == code and info.value.__cause__ is None
