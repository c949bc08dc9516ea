import io
import pickle
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from ctp.images import ImageDecodeError, decode_image, encode_image


def _image(mode: str = "RGB", size: tuple[int, int] = (20, 12)) -> Image.Image:
    rng = np.random.default_rng(0)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(arr.squeeze(-1) if channels == 1 else arr)


def _bytes(fmt: str, mode: str = "RGB", size: tuple[int, int] = (20, 12)) -> bytes:
    buf = io.BytesIO()
    _image(mode, size).save(buf, format=fmt)
    return buf.getvalue()


def _png_with_header_size(width: int, height: int) -> bytes:
    """A small valid PNG whose IHDR claims width x height (CRC fixed, so only size checks catch it)."""
    data = bytearray(_bytes("PNG"))
    # signature (8) + chunk length (4) + b"IHDR" (4), then width, height as big-endian uint32.
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    return bytes(data)


def _decode_error(data: bytes, **kwargs) -> ImageDecodeError:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, key="sample-7", **kwargs)
    err = info.value
    assert err.key == "sample-7"
    assert "sample-7" in str(err)
    return err


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_decodes_allowed_formats_to_loaded_rgb(fmt):
    img = decode_image(_bytes(fmt), key="k")
    assert img.mode == "RGB"
    assert img.size == (20, 12)
    assert np.asarray(img).shape == (12, 20, 3)


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_converts_other_modes_to_rgb(mode):
    assert decode_image(_bytes("PNG", mode)).mode == "RGB"


def test_palette_png_converts_to_rgb():
    buf = io.BytesIO()
    _image().convert("P").save(buf, format="PNG")
    assert decode_image(buf.getvalue()).mode == "RGB"


def test_empty_bytes():
    assert "empty" in _decode_error(b"").reason


def test_too_many_bytes():
    data = _bytes("PNG")
    assert "max_bytes" in _decode_error(data, max_bytes=len(data) - 1).reason


def test_garbage_is_not_an_image():
    assert "not an image" in _decode_error(b"this is not an image at all" * 10).reason


def test_truncated_png():
    data = _bytes("PNG", size=(64, 64))
    _decode_error(data[: len(data) // 2])


def test_truncated_jpeg():
    data = _bytes("JPEG", size=(64, 64))
    _decode_error(data[: len(data) // 2])


def test_header_bomb_beyond_pillow_limit():
    # 10^10 pixels: Pillow's own DecompressionBombError, reported as a bomb.
    assert "bomb" in _decode_error(_png_with_header_size(100_000, 100_000)).reason


def test_header_bomb_in_pillow_warning_range_is_an_error():
    # 10^8 pixels is above Image.MAX_IMAGE_PIXELS (~8.9e7) but below twice it, where Pillow only
    # warns; the warning must become an error even when max_pixels would allow it.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no warning may escape
        err = _decode_error(_png_with_header_size(10_000, 10_000), max_pixels=10**9)
    assert "bomb" in err.reason


def test_over_max_pixels_checked_from_header():
    # The pixel data is a 20x12 image, so decoding would fail: the size check must come first.
    err = _decode_error(_png_with_header_size(3000, 3000), max_pixels=1_000_000)
    assert "max_pixels" in err.reason


def test_real_image_over_max_pixels():
    assert "max_pixels" in _decode_error(_bytes("PNG", size=(100, 100)), max_pixels=5_000).reason


def test_zero_size_header():
    _decode_error(_png_with_header_size(0, 10))


def test_gif_unsupported_by_default():
    assert "unsupported format GIF" in _decode_error(_bytes("GIF")).reason


def test_gif_allowed_when_asked():
    assert decode_image(_bytes("GIF"), formats=("PNG", "GIF")).mode == "RGB"


def test_jpeg_unsupported_when_not_listed():
    assert "JPEG" in _decode_error(_bytes("JPEG"), formats=("PNG",)).reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_random_corruptions_only_raise_image_decode_error(fmt):
    data = _bytes(fmt, size=(32, 32))
    rng = np.random.default_rng(1)
    for _ in range(150):
        corrupt = bytearray(data)
        for pos in rng.integers(0, len(corrupt), size=int(rng.integers(1, 8))):
            corrupt[pos] = int(rng.integers(0, 256))
        cut = int(rng.integers(1, len(corrupt) + 1))
        try:
            img = decode_image(bytes(corrupt[:cut]), key="fuzz")
        except ImageDecodeError as err:
            assert err.key == "fuzz"
        else:
            assert img.mode == "RGB"


def test_error_pickles():
    err = pickle.loads(pickle.dumps(ImageDecodeError("k1", "why")))
    assert (err.key, err.reason) == ("k1", "why")
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("fmt", ["png", "jpg", "jpeg", "webp", "PNG"])
def test_encode_round_trip(fmt):
    img = _image()
    out = decode_image(encode_image(img, fmt))
    assert out.size == img.size
    if fmt.lower() == "png":
        np.testing.assert_array_equal(np.asarray(out), np.asarray(img))


def test_encode_png_is_deterministic_and_rgba_jpeg_works():
    img = _image()
    assert encode_image(img) == encode_image(img)
    assert decode_image(encode_image(_image("RGBA"), "jpg")).mode == "RGB"


def test_encode_unknown_format():
    with pytest.raises(ValueError):
        encode_image(_image(), "bmp")
