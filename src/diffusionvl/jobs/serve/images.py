"""Which images a server request may reference, and loading them.

Contract: `ImagePolicy.load(url)` turns the `url` of an OpenAI `image_url` content part into an RGB PIL image or
raises a one-line `DiffusionVLError` (the server answers HTTP 400):
- `data:image/...;base64,...` URLs are always accepted;
- `http(s)://` URLs only when the server allows remote images;
- local files (`file://` URLs or plain paths, relative ones taken from the allowed folder) only when the server
  was given a folder, and only if the file's real path (symlinks resolved) lies inside that folder's real path;
- anything else (other URL schemes) is refused.
Decoding goes through `core.media.load_image` with the policy's `fit` (images reduced to what the model keeps as
soon as they are decoded) and `hold` (the server's global pixel budget, prepare.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlparse

from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.core.media import MAX_IMAGE_PIXELS, Fit, Hold, load_image, short


@dataclass(frozen=True)
class ImagePolicy:
    local_root: str | None = None  # real path of the folder local images must live in; None = no local files
    allow_remote: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS  # width x height, read from the header before anything is decoded
    fit: Fit | None = None  # (pixels, short side) the model keeps: decoded images are reduced to it at once
    hold: Hold | None = None  # held while an image's full-size pixels exist (the global pixel budget)

    @classmethod
    def create(cls, local_dir: str | os.PathLike[str] | None, allow_remote: bool,
               max_pixels: int = MAX_IMAGE_PIXELS, fit: Fit | None = None, hold: Hold | None = None) -> "ImagePolicy":
        root = os.path.realpath(os.fspath(local_dir)) if local_dir is not None else None
        return cls(root, allow_remote, max_pixels, fit, hold)

    def _load(self, source: str, allow_remote: bool = False) -> Any:
        return load_image(source, allow_remote=allow_remote, max_pixels=self.max_pixels, fit=self.fit, hold=self.hold)

    def load(self, url: str) -> Any:
        if not isinstance(url, str) or not url:
            raise DiffusionVLError("image_url.url must be a non-empty string")
        if url.startswith("data:"):
            return self._load(url)
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.allow_remote:
                raise DiffusionVLError("remote image URLs are refused by this server (start it with "
                                       "--allow-remote-images to allow them); send the image as a data: URL")
            return self._load(url, allow_remote=True)
        if scheme == "file":
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise DiffusionVLError(f"file URL with a remote host is not supported: {url[:80]}")
            return self._load_local(unquote(parsed.path))
        if len(scheme) > 1:  # a one-letter "scheme" is a Windows drive letter
            raise DiffusionVLError(f"unsupported image URL scheme {scheme!r}: use a data: URL")
        return self._load_local(url)

    def _load_local(self, path: str) -> Any:
        if self.local_root is None:
            raise DiffusionVLError("local image paths are refused by this server (start it with "
                                   "--allow-local-images DIR to allow files under DIR); send a data: URL")
        try:
            real = os.path.realpath(os.path.join(self.local_root, path))  # an absolute `path` replaces the root
        except (OSError, ValueError):  # a NUL byte, a name too long for the file system
            raise DiffusionVLError(f"invalid image path: {short(path, 120)}") from None
        if os.path.commonpath([real, self.local_root]) != self.local_root:
            raise DiffusionVLError("image path is outside the folder this server allows images from: "
                                   f"{short(path, 120)}")
        return self._load(real)
