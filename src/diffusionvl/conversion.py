"""AR checkpoint -> diffusion checkpoint: `wrap` (in memory), `convert` (disk to disk), `load`, atomic saving.

Contract:
- `wrap(model, tokenizer_or_processor, block_size=8, ...)` checks the architecture is supported, finds the mask
  token by name (or adds `<|mask|>` as a special token, growing the embeddings when the vocabulary has no spare
  row, and initializing its input/output rows to the mean embedding), records the DiffusionConfig in
  `model.config.diffusionvl`, and returns a DiffusionVLModel. Weights are otherwise untouched.
- `convert(src, dst, ...)` = load the AR model + wrap + save; `load(path)` reads a converted folder (or, with
  `allow_unconverted=True`, wraps an AR folder in memory). Other checkpoint layouts register a loader in
  `FORMAT_LOADERS` (`loader(path, device=, dtype=) -> DiffusionVLModel | None`, tried first by both `load` and
  `convert`; `diffusionvl.compat`, imported lazily here, registers the paper's released checkpoints).
- Saving is atomic (`diffusionvl.atomic.write_folder`): everything is written into a temporary sibling folder that
  is swapped into place, so an interrupted save never damages an existing checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from diffusionvl.adapters import adapter_class
from diffusionvl.atomic import write_folder
from diffusionvl.config import DEFAULT_MASK_TOKEN, KNOWN_MASK_TOKENS, DiffusionConfig
from diffusionvl.errors import DiffusionVLError
from diffusionvl.modeling import DiffusionVLModel, end_of_turn_token, find_token_id

FORMAT_LOADERS: list[Callable[..., DiffusionVLModel | None]] = []


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def ensure_mask_token(model: Any, processor: Any, name: str | None = None) -> tuple[str, int]:
    """Find the mask token by name, or add `name` (default `<|mask|>`) and give it a sensible embedding."""
    tok = _tokenizer(processor)
    candidates = [name] if name else list(KNOWN_MASK_TOKENS)
    for cand in candidates:
        found = find_token_id(tok, cand)
        if found is not None:
            return cand, found
    name = name or DEFAULT_MASK_TOKEN
    n_before = len(tok)
    tok.add_tokens([name], special_tokens=True)
    mask_id = find_token_id(tok, name)
    assert mask_id is not None
    emb = model.get_input_embeddings()
    if mask_id >= emb.weight.shape[0]:
        model.resize_token_embeddings(mask_id + 1, mean_resizing=False)
    _init_rows(model, mask_id, n_before)
    return name, mask_id


@torch.no_grad()
def _init_rows(model: Any, row: int, n_used: int) -> None:
    """Set the new token's input (and untied output) embedding to the mean over the used vocabulary."""
    emb = model.get_input_embeddings().weight
    emb[row] = emb[: min(n_used, emb.shape[0])].float().mean(0).to(emb.dtype)
    out = model.get_output_embeddings()
    if out is not None and out.weight.data_ptr() != emb.data_ptr() and row < out.weight.shape[0]:
        out.weight[row] = out.weight[: min(n_used, out.weight.shape[0])].float().mean(0).to(out.weight.dtype)
        if getattr(out, "bias", None) is not None:
            out.bias[row] = out.bias[: min(n_used, out.bias.shape[0])].mean()


def wrap(model: Any, processor: Any, block_size: int | None = None, mask_token: str | None = None,
         prediction: str | None = None, eos_token: str | None = None) -> DiffusionVLModel:
    """In-memory conversion of a loaded AR model (see module docstring). Arguments left None keep the model's
    recorded diffusion settings, else the defaults."""
    adapter_class(model.config.model_type)  # fail early with the supported list
    recorded = getattr(model.config, "diffusionvl", None) or {}
    cfg = DiffusionConfig.from_dict(recorded) if recorded else DiffusionConfig()
    overrides = {k: v for k, v in dict(block_size=block_size, prediction=prediction, eos_token=eos_token).items()
                 if v is not None}
    cfg = DiffusionConfig(**{**cfg.to_dict(), **overrides}).validate()
    name, _ = ensure_mask_token(model, processor, mask_token or (cfg.mask_token if recorded else None))
    cfg.mask_token = name
    tok = _tokenizer(processor)
    if cfg.eos_token is None:
        cfg.eos_token = end_of_turn_token(tok) or tok.eos_token
    model.config.diffusionvl = cfg.to_dict()
    return DiffusionVLModel(model, processor, cfg)


