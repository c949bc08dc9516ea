"""Safe decoding of untrusted image bytes, and encoding for shards.

Every image in a chunk or a message comes from outside, so ``decode_image`` checks sizes before
decoding (a 100-byte PNG can claim 10^10 pixels) and turns every failure of the decoders into one
exception type, ``ImageDecodeError``, that names the sample: callers can dead-letter or skip the
sample and keep going.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Sequence

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")

# Extension (as in a shard) -> Pillow format name.
_EXT_TO_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class ImageDecodeError(ValueError):
    """Bytes that are not an acceptable image; ``key`` names the sample, ``reason`` says why."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"cannot decode image of sample {key!r}: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self):
        # Default pickling replays self.args (the message) into __init__, which takes two
        # arguments; worker processes must be able to send this error back.
        return (type(self), (self.key, self.reason))


def decode_image(
    data: bytes,
    *,
    key: str = "?",
    max_bytes: int = 10_000_000,
    max_pixels: int = 40_000_000,
    formats: Sequence[str] = DEFAULT_FORMATS,
) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image, or raise ``ImageDecodeError``.

    ``formats`` are Pillow format names. Only those decoders are run on the data; another known
    format is reported as unsupported rather than decoded.
    """
    if not data:
        raise ImageDecodeError(key, "empty image bytes")
    if len(data) > max_bytes:
        raise ImageDecodeError(key, f"{len(data)} bytes exceed max_bytes={max_bytes}")
    Image.init()
    openers = sorted({f.upper() for f in formats} & set(Image.OPEN))
    if not openers:
        raise ValueError(f"no Pillow decoder for any of formats={formats!r}")
    allowed = set(openers)
    if "JPEG" in allowed:
        # The JPEG decoder reports files with an MPF segment (many phone cameras) as MPO.
        allowed.add("MPO")

    with warnings.catch_warnings():
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; any bomb is an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=openers)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(key, f"decompression bomb: {exc}") from None
        except UnidentifiedImageError:
            raise ImageDecodeError(key, _unsupported_or_garbage(data)) from None
        except Exception as exc:  # any decoder failure on bad bytes is the caller's bad sample
            raise ImageDecodeError(key, f"corrupt image header: {exc!r}") from None

        if img.format not in allowed:
            raise ImageDecodeError(key, f"unsupported format {img.format}")
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(key, f"zero-size image {width}x{height}")
        # Checked from the header, before any pixel data is decompressed.
        if width * height > max_pixels:
            raise ImageDecodeError(
                key,
                f"decompression bomb: {width}x{height} = {width * height} pixels > max_pixels={max_pixels}",
            )
        try:
            img.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageDecodeError(key, f"decompression bomb: {exc}") from None
        except Exception as exc:
            raise ImageDecodeError(key, f"truncated or corrupt {img.format} data: {exc!r}") from None
        if img.mode == "RGB":
            return img
        try:
            return img.convert("RGB")
        except Exception as exc:
            raise ImageDecodeError(key, f"cannot convert mode {img.mode} to RGB: {exc!r}") from None


def _unsupported_or_garbage(data: bytes) -> str:
    # Opening reads the header only, so naming the format costs little.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = Image.open(io.BytesIO(data))
            fmt = probe.format
    except Exception:
        return "not an image (unrecognised bytes)"
    return f"unsupported format {fmt}"


def encode_image(img: Image.Image, fmt: str = "png", *, quality: int = 95) -> bytes:
    """Encode ``img`` as ``fmt`` (png, jpg/jpeg, webp); PNG output is deterministic."""
    pil_format = _EXT_TO_FORMAT.get(fmt.lower())
    if pil_format is None:
        raise ValueError(f"unsupported image format {fmt!r}; expected one of {sorted(_EXT_TO_FORMAT)}")
    if pil_format == "JPEG" and img.mode not in ("RGB", "L", "CMYK"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    if pil_format == "PNG":
        img.save(buf, format="PNG")
    else:
        img.save(buf, format=pil_format, quality=quality)
    return buf.getvalue()
