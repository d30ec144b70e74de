"""Settings of the OpenAI-compatible server (`diffusionvl serve`).

Contract: one typed dataclass, `ServeConfig`; every field has a help text and becomes a `--flag` of
`diffusionvl serve` (the decode defaults come from `DecodeConfig`, also as flags). `validate()` turns a bad value
into a one-line `DiffusionVLError`. Nothing here imports FastAPI.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from diffusionvl.core.config import option
from diffusionvl.core.errors import check
from diffusionvl.core.media import MAX_IMAGE_PIXELS


@dataclass
class ServeConfig:
    """How the server listens, batches and guards its inputs."""

    host: str = option("127.0.0.1", "Address to listen on (loopback by default; anything else exposes the model).")
    port: int = option(8000, "TCP port to listen on.")
    model_name: str | None = option(None, "Model id served under /v1/models (default: the model folder's name).")
    max_batch: int = option(8, "Most requests decoded together in one batch (dynamic batching).")
    max_active_batches: int = option(2, "Batches decoded at once, interleaved block by block, so a long answer cannot "
                                     "hold the decoder while new requests wait (1 = one batch at a time).")
    max_queue: int = option(64, "Most requests waiting for the decoder; more are refused with HTTP 429.")
    batch_wait_ms: float = option(
        5.0, "How long the decoder waits for more compatible requests before starting a batch that is not full.")
    max_tokens_limit: int = option(4096, "Largest max_tokens a request may ask for (larger: HTTP 400).")
    max_images: int = option(8, "Most images in one request.")
    max_image_pixels: int = option(MAX_IMAGE_PIXELS, "Largest image (width x height, read from its header before "
                                   "decoding) a request may send; at most the loader's own limit.")
    max_decoded_megapixels: float = option(
        32.0, "Most image pixels decoded at full size at once, over all requests, in megapixels (each image is "
        "reduced to the size the model uses as soon as it is decoded); more wait, at most --max-queue of them (then "
        "HTTP 429). At least --max-image-pixels.")
    tokenizer_threads: int = option(2, "Threads that render and tokenize prompts (each with its own tokenizer copy), "
                                    "shortest prompt first; the decode thread only sees token ids.")
    max_prompt_tokens: int = option(8192, "Most prompt tokens (text and image tokens, after the chat template) in "
                                    "one request; the model's context bounds it too.")
    max_block_size: int = option(64, "Largest block_size a request may ask for (the request's max_tokens rounded up "
                                 "to the model's block size bounds it too).")
    max_steps: int = option(64, "Most denoising steps per block a request may ask for.")
    max_request_mb: float = option(32.0, "Largest request body in MiB (larger: HTTP 413).")
    allow_local_images: str | None = option(
        None, "Folder whose files requests may name as images (file paths or file:// URLs); default: none allowed.")
    allow_remote_images: bool = option(False, "Let requests name http(s) image URLs, which the server downloads.",
                                       cli=False)  # a plain switch, added by the serve command

    def validate(self) -> "ServeConfig":
        check(isinstance(self.port, int) and 0 <= self.port < 65536, f"port must be in 0..65535, got {self.port!r}")
        check(self.max_batch >= 1, f"max_batch must be >= 1, got {self.max_batch}")
        check(self.max_active_batches >= 1, f"max_active_batches must be >= 1, got {self.max_active_batches}")
        check(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
        check(0 <= self.batch_wait_ms <= 60_000,
              f"batch_wait_ms must be in 0..60000 (a minute), got {self.batch_wait_ms}")
        check(self.max_tokens_limit >= 1, f"max_tokens_limit must be >= 1, got {self.max_tokens_limit}")
        check(self.max_images >= 0, f"max_images must be >= 0, got {self.max_images}")
        check(1 <= self.max_image_pixels <= MAX_IMAGE_PIXELS,
              f"max_image_pixels must be in 1..{MAX_IMAGE_PIXELS}, got {self.max_image_pixels}")
        check(self.max_image_pixels <= self.max_decoded_megapixels * 1e6 <= 1e11,
              f"max_decoded_megapixels must be at least max_image_pixels / 1e6 ({self.max_image_pixels / 1e6:g}: one "
              f"allowed image must fit) and at most 100000, got {self.max_decoded_megapixels}")
        check(self.tokenizer_threads >= 1, f"tokenizer_threads must be >= 1, got {self.tokenizer_threads}")
        check(self.max_prompt_tokens >= 1, f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")
        check(self.max_block_size >= 1, f"max_block_size must be >= 1, got {self.max_block_size}")
        check(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(self.max_request_mb > 0, f"max_request_mb must be > 0, got {self.max_request_mb}")
        if self.allow_local_images is not None:
            check(os.path.isdir(self.allow_local_images),
                  f"--allow-local-images must name an existing folder, got {self.allow_local_images!r}")
        return self


def limits_line(config: ServeConfig) -> str:
    """The per-request ceilings, as printed when the server starts."""
    return (f"limits per request: max_tokens <= {config.max_tokens_limit}, block_size <= {config.max_block_size} "
            f"(and <= max_tokens rounded up to the model's block size), steps <= {config.max_steps}, images <= "
            f"{config.max_images}, image pixels <= {config.max_image_pixels}, prompt tokens <= "
            f"{config.max_prompt_tokens}, body <= {config.max_request_mb:g} MiB; over all requests: decoded image "
            f"pixels <= {config.max_decoded_megapixels:g} megapixels at once, {config.tokenizer_threads} tokenizer "
            "threads")


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
