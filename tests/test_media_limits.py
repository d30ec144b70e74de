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


def test_a_decoded_image_is_reduced_at_once_to_what_the_model_keeps_under_the_hold():
    """fit = (pixels, short side) the model's processor keeps: a 3999 x 3999 1-bit PNG becomes 115 x 115 (>= 12544
    pixels) inside the loader, and `hold` is held with the header's pixel count while the full-size pixels exist."""
    import contextlib

    held = []

    @contextlib.contextmanager
    def hold(pixels):
        held.append(pixels)
        yield

    img = load_image(_png(3999, 3999), fit=(112 * 112, 0), hold=hold)
    assert img.mode == "RGB" and img.size == (115, 115) and held == [3999 * 3999]
    square = load_image(_png(4000, 1000, "RGB"), fit=(0, 224))  # a square-resizing tower keeps the short side
    assert square.size == (1000, 250)
    small = load_image(_png(84, 70, "RGB"), fit=(112 * 112, 0))
    assert small.size == (84, 70)  # never below what the model keeps


def test_the_pixel_budget_holds_at_most_its_capacity_smallest_first_and_bounds_its_waiting_line():
    import threading

    from diffusionvl.jobs.serve.engine import QueueFull
    from diffusionvl.jobs.serve.prepare import PixelBudget

    budget = PixelBudget(capacity=100, max_waiting=2)
    order, peak, lock = [], [0], threading.Lock()
    release = threading.Event()

    def take(pixels):
        with budget.hold(pixels):
            with lock:
                order.append(pixels)
                peak[0] = max(peak[0], budget.used)
            release.wait(5)

    first = threading.Thread(target=take, args=(90,))
    first.start()
    while budget.used != 90:
        time.sleep(0.001)
    waiting = [threading.Thread(target=take, args=(p,)) for p in (60, 20)]
    for t in waiting:
        t.start()
    while len(budget._waiting) != 2:
        time.sleep(0.001)
    with pytest.raises(QueueFull, match="waiting to be decoded"):
        with budget.hold(10):
            pass
    release.set()
    for t in [first, *waiting]:
        t.join(5)
    assert order == [90, 20, 60] and peak[0] <= 100 and budget.used == 0
