"""Loading images from what users pass: PIL images, file paths, bytes, data: URLs (and http(s) when allowed).

Contract: `load_image` returns an RGB `PIL.Image.Image` or raises a one-line `DiffusionVLError` naming the input
and the reason (missing file, not an image, truncated/corrupt, remote URL refused, too many pixels, extreme aspect
ratio). It never returns a lazily decoded image that could fail later, deep inside a processor. Encoded images
(files, bytes, data: and http(s) URLs) are checked by their header before any pixel is decoded: more than
`max_pixels` (width x height, default `MAX_IMAGE_PIXELS`) or a side ratio above `MAX_ASPECT_RATIO` is refused, and
an allowed image with a side above `MAX_DECODE_SIDE` is decoded at a reduced size (JPEG `draft`, else `reduce` by
an integer factor) so that a small file cannot expand into gigabytes. CLI, training data, eval and the server all
load images through here. PIL images passed in memory are used as they are.
Two options serve a caller that bounds memory (the server): `fit` = (pixels, short side) reduces a decoded image
at once, by the largest integer factor that keeps at least that many pixels and that short side (what the model's
processor keeps: it would downsize anything larger anyway), so the full-size pixels die inside the loader;
`hold(pixels)` is a context manager held, with the header's pixel count, while the full-size pixels exist (a
global budget waits or refuses).
"""

from __future__ import annotations

import base64
import contextlib
import io
import math
import os
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator

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


Hold = Callable[[int], ContextManager[Any]]  # pixels -> held while that many full-size pixels exist
Fit = tuple[int, int]  # (pixels, short side) a reduced image keeps at least; 0 = no bound of that kind


def reduce_factor(width: int, height: int, fit: Fit | None = None) -> int:
    """The integer factor an image is decoded reduced by: enough to bring its long side to `MAX_DECODE_SIDE`, and
    as much as keeps at least `fit` = (pixels, short side) (a processor that keeps no more loses nothing)."""
    factor = math.ceil(max(width, height) / MAX_DECODE_SIDE)
    if fit is not None and (fit[0] or fit[1]):
        by_area = math.isqrt(width * height // fit[0]) if fit[0] else width * height
        by_side = min(width, height) // fit[1] if fit[1] else width * height
        factor = max(factor, min(by_area, by_side))
    return max(factor, 1)


def _decode(data: bytes, what: str, max_pixels: int = MAX_IMAGE_PIXELS, fit: Fit | None = None,
            hold: Hold | None = None) -> Any:
    from PIL import Image

    with _image_errors(what), Image.open(io.BytesIO(data)) as img:
        check_image_header(*img.size, what, max_pixels)
        with hold(img.size[0] * img.size[1]) if hold is not None else contextlib.nullcontext():
            return _reduced_rgb(img, fit)


def _reduced_rgb(img: Any, fit: Fit | None) -> Any:
    """The opened image decoded, reduced by `reduce_factor` (JPEG: partly while decoding, by `draft`) and converted
    to RGB; grey and 1-bit images are reduced before their RGB copy (3 bytes a pixel) is made."""
    factor = reduce_factor(*img.size, fit)
    if factor > 1 and img.format == "JPEG":
        img.draft("RGB", (img.size[0] // factor, img.size[1] // factor))  # decodes at 1/2, 1/4 or 1/8
    img.load()
    factor = reduce_factor(*img.size, fit)  # what the draft left to do
    out = img.convert("L") if img.mode in ("1", "L") else img.convert("RGB")
    if factor > 1:
        out = out.reduce(factor)
    return out.convert("RGB") if out.mode != "RGB" else out


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
               max_pixels: int = MAX_IMAGE_PIXELS, fit: Fit | None = None, hold: Hold | None = None) -> Any:
    """Any supported image reference -> RGB PIL image (see module docstring); `max_pixels` may lower the limit,
    `fit` and `hold` bound the memory decoding takes."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB") if source.mode != "RGB" else source
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), "image bytes", max_pixels, fit, hold)
    if isinstance(source, dict):  # {"url": ...} / {"image_url": {"url": ...}} / {"path": ...}
        inner = source.get("image_url", source)
        inner = inner.get("url", inner.get("path")) if isinstance(inner, dict) else inner
        return load_image(inner, allow_remote=allow_remote, base_dir=base_dir, max_pixels=max_pixels,
                          fit=fit, hold=hold)
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
        return _decode(data, "image data URL", max_pixels, fit, hold)
    if text.startswith(("http://", "https://")):
        if not allow_remote:
            raise DiffusionVLError(f"remote image URLs are not allowed here: {text[:80]}")
        return _decode(_download(text), f"image at {text[:80]}", max_pixels, fit, hold)
    path = Path(base_dir, text) if base_dir is not None and not os.path.isabs(text) else Path(text)
    if not is_file(path):
        raise DiffusionVLError(f"image file not found: {short(path)}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise DiffusionVLError(f"image file too large (> {MAX_IMAGE_BYTES >> 20} MiB): {short(path)}")
    return _decode(path.read_bytes(), f"image file {short(path)}", max_pixels, fit, hold)


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
