"""Variable-resolution images for composed VLMs (LLaVA-NeXT / LLaVA-OneVision "anyres" tiling).

Contract:
- `ImageLayout` says how one image becomes tiles and visual tokens: `aspect` ("square" = one tile, resized as
  the tower's `ImageTransform` says; "pad" = one tile, padded to a square with the mean colour first; "anyres" /
  "anyres_max_N" = a base tile of the whole image + the image resized-and-padded onto the best grid resolution of
  `pinpoints` and cut into tile x tile crops), `merge` ("flat" = every tile's side x side tokens in tile order;
  "spatial_unpad" = base tokens, then the tiles' token grid stitched together, the padding rows/columns cut off,
  shrunk (bilinear) to about N tiles' worth of tokens for anyres_max_N, and a learned newline token after each row;
  a single-tile image gets one newline at its end), `multi_image` (the aspect used for each image of a prompt that
  holds several, "pad" as in the LLaVA-OneVision recipe), `tile` (pixels) and `side` (tokens per tile side).
- Pure math (tensors/ints in, ints out): `parse_pinpoints`, `best_resolution`, `grid_shape`, `unpad_bounds`,
  `shrunk_shape`, `ImageLayout.num_tokens(size, n_tiles)` = exactly the number of rows `assemble` returns, which the
  processor uses to expand the image placeholder (the engine scatters features at placeholder tokens one to one).
- Image side (PIL): `image_tiles(image, aspect, layout, pad_color) -> tiles` (each tile x tile pixels, base first,
  crops row-major). Model side: `assemble(features [n_tiles, side*side, D], size, layout, newline [D]) -> [T, D]`.
Sizes are (width, height) in pixels, as PIL gives them. The default layout (square, flat) is the fixed
tokens-per-image path of compose.py and never calls anything here.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from diffusionvl.core.errors import DiffusionVLError, check

Tensor = torch.Tensor
ASPECTS = ("square", "pad", "anyres")  # + "anyres_max_N"
MERGES = ("flat", "spatial_unpad")
_MAX = re.compile(r"^anyres_max_(\d+)$")
_RANGE = re.compile(r"\((\d+)x(\d+)\)")


def max_tiles(aspect: str) -> int | None:
    """N of "anyres_max_N" (None for any other aspect)."""
    found = _MAX.match(aspect)
    return int(found.group(1)) if found else None


def is_anyres(aspect: str) -> bool:
    return aspect == "anyres" or max_tiles(aspect) is not None


def parse_pinpoints(value: Any, tile: int) -> tuple[tuple[int, int], ...]:
    """Candidate (width, height) resolutions from a list of pairs, a literal string of one, or the range form
    "(1x1),...,(6x6)" (every (i, j) from the first to the last pair, times `tile` pixels)."""
    if value is None:
        return ()
    if isinstance(value, str) and "x" in value:
        pairs = _RANGE.findall(value)
        check(len(pairs) >= 1, f"cannot read image_grid_pinpoints {value!r}")
        (a0, b0), (a1, b1) = (tuple(map(int, p)) for p in (pairs[0], pairs[-1]))
        return tuple((i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1))
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise DiffusionVLError(f"cannot read image_grid_pinpoints {value!r}") from None
    try:
        out = tuple((int(w), int(h)) for w, h in value)
    except (TypeError, ValueError):
        raise DiffusionVLError(f"image_grid_pinpoints must be [[width, height], ...], got {value!r}") from None
    return out


def best_resolution(size: tuple[int, int], candidates: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The candidate that keeps the most of the image's pixels when it is scaled to fit (ties: least padding)."""
    width, height = size
    best, best_kept, best_waste = candidates[0], -1, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (cand_w, cand_h), kept, waste
    return best


def grid_shape(size: tuple[int, int], pinpoints: tuple[tuple[int, int], ...], tile: int) -> tuple[int, int]:
    """(columns, rows) of tiles for an image of `size`."""
    width, height = best_resolution(size, pinpoints)
    return width // tile, height // tile