def save_atomic(model: DiffusionVLModel, path: str | os.PathLike[str],
                state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """Write model + tokenizer/processor + diffusion config to `path` through a temporary sibling folder.

    `state_dict`: the backbone's full weights when they live elsewhere (gathered from FSDP / ZeRO-3 shards).
    An existing `path` is replaced only when it is a diffusionvl model folder, an empty folder, or `overwrite`
    (see `check_target`): nothing a user keeps there is deleted without being asked."""
    check_target(path, MODEL_MARKER, overwrite)
    model.hf_model.config.diffusionvl = model.config.to_dict()

    def write(tmp: Path) -> None:
        model.hf_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        model.processor.save_pretrained(tmp)
        (tmp / MODEL_MARKER).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")

    return write_folder(path, write)


MODEL_MARKER = "diffusionvl.json"  # the file that makes a folder a diffusionvl model folder


def check_target(path: str | os.PathLike[str], marker: str, overwrite: bool = False) -> None:
    """Refuse (one line) to replace `path` unless it does not exist, is an empty folder, is a folder holding `marker`
    (the same kind of output: a rerun replaces it), or `overwrite` is set."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    if path.is_dir() and not path.is_symlink():
        entries = sorted(p.name for p in path.iterdir())
        if not entries or marker in entries:
            return
        raise DiffusionVLError(f"{path} is a folder with {len(entries)} entries that is not a diffusionvl output "
                               f"(e.g. {entries[0]}): choose another output path, or pass --overwrite to replace it")
    raise DiffusionVLError(f"{path} exists and is not a folder: choose another output path, or pass --overwrite to "
                           "replace it")


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _default_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise DiffusionVLError(f"unknown dtype {dtype!r}; choose one of {', '.join(table)}")
    return table[dtype]


def _check_source(src: str | os.PathLike[str]) -> None:
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

    from diffusionvl.processing import load_processor

    _check_source(src)
    import diffusionvl.compose  # noqa: F401 - registers composed VLMs (model_type diffusionvl_llava) with Auto*
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise DiffusionVLError(f"cannot read the model config at {src}: {str(exc).splitlines()[0]}") from None
    cls = adapter_class(config.model_type)
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
    processor = load_processor(src, cls.has_vision, trust_remote_code=trust_remote_code)
    return model.to(device).eval(), processor


def load_registered(path: str | os.PathLike[str], device: torch.device,
                    dtype: torch.dtype | None) -> DiffusionVLModel | None:
    """The first FORMAT_LOADERS match for `path` (dtype None = keep the stored dtype), or None."""
    import diffusionvl.compat  # noqa: F401 - registers the DiffusionVL reference-checkpoint loaders

    for loader in FORMAT_LOADERS:
        model = loader(path, device=device, dtype=dtype)
        if model is not None:
            return model
    return None


def load(path: str | os.PathLike[str], device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
         attn_implementation: str = "sdpa", allow_unconverted: bool = False) -> DiffusionVLModel:
    """Load a diffusionvl checkpoint (or another registered layout) as a DiffusionVLModel."""
    dev = _default_device(device)
    dt = _default_dtype(dtype, dev)
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
    dt = _default_dtype(dtype, dev) if dtype else None  # None: keep the stored dtype
    loaded = load_registered(src, dev, dt)
    if loaded is not None:
        hf_model, processor = loaded.hf_model, loaded.processor
    else:
        hf_model, processor = load_hf(src, dev, dt or "auto")
    model = wrap(hf_model, processor, block_size=block_size, mask_token=mask_token, prediction=prediction,
                 eos_token=eos_token)
    return save_atomic(model, dst, overwrite=overwrite)
