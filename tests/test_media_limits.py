"""Images are checked by their header before decoding: too many pixels or an extreme aspect ratio is one line, a large
allowed image is decoded reduced; the same loader serves the CLI, training data, eval and the server."""

from __future__ import annotations

import io
import time

import pytest
from PIL import Image

from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.core.media import MAX_DECODE_SIDE, load_image


def _png(w, h, mode="1"):
    buf = io.BytesIO()
    Image.new(mode, (w, h)).save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size,needle", [
    ((20000, 20000), "decompression bomb"),
    ((9000, 9000), "megapixels, above the limit"),
    ((1, 20000), "aspect ratio"),
    ((20000, 1), "aspect ratio"),
])
def test_unsafe_images_are_refused_by_header_in_one_line(size, needle):
    data = _png(*size)
    t0 = time.perf_counter()
    with pytest.raises(DiffusionVLError) as info:
        load_image(data)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - t0 < 2.0


def test_large_allowed_images_are_decoded_reduced(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("RGB", (5000, 3000), "red").save(path)
    img = load_image(str(path))
    assert img.mode == "RGB" and max(img.size) <= MAX_DECODE_SIDE and img.size == (2500, 1500)
    jpeg = tmp_path / "wide.jpg"
    Image.new("RGB", (5000, 3000), "blue").save(jpeg, quality=80)
    assert max(load_image(str(jpeg)).size) <= MAX_DECODE_SIDE


def test_ordinary_images_are_unchanged(tmp_path):
    Image.new("RGB", (640, 480), "green").save(tmp_path / "g.png")
    img = load_image(str(tmp_path / "g.png"))
    assert img.size == (640, 480) and img.getpixel((0, 0)) == (0, 128, 0)
