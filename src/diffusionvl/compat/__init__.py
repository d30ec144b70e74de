"""Compatibility with the DiffusionVL reference code (hustvl/DiffusionVL): its checkpoints and its `generate` call.

Contract: importing this package registers `hustvl.format_loader` in `diffusionvl.conversion.FORMAT_LOADERS`
(once), so `diffusionvl.load(path)` and `diffusionvl.convert(path, dst)` accept the reference checkpoint folders;
conversion.py imports it lazily, so the registration always happens before a load. `generate_compat` serves the
reference `model.generate(inputs=..., gen_length=..., remasking_strategy=...)` call, which
`DiffusionVLModel.generate` forwards here. See docs/coming-from-diffusionvl.md.
"""

from __future__ import annotations

from diffusionvl.compat.generate import REMASKING, decode_config, encoded_from_ids, generate_compat
from diffusionvl.compat.hustvl import MASK_ROW, HustvlCheckpoint, detect, format_loader, load_checkpoint
from diffusionvl.conversion import FORMAT_LOADERS

if format_loader not in FORMAT_LOADERS:
    FORMAT_LOADERS.append(format_loader)

__all__ = ["MASK_ROW", "REMASKING", "HustvlCheckpoint", "decode_config", "detect", "encoded_from_ids",
           "format_loader", "generate_compat", "load_checkpoint"]
