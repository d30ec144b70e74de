"""AR checkpoint on disk -> diffusion checkpoint on disk: `convert`, `load`, and the loaders behind them.

Contract:
- `convert(src, dst, ...)` = load the AR model + `wrap` (wrapping.py) + `save_atomic` (modeling.py); `load(path)`
  reads a converted folder (or, with `allow_unconverted=True`, wraps an AR folder in memory).
- Other checkpoint layouts are an explicit list, `FORMAT_LOADERS` (`loader(path, device=, dtype=) ->
  DiffusionVLModel | None`, tried first by both `load` and `convert`): today the paper's released checkpoints
  (`compat.format_loader`). Composed VLMs (model_type `diffusionvl_llava`) are registered with transformers'
  Auto classes by an explicit `register_auto_classes()` call before a checkpoint is read.
- Saving is atomic (`atomic.write_folder`): everything is written into a temporary sibling folder that is swapped
  into place, so an interrupted save never damages an existing checkpoint.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from diffusionvl.backbone.adapters import adapter_class
from diffusionvl.backbone.compose import register_auto_classes
from diffusionvl.backbone.processing import load_processor
from diffusionvl.core.atomic import check_target
from diffusionvl.core.config import DiffusionConfig
from diffusionvl.core.devices import default_device, default_dtype
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.model.compat import format_loader
from diffusionvl.model.modeling import MODEL_MARKER, DiffusionVLModel, save_atomic
from diffusionvl.model.wrapping import wrap

FORMAT_LOADERS: tuple[Callable[..., DiffusionVLModel | None], ...] = (format_loader,)


def check_source(src: str | os.PathLike[str]) -> None:
    text = os.fspath(src)
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise DiffusionVLError(f"{text} is a folder but has no config.json: not a transformers checkpoint")
        return
    if os.path.exists(text) or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise DiffusionVLError(f"model not found: {text} (give a checkpoint folder or a hub id like org/name)")


WEIGHT_ERRORS = ("SafetensorError", "HeaderTooLarge", "UnpicklingError")  # what a cut weights file raises


def load_hf(src: str | os.PathLike[str], device: torch.device, dtype: torch.dtype | str,
            attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """Load a transformers checkpoint (folder or hub id) and its tokenizer/processor."""
    import transformers
    from transformers import AutoConfig

    check_source(src)
    register_auto_classes()
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        hint = ""
        if not os.path.exists(src) and os.path.isdir(os.fspath(src).split("/")[0]):  # "runs/final" mistyped?
            hint = f" (nor is there a local folder {src}: {os.fspath(src).split('/')[0]}/ holds no such model)"
        raise DiffusionVLError(f"cannot read the model config at {src}: {str(exc).splitlines()[0]}{hint}") from None
    cls = adapter_class(config.model_type)
    processor = _load_processor(src, cls.has_vision, trust_remote_code)  # before the (slow) weights
    auto = getattr(transformers, cls.auto_class)
    try:
        model = auto.from_pretrained(src, dtype=dtype, attn_implementation=attn_implementation,
                                     trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - safetensors / torch errors on a cut or corrupt weights file
        if type(exc).__name__ not in WEIGHT_ERRORS and not isinstance(exc, (OSError, EOFError)):
            raise
        raise DiffusionVLError(f"cannot read the weights at {src} ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}): the file is truncated or "
                               "corrupt; re-download or re-save the model") from None
    return model.to(device).eval(), processor


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _load_processor(src: str | os.PathLike[str], vision: bool, trust_remote_code: bool) -> Any:
    """The folder's tokenizer (text) or processor (VLM); a folder missing or holding broken tokenizer / processor
    files is one line naming them (transformers raises ValueError, OSError, TypeError... with pages of advice)."""
    try:
        return load_processor(src, vision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        missing = [n for n in TOKENIZER_FILES if os.path.isdir(src) and not os.path.isfile(os.path.join(src, n))]
        what = f"it has no {' and no '.join(missing)}" if missing else str(exc).strip().splitlines()[0][:200]
        raise DiffusionVLError(f"cannot load the tokenizer{'/processor' if vision else ''} of {src}: {what} (copy the "
                               "tokenizer files from the model it was made from)") from None


def load_registered(path: str | os.PathLike[str], device: torch.device,
                    dtype: torch.dtype | None) -> DiffusionVLModel | None:
    """The first FORMAT_LOADERS match for `path` (dtype None = keep the stored dtype), or None."""
    for loader in FORMAT_LOADERS:
        model = loader(path, device=device, dtype=dtype)
        if model is not None:
            return model
    return None


def load(path: str | os.PathLike[str], device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         attn_implementation: str = "sdpa", allow_unconverted: bool = False) -> DiffusionVLModel:
    """Load a diffusionvl checkpoint (or another registered layout) as a DiffusionVLModel."""
    dev = default_device(device)
    dt = default_dtype(dtype, dev)
    model = load_registered(path, dev, dt)
    if model is not None:
        return model
    hf_model, processor = load_hf(path, dev, dt, attn_implementation)
    if getattr(hf_model.config, "diffusionvl", None) is None and not allow_unconverted:
        raise DiffusionVLError(f"{path} is an AR checkpoint, not a diffusion one: run `diffusionvl convert {path} DST` "
                               "first (or load with allow_unconverted=True)")
    return wrap(hf_model, processor)


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], block_size: int | None = None,
            mask_token: str | None = None, prediction: str | None = None, eos_token: str | None = None,
            dtype: str | torch.dtype | None = None, overwrite: bool = False) -> Path:
    """Translate the AR checkpoint `src` into a diffusion checkpoint at `dst` (see module docstring). An existing
    `dst` that is not a diffusionvl model folder (or an empty one) is refused unless `overwrite`.

    `src` may also be a layout from FORMAT_LOADERS (e.g. a DiffusionVL reference checkpoint). Options left None
    keep the source's recorded diffusion settings, else the defaults (block size 8, prediction 'shift')."""
    DiffusionConfig(block_size=8 if block_size is None else block_size, prediction=prediction or "shift").validate()
    check_target(dst, MODEL_MARKER, overwrite)  # before the (slow) load
    dev = torch.device("cpu")
    dt = default_dtype(dtype, dev) if dtype else None  # None: keep the stored dtype
    loaded = load_registered(src, dev, dt)
    if loaded is not None:
        hf_model, processor = loaded.hf_model, loaded.processor
    else:
        hf_model, processor = load_hf(src, dev, dt or "auto")
    model = wrap(hf_model, processor, block_size=block_size, mask_token=mask_token, prediction=prediction,
                 eos_token=eos_token, new_conversion=True)
    return save_atomic(model, dst, overwrite=overwrite)
