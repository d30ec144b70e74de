"""OpenAI-compatible serving of a DiffusionVLModel: `create_app` (FastAPI) over a dynamic-batching `DecodeEngine`.

Contract: importing this package does not import FastAPI; `create_app` does (install the `serve` extra). See
`app.py` (HTTP API), `engine.py` (bounded queue, batching, streaming, stop strings), `images.py` (which image
sources a request may use), `schema.py` (wire format), `config.py` (`ServeConfig`), and docs/serving.md.
"""

from __future__ import annotations

from typing import Any

from diffusionvl.jobs.serve.config import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def create_app(*args: Any, **kwargs: Any) -> Any:
    from diffusionvl.jobs.serve.app import create_app as _create

    return _create(*args, **kwargs)
