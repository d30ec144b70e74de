"""Where and in what precision a model runs when the caller does not say: one rule for every loader.

Contract: `default_device(None)` is CUDA when available, else the CPU; a named device must be one this machine can
run a model on ("cpu", "cuda", "cuda:N" with N < the CUDA device count, "mps" / "xpu" where present), else a
one-line `DiffusionVLError` (never torch's assertion from deep inside `.to(device)`); `default_dtype(None | "auto",
device)` is
bfloat16 on CUDA and float32 elsewhere; a name ("bf16", "float32", ...) maps to its torch dtype and an unknown name
is a one-line `DiffusionVLError`.
"""

from __future__ import annotations

import torch

from diffusionvl.core.errors import DiffusionVLError


def default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DiffusionVLError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DiffusionVLError(f"device {device!r} was asked for but no CUDA device is available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DiffusionVLError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                                   "CUDA device(s)")
    elif dev.type in ("mps", "xpu"):
        backend = getattr(torch.backends, "mps", None) if dev.type == "mps" else getattr(torch, "xpu", None)
        if backend is None or not backend.is_available():
            raise DiffusionVLError(f"device {device!r} was asked for but this machine has no {dev.type} device")
    elif dev.type != "cpu":
        raise DiffusionVLError(f"device {device!r} is not supported; use cpu, cuda, cuda:N (or mps / xpu where "
                               "present)")
    return dev


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
