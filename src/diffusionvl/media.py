"""Loading images from what users pass: PIL images, file paths, bytes, data: URLs (and http(s) when allowed).

Contract: `load_image` returns an RGB `PIL.Image.Image` or raises a one-line `DiffusionVLError` naming the input
and the reason (missing file, not an image, truncated/corrupt, remote URL refused). It never returns a lazily
decoded image that could fail later, deep inside a processor.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any

from diffusionvl.errors import DiffusionVLError

MAX_IMAGE_BYTES = 64 * 1024 * 1024


def _decode(data: bytes, what: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise DiffusionVLError(f"{what} is not an image file PIL can read") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise DiffusionVLError(f"{what} is a corrupt or truncated image ({exc})") from None


def load_image(source: Any, *, allow_remote: bool = False, base_dir: str | os.PathLike[str] | None = None) -> Any:
    """Any supported image reference -> RGB PIL image (see module docstring)."""
    from PIL import Image

    if isinstance(source, Image.Image):
        return source.convert("RGB") if source.mode != "RGB" else source
    if isinstance(source, (bytes, bytearray)):
        return _decode(bytes(source), "image bytes")
    if isinstance(source, dict):  # {"url": ...} / {"image_url": {"url": ...}} / {"path": ...}
        inner = source.get("image_url", source)
        inner = inner.get("url", inner.get("path")) if isinstance(inner, dict) else inner
        return load_image(inner, allow_remote=allow_remote, base_dir=base_dir)
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
        return _decode(data, "image data URL")
    if text.startswith(("http://", "https://")):
        if not allow_remote:
            raise DiffusionVLError(f"remote image URLs are not allowed here: {text[:80]}")
        return _decode(_download(text), f"image at {text[:80]}")
    path = Path(base_dir, text) if base_dir is not None and not os.path.isabs(text) else Path(text)
    if not path.is_file():
        raise DiffusionVLError(f"image file not found: {path}")
    if path.stat().st_size > MAX_IMAGE_BYTES:
        raise DiffusionVLError(f"image file too large (> {MAX_IMAGE_BYTES >> 20} MiB): {path}")
    return _decode(path.read_bytes(), f"image file {path}")


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
