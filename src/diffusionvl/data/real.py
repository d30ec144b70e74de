"""Real photographs that ship inside installed packages, with short hand-written captions and questions.

Contract:
- `CATALOGUE` lists the images (files bundled with scikit-image's `skimage.data` and matplotlib's sample data),
  each with caption variants (canonical first) and a few questions with exact short answers, lower-case.
- `available_real_images()` returns `(names, missing)`: the catalogue images present offline (sorted) and
  `"name (reason)"` for those that are not (package not installed, file absent). A missing optional package only
  shrinks the set; it is logged once as a warning, never raised. Nothing is decoded until `load_real_image(name)`
  (cached) is called, and neither package is imported.
- `real_view(image, entry, rng, size)` is a pure function: a light random crop (85-100 % of each side, when the
  entry allows it) and mirror (when allowed), scaled to fit and centred on a `size` x `size` black canvas, so the
  answers stay true for every view. `real_qa(entry, rng)` picks a caption prompt or one of the entry's questions.
"""

from __future__ import annotations

import functools
import logging
import random
from dataclasses import dataclass

from PIL import Image

from diffusionvl.data.assets import package_data_path
from diffusionvl.data.questions import QA

log = logging.getLogger(__name__)

# package -> (pip name for messages, folder of its bundled images inside the package)
PACKAGES = {"skimage": ("scikit-image", ("data",)), "matplotlib": ("matplotlib", ("mpl-data", "sample_data"))}
CAPTION_PROMPTS = ("Describe the image in a few words.", "Give a short caption for this image.",
                   "What does this picture show?", "Write a short caption.")


@dataclass(frozen=True)
class RealImage:
    name: str
    package: str  # "skimage" or "matplotlib" (see PACKAGES)
    ref: str  # file name in that package's image folder
    captions: tuple[str, ...]
    qas: tuple[tuple[str, tuple[str, ...]], ...]
    flip: bool = True  # may be mirrored (no writing, flags or logos)
    crop: bool = True  # may be cropped (nothing important at the border)


def _entry(name, package, ref, captions, qas, flip=True, crop=True) -> RealImage:
    return RealImage(name, package, ref, tuple(captions), tuple((q, tuple(a)) for q, a in qas), flip, crop)


CATALOGUE: tuple[RealImage, ...] = (
    _entry("astronaut", "skimage", "astronaut.png",
           ["an astronaut", "astronaut", "an astronaut in an orange spacesuit"],
           [("What is the job of the person in the image?", ["astronaut", "an astronaut"]),
            ("What colour is the spacesuit?", ["orange"])], flip=False),
    _entry("chelsea", "skimage", "chelsea.png", ["a cat", "cat", "a tabby cat"],
           [("What animal is this?", ["cat", "a cat"]), ("Is this a dog?", ["no"])]),
    _entry("coffee", "skimage", "coffee.png", ["a cup of coffee", "coffee", "a coffee cup"],
           [("What drink is in the cup?", ["coffee", "espresso"]), ("What colour is the saucer?", ["red"])]),
    _entry("rocket", "skimage", "rocket.jpg", ["a rocket on a launch pad", "a rocket"],
           [("What vehicle is shown?", ["rocket", "a rocket"])]),
    _entry("camera", "skimage", "camera.png", ["a man with a camera", "a photographer", "a cameraman"],
           [("What is the man using?", ["camera", "a camera"]),
            ("Is the photo in colour or black and white?", ["black and white", "grayscale"])]),
    _entry("horse", "skimage", "horse.png", ["a horse silhouette", "a horse", "a black horse"],
           [("What animal is this?", ["horse", "a horse"]), ("What colour is the animal?", ["black"])]),
    _entry("coins", "skimage", "coins.png", ["coins", "old coins", "rows of coins"],
           [("What objects are shown?", ["coins"])]),
    _entry("moon", "skimage", "moon.png", ["the surface of the moon", "the moon"],
           [("Which celestial body is shown?", ["moon", "the moon"])]),
    _entry("page", "skimage", "page.png", ["a page of printed text", "printed text"],
           [("Is the text handwritten or printed?", ["printed"])], flip=False),
    _entry("text", "skimage", "text.png", ["handwritten equations", "handwritten math"],
           [("Is the text handwritten or printed?", ["handwritten"])], flip=False),
    _entry("clock", "skimage", "clock_motion.png", ["a blurry clock", "a clock"],
           [("What object is this?", ["clock", "a clock"])]),
    _entry("galaxies", "skimage", "hubble_deep_field.jpg", ["galaxies in deep space", "galaxies", "space"],
           [("Where was this picture taken?", ["space", "in space"])]),
    _entry("tissue", "skimage", "ihc.png", ["cells under a microscope", "stained tissue"],
           [("What instrument was used to take this image?", ["microscope", "a microscope"])]),
    _entry("retina", "skimage", "retina.jpg", ["a retina", "the back of an eye"],
           [("Which organ is shown?", ["eye", "the eye", "retina"])]),
    _entry("brick", "skimage", "brick.png", ["a brick wall", "bricks"],
           [("What is the wall made of?", ["bricks", "brick"])]),
    _entry("grass", "skimage", "grass.png", ["grass", "a patch of grass"], [("What plant is this?", ["grass"])]),
    _entry("gravel", "skimage", "gravel.png", ["gravel", "small stones"],
           [("What covers the ground?", ["gravel", "stones"])]),
    _entry("skimage_logo", "skimage", "logo.png", ["the scikit-image logo", "a logo"],
           [("Which two colours dominate the logo?", ["green and orange", "orange and green"])], flip=False),
    _entry("colorwheel", "skimage", "color.png", ["a colour wheel", "a color wheel"],
           [("What shape is the colour wheel?", ["circle", "round"])]),
    _entry("cell", "skimage", "cell.png", ["a single cell", "a cell under a microscope"],
           [("What is shown in the image?", ["cell", "a cell"])], crop=False),
    _entry("checkerboard", "skimage", "chessboard_GRAY.png", ["a checkerboard", "a chessboard pattern"],
           [("What pattern is this?", ["checkerboard", "chessboard"]),
            ("Which two colours are used?", ["black and white", "white and black"])]),
    _entry("motorcycle", "skimage", "motorcycle_left.png", ["a red motorcycle", "a motorcycle", "a motorbike"],
           [("What vehicle is this?", ["motorcycle", "motorbike"]), ("What colour is the motorcycle?", ["red"])]),
    _entry("grace_hopper", "matplotlib", "grace_hopper.jpg", ["a woman in a navy uniform", "a portrait of a woman"],
           [("Is the person wearing glasses?", ["yes"]), ("Is the person a man or a woman?", ["woman", "a woman"])],
           flip=False),
    _entry("matplotlib_logo", "matplotlib", "logo2.png", ["the matplotlib logo", "a logo"],
           [("What word is written in the image?", ["matplotlib"])], flip=False, crop=False),
    _entry("gift", "matplotlib", "Minduka_Present_Blue_Pack.png", ["a blue gift box", "a present", "a gift"],
           [("What colour is the box?", ["blue"]), ("What is this?", ["gift", "present", "gift box", "a gift"])]),
)
BY_NAME = {entry.name: entry for entry in CATALOGUE}


