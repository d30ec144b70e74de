"""Diffusion finetuning: LLaVA / OpenAI-messages data -> BD3 training on accelerate -> HF checkpoints.

Contract: `train(TrainConfig(...))` runs one job and returns its summary (see `diffusionvl.jobs.train.trainer`);
`TrainConfig` holds every knob (CLI flags and YAML/JSON files come from it); `merge_lora(adapter, output)` folds a
LoRA adapter checkpoint into a full model; `accelerate_config(name)` is the path of a packaged example accelerate
config ("ddp", "fsdp", "zero3"). Modules: data (files -> records -> dataset), encode (record -> ids/labels),
collator, sampler, noise (split-invariant masking noise), parts (freezing, LoRA), checkpoint, tracking, trainer.
Names are imported lazily so that `import diffusionvl.jobs.train` stays cheap.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

_LAZY = {
    "train": "diffusionvl.jobs.train.trainer",
    "Trainer": "diffusionvl.jobs.train.trainer",
    "TrainConfig": "diffusionvl.jobs.train.config",
    "merge_lora": "diffusionvl.jobs.train.checkpoint",
    "read_records": "diffusionvl.jobs.train.data",
    "SampleEncoder": "diffusionvl.jobs.train.encode",
    "Collator": "diffusionvl.jobs.train.collator",
}

ACCELERATE_CONFIGS = ("ddp", "fsdp", "zero3")

__all__ = sorted(_LAZY) + ["accelerate_config", "ACCELERATE_CONFIGS"]


def accelerate_config(name: str) -> Path:
    """Path of the packaged example `accelerate launch --config_file` for `name` (ddp, fsdp, zero3)."""
    from diffusionvl.core.errors import check

    check(name in ACCELERATE_CONFIGS, f"unknown accelerate config {name!r}; choose {', '.join(ACCELERATE_CONFIGS)}")
    return Path(__file__).resolve().parents[2] / "configs" / "accelerate" / f"{name}.yaml"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusionvl.jobs.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
