"""Where and in what precision a model runs when the caller does not say: one rule for every loader.

Contract: `default_device(None)` is CUDA when available, else the CPU; `default_dtype(None | "auto", device)` is
bfloat16 on CUDA and float32 elsewhere; a name ("bf16", "float32", ...) maps to its torch dtype and an unknown name
is a one-line `DiffusionVLError`.
"""

from __future__ import annotations

import torch

from diffusionvl.core.errors import DiffusionVLError


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise DiffusionVLError(f"unknown dtype {dtype!r}; choose one of {', '.join(table)}")
    return table[dtype]
