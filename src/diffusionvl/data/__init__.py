"""Training and evaluation data.

Contract: `generate_dataset(out_dir, n_train, n_val, n_test, seed, image_size, ...)` writes the deterministic
synthetic visual QA dataset (LLaVA JSON for training, JSONL for exact-match evaluation; see
`diffusionvl.data.synth`). Scenes (`diffusionvl.data.scene`), question templates (`diffusionvl.data.questions`),
real offline photographs (`diffusionvl.data.real`) and text-only questions (`diffusionvl.data.textonly`) are pure
functions of a `random.Random`; only `synth.generate_dataset` touches the disk. Names are imported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "generate_dataset": "diffusionvl.data.synth",
    "make_sample": "diffusionvl.data.synth",
    "Scene": "diffusionvl.data.scene",
    "sample_scene": "diffusionvl.data.scene",
    "render_scene": "diffusionvl.data.scene",
    "QA": "diffusionvl.data.questions",
    "QUESTION_TYPES": "diffusionvl.data.questions",
    "ask": "diffusionvl.data.questions",
    "load_real_images": "diffusionvl.data.real",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusionvl.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