def available_real_images() -> tuple[list[str], list[str]]:
    """Names of the catalogue images present offline, and `"name (reason)"` for the others."""
    names, missing = [], []
    for entry in CATALOGUE:
        if _path(entry) is not None:
            names.append(entry.name)
        elif package_data_path(entry.package, "__init__.py") is None:
            missing.append(f"{entry.name} ({PACKAGES[entry.package][0]} not installed)")
        else:
            missing.append(f"{entry.name} ({entry.ref} not found in {PACKAGES[entry.package][0]})")
    if missing:
        log.warning("%d real images unavailable, the real-image set shrinks: %s", len(missing), ", ".join(missing))
    return sorted(names), sorted(missing)


@functools.lru_cache(maxsize=None)
def load_real_image(name: str) -> Image.Image:
    """The catalogue image `name` as RGB (RGBA composited on white). Raises OSError if it cannot be read."""
    entry = BY_NAME[name]
    path = _path(entry)
    if path is None:
        raise FileNotFoundError(f"{entry.ref} not found in {PACKAGES[entry.package][0]}")
    with Image.open(path) as image:
        image.load()
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(canvas, image).convert("RGB")
        return image.convert("RGB")


def _path(entry: RealImage) -> str | None:
    return package_data_path(entry.package, *PACKAGES[entry.package][1], entry.ref)


def real_view(image: Image.Image, entry: RealImage, rng: random.Random, size: int) -> Image.Image:
    """A randomly cropped / mirrored view of `image`, letterboxed into `size` x `size` pixels."""
    width, height = image.size
    if entry.crop:
        w, h = round(width * rng.uniform(0.85, 1.0)), round(height * rng.uniform(0.85, 1.0))
        left, top = rng.randint(0, width - w), rng.randint(0, height - h)
        image = image.crop((left, top, left + w, top + h))
    if entry.flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = size / max(image.size)
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    image = image.resize(new_size, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (size, size))
    canvas.paste(image, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def real_qa(entry: RealImage, rng: random.Random, caption_probability: float = 0.5) -> QA:
    """A caption request (type "caption") or one of the entry's own questions (type "real")."""
    if rng.random() < caption_probability:
        return QA("caption", rng.choice(CAPTION_PROMPTS), entry.captions)
    question, answers = rng.choice(entry.qas)
    return QA("real", question, answers)
