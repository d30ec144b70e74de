"""diffusionvl: translate autoregressive (vision-)language models into block-diffusion VLMs.

Public API (imported lazily so that `import diffusionvl` and the CLI start fast):

    diffusionvl.convert(src, dst, block_size=8)   # AR checkpoint -> diffusion checkpoint on disk
    diffusionvl.load(path)                        # -> DiffusionVLModel
    diffusionvl.wrap(hf_model, tokenizer)         # in-memory conversion of an already loaded AR model
    model.generate(...), model.stream(...), model.training_loss(batch)
"""

from __future__ import annotations

import importlib
from typing import Any

from diffusionvl.core.version import __version__

_LAZY = {
    "convert": "diffusionvl.model.conversion",
    "load": "diffusionvl.model.conversion",
    "wrap": "diffusionvl.model.wrapping",
    "make_tiny": "diffusionvl.backbone.tiny",
    "DiffusionVLModel": "diffusionvl.model.modeling",
    "DiffusionConfig": "diffusionvl.core.config",
    "DecodeConfig": "diffusionvl.core.config",
    "GenerationOutput": "diffusionvl.decoding",
    "DiffusionVLError": "diffusionvl.core.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusionvl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