def unpad_bounds(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the part of a height x width token grid that shows the image (the rest is the
    padding that made the image fit its grid resolution)."""
    orig_w, orig_h = size
    if orig_w / orig_h > width / height:  # padding above and below
        kept = int(orig_h * (width / orig_w))
        pad = (height - kept) // 2
        return pad, height - pad, 0, width
    kept = int(orig_w * (height / orig_h))  # padding left and right
    pad = (width - kept) // 2
    return 0, height, pad, width - pad


def shrunk_shape(height: int, width: int, limit: int | None, side: int) -> tuple[int, int] | None:
    """anyres_max_N: the (height, width) a grid larger than about N tiles is resized to, or None to keep it."""
    if limit is None:
        return None
    times = math.sqrt(height * width / (limit * side ** 2))
    if times <= 1.1:
        return None
    return int(height // times), int(width // times)


@dataclass(frozen=True)
class ImageLayout:
    """How images become tiles and visual tokens (module docstring)."""

    aspect: str = "square"
    pinpoints: tuple[tuple[int, int], ...] = ()
    merge: str = "flat"
    multi_image: str = "pad"
    tile: int = 224
    side: int = 7

    @property
    def is_default(self) -> bool:
        """One tile per image, tokens flattened: the fixed tokens-per-image path."""
        return self.aspect == "square" and self.merge == "flat"

    def validate(self) -> "ImageLayout":
        for name, aspect in (("image_aspect_ratio", self.aspect), ("multi_image_aspect_ratio", self.multi_image)):
            check(aspect in ASPECTS or is_anyres(aspect),
                  f"{name} must be square, pad, anyres or anyres_max_N, got {aspect!r}")
        check(self.merge in MERGES, f"patch_merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        if is_anyres(self.aspect) or is_anyres(self.multi_image):
            check(bool(self.pinpoints), "anyres images need image_grid_pinpoints ([[width, height], ...])")
            bad = [list(p) for p in self.pinpoints if p[0] % self.tile or p[1] % self.tile or min(p) <= 0]
            if bad:
                raise DiffusionVLError(f"image_grid_pinpoints must be positive multiples of the tile size "
                                       f"{self.tile}, got {bad[0]}")
        return self

    def aspect_for(self, images_in_prompt: int) -> str:
        return self.aspect if images_in_prompt <= 1 else self.multi_image

    def merged_shape(self, size: tuple[int, int]) -> tuple[int, int]:
        """(height, width) in tokens of the stitched, unpadded (and maybe shrunk) tile grid of one image."""
        cols, rows = grid_shape(size, self.pinpoints, self.tile)
        top, bottom, left, right = unpad_bounds(rows * self.side, cols * self.side, size)
        height, width = bottom - top, right - left
        return shrunk_shape(height, width, max_tiles(self.aspect), self.side) or (height, width)

    def num_tokens(self, size: tuple[int, int], n_tiles: int) -> int:
        """Visual tokens one image gives (its placeholder count)."""
        per_tile = self.side ** 2
        if self.merge == "flat":
            return n_tiles * per_tile
        if n_tiles == 1:
            return per_tile + 1  # + one newline
        height, width = self.merged_shape(size)
        return per_tile + height * (width + 1)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["pinpoints"] = [list(p) for p in self.pinpoints]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageLayout":
        return cls(aspect=data["aspect"], pinpoints=tuple(tuple(p) for p in data.get("pinpoints") or ()),
                   merge=data["merge"], multi_image=data.get("multi_image", "pad"), tile=int(data["tile"]),
                   side=int(data["side"])).validate()


# ---------------------------------------------------------------------------------------------------- pixels


def expand_to_square(image: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """The image centred on a square canvas of `color` (side = its longer side)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), color)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Scale the image to fit `target` (width, height) keeping its aspect ratio, centred on black."""
    width, height = image.size
    target_w, target_h = target
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * (target_w / width)), target_h)
    else:
        new_w, new_h = min(math.ceil(width * (target_h / height)), target_w), target_h
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(image.resize((new_w, new_h), Image.BICUBIC), ((target_w - new_w) // 2, (target_h - new_h) // 2))
    return canvas


def split_tiles(image: Image.Image, tile: int) -> list[Image.Image]:
    """tile x tile crops, row by row."""
    width, height = image.size
    return [image.crop((x, y, x + tile, y + tile)) for y in range(0, height, tile) for x in range(0, width, tile)]


def image_tiles(image: Image.Image, aspect: str, layout: ImageLayout,
                pad_color: tuple[int, int, int]) -> list[Image.Image]:
    """One image -> its tiles: [image] (square), [padded square] (pad), or [base] + grid crops (anyres)."""
    image = image.convert("RGB")
    if aspect == "square":
        return [image]
    if aspect == "pad":
        return [expand_to_square(image, pad_color)]
    base = image.resize((layout.tile, layout.tile), Image.BICUBIC)
    grid = resize_and_pad(image, best_resolution(image.size, layout.pinpoints))
    return [base] + split_tiles(grid, layout.tile)


# -------------------------------------------------------------------------------------------------- features


def assemble(features: Tensor, size: tuple[int, int], layout: ImageLayout, newline: Tensor | None) -> Tensor:
    """Visual tokens of one image's tiles [n_tiles, side*side, D] -> its token sequence [T, D] (module docstring);
    T == layout.num_tokens(size, n_tiles)."""
    n_tiles, dim = features.shape[0], features.shape[-1]
    if layout.merge == "flat":
        return features.flatten(0, 1)
    check(newline is not None, "spatial_unpad merging needs the model's image_newline parameter")
    newline = newline.to(features.dtype)
    if n_tiles == 1:
        return torch.cat([features[0], newline[None]])  # [side^2 + 1, D]
    cols, rows = grid_shape(size, layout.pinpoints, layout.tile)
    check(cols * rows == n_tiles - 1, f"an image of size {size} has {n_tiles - 1} tiles, expected {cols * rows}: "
                                      "pixel values and image sizes do not belong together")
    s = layout.side
    grid = features[1:].view(rows, cols, s, s, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * s, cols * s)
    top, bottom, left, right = unpad_bounds(rows * s, cols * s, size)
    grid = grid[:, top:bottom, left:right]  # [D, h, w]
    shrunk = shrunk_shape(grid.shape[1], grid.shape[2], max_tiles(layout.aspect), s)
    if shrunk is not None:
        grid = F.interpolate(grid[None], size=list(shrunk), mode="bilinear")[0]
    rows_nl = torch.cat([grid, newline.view(dim, 1, 1).expand(dim, grid.shape[1], 1)], dim=2)  # [D, h, w + 1]
    return torch.cat([features[0], rows_nl.flatten(1).t()])  # [side^2 + h * (w + 1), D]
