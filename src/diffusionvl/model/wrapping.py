"""In-memory conversion: a loaded AR transformers model + its tokenizer/processor -> DiffusionVLModel.

Contract: `wrap(model, tokenizer_or_processor, block_size=8, ...)` checks the architecture is supported, finds the
mask token by name (or adds `<|mask|>` as a special token, growing the embeddings when the vocabulary has no spare
row, and initializing its input/output rows to the mean embedding), records the DiffusionConfig in
`model.config.diffusionvl`, and returns a DiffusionVLModel. Weights are otherwise untouched. Arguments left None
keep the model's recorded diffusion settings, else the defaults. `new_conversion=True` (what `convert` passes)
marks a model without recorded settings as not BD3-trained yet (`DiffusionConfig.bd3_trained`).
"""

from __future__ import annotations

from typing import Any

import torch

from diffusionvl.backbone.adapters import adapter_class
from diffusionvl.backbone.tokens import end_of_turn_token, find_token_id, special_tokens
from diffusionvl.core.config import DEFAULT_MASK_TOKEN, KNOWN_MASK_TOKENS, DiffusionConfig
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.model.modeling import DiffusionVLModel


def _tokenizer(processor: Any) -> Any:
    return getattr(processor, "tokenizer", processor)


def check_mask_name(tok: Any, name: str) -> None:
    """A mask token the user names must never capture ordinary text: an existing special/added token, or a new
    string spelled like one (<...> or [...], no spaces). "hello" as the mask would turn every "hello" in a prompt
    into a mask."""
    check(isinstance(name, str) and bool(name) and not any(c.isspace() for c in name),
          f"the mask token must be a non-empty string without spaces, got {name!r}")
    taken = {getattr(tok, attr, None) for attr in ("eos_token", "bos_token", "pad_token", "unk_token")}
    check(name not in taken | {end_of_turn_token(tok)},
          f"{name!r} already has a job in this tokenizer (end of text, padding, ...); choose a token of its own "
          f"such as {DEFAULT_MASK_TOKEN}")
    if name in tok.get_vocab():
        check(name in special_tokens(tok), f"{name!r} is an ordinary token of this tokenizer: as the mask token "
                                           f"every {name!r} in a prompt would become a mask; choose a special token "
                                           f"such as {DEFAULT_MASK_TOKEN}")
    else:
        check(name[0] + name[-1] in ("<>", "[]") and len(name) > 2,
              f"a new mask token must be spelled like a special token (<...> or [...]), got {name!r}: a plain "
              "string would be cut out of every prompt that contains it")


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
         prediction: str | None = None, eos_token: str | None = None, new_conversion: bool = False) -> DiffusionVLModel:
    """In-memory conversion of a loaded AR model (see module docstring). Arguments left None keep the model's
    recorded diffusion settings, else the defaults."""
    adapter_class(model.config.model_type)  # fail early with the supported list
    recorded = getattr(model.config, "diffusionvl", None) or {}
    cfg = DiffusionConfig.from_dict(recorded) if recorded else DiffusionConfig(bd3_trained=not new_conversion)
    overrides = {k: v for k, v in dict(block_size=block_size, prediction=prediction, eos_token=eos_token).items()
                 if v is not None}
    cfg = DiffusionConfig(**{**cfg.to_dict(), **overrides}).validate()
    if mask_token is not None:
        check_mask_name(_tokenizer(processor), mask_token)
    name, _ = ensure_mask_token(model, processor, mask_token or (cfg.mask_token if recorded else None))
    cfg.mask_token = name
    tok = _tokenizer(processor)
    if cfg.eos_token is None:
        cfg.eos_token = end_of_turn_token(tok) or tok.eos_token
    model.config.diffusionvl = cfg.to_dict()
    wrapped = DiffusionVLModel(model, processor, cfg)
    limit = wrapped.max_positions
    if limit and cfg.block_size > limit:
        raise DiffusionVLError(f"block size {cfg.block_size} exceeds the model's context of {limit} positions; "
                               "choose a block size well below it (8-32 is usual)")
    return wrapped
