"""Synthetic scenes: sample a structured description, then render it with PIL.

Contract:
- `sample_scene(rng, size)` is a pure function of a `random.Random` and the image size: it returns a `Scene`
  holding 1-4 non-overlapping objects (a shape in a saturated colour, centre and radius in integer pixels) and
  optionally one short text label (1-4 uppercase letters/digits), on a light background with an optional light
  texture. Every object lies inside its bounding circle (centre, radius); bounding circles and the text box never
  overlap and keep a gap of `gap_px(size)` pixels.
- `render_scene(scene)` is a pure function of the scene (the texture noise is seeded by `scene.texture_seed`):
  the same scene gives the same pixels. The pixel at an object's centre has exactly the object's palette colour.
- `Scene.to_dict()` / `Scene.from_dict()` round-trip the description through JSON (integers and strings only).
- The text font is found offline: matplotlib's bundled DejaVu Sans Bold, else Pillow's default FreeType font at the
  requested size, else Pillow's fixed bitmap font. `font_name()` says which one is in use (it is in the summary,
  because a different font moves the text box).
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from diffusionvl.core.errors import check
from diffusionvl.data.assets import package_data_path

# Saturated colours a small vision encoder separates easily (name -> RGB). Lower-case names are the answers.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20),
    "green": (20, 160, 40),
    "blue": (20, 60, 220),
    "yellow": (250, 210, 0),
    "purple": (130, 40, 180),
    "orange": (250, 120, 0),
    "cyan": (0, 185, 205),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross")
PLURALS = {shape: shape + ("es" if shape.endswith(("s", "x", "ch", "sh")) else "s") for shape in SHAPES}
# Light, unsaturated backgrounds, so that the background is never mistaken for an object colour.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "light gray": (228, 228, 228),
    "beige": (245, 238, 222),
    "pale blue": (226, 236, 246),
}
TEXTURES = ("plain", "gradient", "grid", "stripes", "speckle")
# Text alphabet without look-alikes (0/O/Q, 1/I), so that reading the text has one right answer.
TEXT_ALPHABET = "ABCDEFGHJKLMNPRSTUVWXYZ23456789"
TEXT_COLOUR = (17, 17, 17)
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 2048
MAX_OBJECTS = 4
_RADIUS_RANGE = (0.10, 0.15)  # object bounding radius as a fraction of the image size
_PLACEMENT_TRIES = 200


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    x: int  # centre, pixels from the left
    y: int  # centre, pixels from the top
    r: int  # radius of the bounding circle the shape lies in


@dataclass(frozen=True)
class TextLabel:
    text: str
    x: int  # draw origin (left-top anchor)
    y: int
    font_size: int
    box: tuple[int, int, int, int]  # ink box (x0, y0, x1, y1), used for non-overlap


@dataclass(frozen=True)
class Scene:
    size: int
    background: str
    texture: str
    texture_seed: int
    objects: tuple[SceneObject, ...]
    text: TextLabel | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["objects"] = [asdict(o) for o in self.objects]
        if self.text is not None:
            data["text"]["box"] = list(self.text.box)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scene":
        text = data.get("text")
        label = None if text is None else TextLabel(**{**text, "box": tuple(text["box"])})
        objects = tuple(SceneObject(**o) for o in data["objects"])
        return cls(data["size"], data["background"], data["texture"], data["texture_seed"], objects, label)


def check_image_size(size: int) -> None:
    """Raise a one-line `DiffusionVLError` unless `size` can hold 4 objects and a text label."""
    check(isinstance(size, int) and not isinstance(size, bool),
          f"image_size must be an integer number of pixels, got {size!r}")
    check(size >= MIN_IMAGE_SIZE,
          f"image_size {size} is too small to fit {MAX_OBJECTS} objects and a text label; use at least "
          f"{MIN_IMAGE_SIZE} pixels")
    check(size <= MAX_IMAGE_SIZE, f"image_size {size} is larger than {MAX_IMAGE_SIZE}; use a smaller image size")


def gap_px(size: int) -> int:
    """Smallest free margin between two items (and between an item and the border), in pixels."""
    return max(2, size // 40)


# ---------------------------------------------------------------------------------------------- fonts


@functools.lru_cache(maxsize=None)
def _font_and_name(size: int) -> tuple[Any, str]:
    path = package_data_path("matplotlib", "mpl-data", "fonts", "ttf", "DejaVuSans-Bold.ttf")
    if path is not None:
        try:
            return ImageFont.truetype(path, size), "DejaVuSans-Bold (matplotlib)"
        except OSError:  # Pillow built without FreeType
            pass
    try:
        return ImageFont.load_default(size=size), "Pillow default FreeType font"
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType: fixed-size bitmap font
        return ImageFont.load_default(), "Pillow bitmap font (fixed size)"


def load_font(size: int) -> Any:
    """The label font at `size` pixels (see the module contract for the fallback order)."""
    return _font_and_name(size)[0]


def font_name() -> str:
    return _font_and_name(32)[1]


# ---------------------------------------------------------------------------------------------- sampling


def sample_scene(rng: random.Random, size: int, text_probability: float = 0.35,
                 force_text: bool | None = None, repeat_probability: float = 0.0,
                 max_objects: int = MAX_OBJECTS) -> Scene:
    """Sample a scene description.

    `force_text` True/False overrides the text coin flip; `repeat_probability` is the chance that an object after
    the first copies an earlier object's shape (and, half of those times, its colour too), which spreads the
    answers of counting questions beyond 1. `max_objects` (1..MAX_OBJECTS) caps the number of objects (1: the
    one-object scenes of a recognition curriculum).
    """
    n_objects = rng.randint(1, max(1, min(max_objects, MAX_OBJECTS)))
    wants_text = rng.random() < text_probability if force_text is None else force_text
    background = rng.choice(sorted(BACKGROUNDS))
    texture = rng.choice(TEXTURES)
    texture_seed = rng.getrandbits(32)
    lo, hi = (max(3, round(f * size)) for f in _RADIUS_RANGE)
    specs = [(rng.choice(SHAPES), rng.choice(sorted(COLOURS)), rng.randint(lo, hi)) for _ in range(n_objects)]
    if repeat_probability > 0:
        specs = _with_repeats(rng, specs, repeat_probability)
    placed: list[tuple[int, int, int, int]] = []  # occupied boxes (x0, y0, x1, y1), bounding circles as squares
    label = _place_text(rng, size, placed) if wants_text else None
    objects = []
    for shape, colour, r in specs:
        centre = _place_circle(rng, size, r, placed)
        if centre is not None:
            objects.append(SceneObject(shape, colour, centre[0], centre[1], r))
    if not objects:  # cannot happen above MIN_IMAGE_SIZE; keeps the "at least one object" promise regardless
        objects.append(SceneObject(specs[0][0], specs[0][1], size // 2, size // 2, lo))
    return Scene(size, background, texture, texture_seed, tuple(objects), label)


def _with_repeats(rng: random.Random, specs: list, probability: float) -> list:
    out = specs[:1]
    for shape, colour, r in specs[1:]:
        if rng.random() < probability:
            model = rng.choice(out)
            shape, colour = model[0], model[1] if rng.random() < 0.5 else colour
        out.append((shape, colour, r))
    return out


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(1, 4)))


def _place_text(rng: random.Random, size: int, placed: list) -> TextLabel | None:
    text = random_text(rng)
    font_size = max(8, round(0.13 * size))
    x0, y0, x1, y1 = load_font(font_size).getbbox(text, anchor="lt")
    width, height, gap = x1 - x0, y1 - y0, gap_px(size)
    if width + 2 * gap > size or height + 2 * gap > size:
        return None
    x = rng.randint(gap - x0, size - gap - x1)
    y = rng.randint(gap - y0, size - gap - y1)
    box = (x + x0, y + y0, x + x1, y + y1)
    placed.append(box)
    return TextLabel(text, x, y, font_size, box)


def _place_circle(rng: random.Random, size: int, r: int, placed: list) -> tuple[int, int] | None:
    gap = gap_px(size)
    lo, hi = r + gap, size - 1 - r - gap
    if lo > hi:
        return None
    for _ in range(_PLACEMENT_TRIES):
        x, y = rng.randint(lo, hi), rng.randint(lo, hi)
        box = (x - r, y - r, x + r, y + r)
        if all(_boxes_apart(box, other, gap) for other in placed):
            placed.append(box)
            return x, y
    return None


def _boxes_apart(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


# ---------------------------------------------------------------------------------------------- rendering


def render_scene(scene: Scene) -> Image.Image:
    """Draw `scene` as an RGB image of `scene.size` x `scene.size` pixels."""
    image = Image.fromarray(_background(scene), "RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_shape(draw, obj)
    if scene.text is not None:
        label = scene.text
        draw.text((label.x, label.y), label.text, fill=TEXT_COLOUR, font=load_font(label.font_size), anchor="lt")
    return image


def _background(scene: Scene) -> np.ndarray:
    size, base = scene.size, np.array(BACKGROUNDS[scene.background], dtype=np.int16)
    rng = np.random.default_rng(scene.texture_seed)
    xx, yy = np.arange(size)[None, :], np.arange(size)[:, None]  # [1, W], [H, 1]
    shade = np.zeros((size, size), dtype=np.int16)  # [H, W] brightness offset
    if scene.texture == "gradient":
        axis = xx if rng.random() < 0.5 else yy
        shade = shade + (-14 * axis // max(1, size - 1))
    elif scene.texture == "grid":
        step = int(rng.integers(size // 10, size // 6 + 1))
        shade = np.where((xx % step == 0) | (yy % step == 0), -18, 0)
    elif scene.texture == "stripes":
        period = int(rng.integers(size // 16, size // 8 + 1))
        shade = np.where(((xx + yy) // max(1, period // 2)) % 2 == 0, -10, 0)
    elif scene.texture == "speckle":
        cell = max(2, size // 28)
        blocks = rng.integers(-8, 1, size=(size // cell + 1, size // cell + 1), dtype=np.int16)
        shade = np.repeat(np.repeat(blocks, cell, axis=0), cell, axis=1)[:size, :size]
    pixels = base[None, None, :] + shade[:, :, None].astype(np.int16)  # [H, W, 3]
    return np.clip(pixels, 0, 255).astype(np.uint8)


def shape_polygon(shape: str, x: int, y: int, r: int) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape inside the circle (x, y, r); the centre is always inside."""
    if shape == "square":
        h = 0.7 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return _regular(x, y, r, 3, -90)
    if shape == "diamond":
        return _regular(x, y, r, 4, -90)
    if shape == "hexagon":
        return _regular(x, y, r, 6, 0)
    if shape == "star":
        outer, inner = _regular(x, y, r, 5, -90), _regular(x, y, 0.45 * r, 5, -54)
        return [p for pair in zip(outer, inner) for p in pair]
    if shape == "cross":
        a, w = 0.9 * r, 0.3 * r
        return [(x - w, y - a), (x + w, y - a), (x + w, y - w), (x + a, y - w), (x + a, y + w), (x + w, y + w),
                (x + w, y + a), (x - w, y + a), (x - w, y + w), (x - a, y + w), (x - a, y - w), (x - w, y - w)]
    raise ValueError(f"unknown polygon shape {shape!r}")


def _regular(x: float, y: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    angles = [math.radians(start_deg + 360 * k / n) for k in range(n)]
    return [(x + r * math.cos(a), y + r * math.sin(a)) for a in angles]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        k = 0.9 * obj.r
        draw.ellipse((obj.x - k, obj.y - k, obj.x + k, obj.y + k), fill=fill)
    else:
        draw.polygon(shape_polygon(obj.shape, obj.x, obj.y, obj.r), fill=fill)
