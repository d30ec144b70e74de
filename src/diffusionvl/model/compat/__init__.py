"""Compatibility with the DiffusionVL reference code (hustvl/DiffusionVL): its checkpoints and its `generate` call.

Contract: `format_loader(path, device=, dtype=)` returns the DiffusionVLModel of a reference checkpoint folder (a
Qwen2.5-VL "qwenvl" one, hustvl.py, or a LLaVA-style DiffusionVL-Qwen2.5 one, llava_qwen.py) and None for anything
else; it is the entry of `conversion.FORMAT_LOADERS`, so `diffusionvl.load(path)` and `diffusionvl.convert(path,
dst)` accept those folders. `generate_compat(model, inputs=..., gen_length=..., remasking_strategy=...)` is the
reference `model.generate` call, returning a LongTensor like the reference (`DiffusionVLModel.generate` itself
always returns a GenerationOutput). See docs/coming-from-diffusionvl.md.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from diffusionvl.model.compat.generate import REMASKING, decode_config, encoded_from_ids, generate_compat
from diffusionvl.model.compat.hustvl import MASK_ROW, HustvlCheckpoint, detect, load_qwenvl
from diffusionvl.model.compat.llava_qwen import load_llava_qwen
from diffusionvl.model.modeling import DiffusionVLModel

__all__ = ["MASK_ROW", "REMASKING", "HustvlCheckpoint", "decode_config", "detect", "encoded_from_ids",
           "format_loader", "generate_compat", "load_checkpoint"]


def load_checkpoint(ckpt: HustvlCheckpoint, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    mask_row: int | None = None) -> DiffusionVLModel:
    """Build the DiffusionVLModel of a detected reference checkpoint (dtype None = the stored dtype)."""
    load = load_llava_qwen if ckpt.kind == "llava_qwen" else load_qwenvl
    return load(ckpt, device, dtype, mask_row)


def format_loader(path: Any, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  **_: Any) -> DiffusionVLModel | None:
    """FORMAT_LOADERS entry: a DiffusionVLModel for a reference checkpoint folder, None for anything else."""
    if not isinstance(path, (str, os.PathLike)):
        return None
    ckpt = detect(path)
    return None if ckpt is None else load_checkpoint(ckpt, device, dtype)
