"""Loading images from what users pass: PIL images, file paths, bytes, data: URLs (and http(s) when allowed).

Contract: `load_image` returns an RGB `PIL.Image.Image` or raises a one-line `DiffusionVLError` naming the input
and the reason (missing file, not an image, truncated/corrupt, remote URL refused, too many pixels, extreme aspect
ratio). It never returns a lazily decoded image that could fail later, deep inside a processor. Encoded images
(files, bytes, data: and http(s) URLs) are checked by their header before any pixel is decoded: more than
`max_pixels` (width x height, default `MAX_IMAGE_PIXELS`) or a side ratio above `MAX_ASPECT_RATIO` is refused, and
an allowed image with a side above `MAX_DECODE_SIDE` is decoded at a reduced size (JPEG `draft`, else `reduce` by
an integer factor) so that a small file cannot expand into gigabytes. CLI, training data, eval and the server all
load images through here. PIL images passed in memory are used as they are.
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any, Iterator

from diffusionvl.core.errors import DiffusionVLError

MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 16_000_000  # width x height read from the header; larger images are refused before decoding
MAX_ASPECT_RATIO = 50.0  # long side / short side
MAX_DECODE_SIDE = 4096  # larger (allowed) images are decoded reduced by an integer factor


def check_image_header(width: int, height: int, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """One-line refusal of an image whose size alone makes it unsafe or useless to decode."""
    if width < 1 or height < 1:
        raise DiffusionVLError(f"{what} has no pixels ({width} x {height})")
    if width * height > max_pixels:
        unit, scale = ("megapixels", 1e6) if max_pixels >= 1e6 else ("pixels", 1)
        raise DiffusionVLError(f"{what} is {width} x {height} = {width * height / scale:.{1 if scale > 1 else 0}f} "
                               f"{unit}, above the limit of {max_pixels / scale:.{1 if scale > 1 else 0}f}; "
                               "downscale it first")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise DiffusionVLError(f"{what} is {width} x {height}: its aspect ratio {ratio:.0f}:1 is above "
                               f"{MAX_ASPECT_RATIO:.0f}:1, too extreme to resize into a model's input; crop it first")


def check_image_file(path: str | os.PathLike[str], max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Cheap pre-check of an image file without keeping its pixels: readable, within the header limits and intact
    (PIL `verify`: chunk checksums and truncation); a one-line `DiffusionVLError` otherwise."""
    _check_image(path, f"image file {path}", max_pixels)


def check_image_bytes(data: bytes, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """`check_image_file` for an image held in memory (a data URL's payload)."""
    _check_image(io.BytesIO(data), what, max_pixels)


def _check_image(source: Any, what: str, max_pixels: int) -> None:
    from PIL import Image

    with _image_errors(what), Image.open(source) as img:
        check_image_header(*img.size, what, max_pixels)
        img.verify()


@contextlib.contextmanager
def _image_errors(what: str) -> Iterator[None]:
    """PIL's many failure types -> one-line `DiffusionVLError`s naming `what`."""
    from PIL import Image, UnidentifiedImageError

    try:
        yield
    except DiffusionVLError:
        raise
    except UnidentifiedImageError:
        raise DiffusionVLError(f"{what} is not an image file PIL can read") from None
    except Image.DecompressionBombError as exc:
        raise DiffusionVLError(f"{what} is refused as a decompression bomb ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DiffusionVLError(f"{what} is a corrupt or truncated image ({exc})") from None


def _decode(data: bytes, what: str, max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    from PIL import Image

    with _image_errors(what), Image.open(io.BytesIO(data)) as img:
        check_image_header(*img.size, what, max_pixels)
        factor = math.ceil(max(img.size) / MAX_DECODE_SIDE)
        if factor > 1 and img.format == "JPEG":
            img.draft("RGB", (img.size[0] // factor, img.size[1] // factor))  # decodes at 1/2, 1/4 or 1/8
        img.load()
        out = img.convert("RGB")
        if max(out.size) > MAX_DECODE_SIDE:
            out = out.reduce(math.ceil(max(out.size) / MAX_DECODE_SIDE))
        return out


def is_file(path: str | os.PathLike[str]) -> bool:
    """`Path.is_file()` that answers False, not an exception, for a path no file can have (a NUL byte, a name longer
    than the file system allows, a component that is not a folder)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


def short(text: Any, limit: int = 200) -> str:
    """A user-given string cut for an error message (a 6 KB path is not echoed whole)."""
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


def load_image(source: Any, *, allow_remote: bool = False, base_dir: str | os.PathLike[str] | None = None,
               max_pixels: int = MAX_IMAGE_PIXELS) -> Any:
    """Any supported image reference -> RGB PIL image (see module docstring); `max_pixels` may lower the limit."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB") if source.mode != "RGB" else source
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), "image bytes", max_pixels)
    if isinstance(source, dict):  # {"url": ...} / {"image_url": {"url": ...}} / {"path": ...}
        inner = source.get("image_url", source)
        inner = inner.get("url", inner.get("path")) if isinstance(inner, dict) else inner
        return load_image(inner, allow_remote=allow_remote, base_dir=base_dir, max_pixels=max_pixels)
    if not isinstance(source, (str, os.PathLike)):
        raise DiffusionVLError(f"unsupported image input of type {type(source).__name__}: "
                               "pass a file path, a PIL image, bytes or a data: URL")
    text = os.fspath(source)
    if text.startswith("data:"):
        header, _, payload = text.partition(",")
        if ";base64" not in header or not payload:
            raise DiffusionVLError("image data URL must look like data:image/png;base64,<data>")
        try:
            data = base64.b64decode(payload, validate=True)
        except (ValueError, base64.binascii.Error):
            raise DiffusionVLError("image data URL holds invalid base64") from None
        return _decode(data, "image data URL", max_pixels)
    if text.startswith(("http://", "https://")):
        if not allow_remote:
            raise DiffusionVLError(f"remote image URLs are not allowed here: {text[:80]}")
        return _decode(_download(text), f"image at {text[:80]}", max_pixels)
    path = Path(base_dir, text) if base_dir is not None and not os.path.isabs(text) else Path(text)
    if not is_file(path):
        raise DiffusionVLError(f"image file not found: {short(path)}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise DiffusionVLError(f"image file too large (> {MAX_IMAGE_BYTES >> 20} MiB): {short(path)}")
    return _decode(path.read_bytes(), f"image file {short(path)}", max_pixels)


def _download(url: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=20) as resp:  # noqa: S310 - caller allowed remote images
            data = resp.read(MAX_IMAGE_BYTES + 1)
    except Exception as exc:  # noqa: BLE001
        raise DiffusionVLError(f"cannot download image {url[:80]}: {exc}") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise DiffusionVLError(f"remote image larger than {MAX_IMAGE_BYTES >> 20} MiB: {url[:80]}")
    return data
