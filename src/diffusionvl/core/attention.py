"""Attention backends and mask forms, chosen in one place.

Contract: callers describe *which* keys each query may see with a rule from masks.py; this module turns the rule
into what the model's attention implementation needs:
- "sdpa":           a boolean [N, 1, Q, K] mask (True = attend);
- "eager" (others): an additive float mask (0 / dtype min): eager attention does not apply boolean masks;
- "flex_attention": a FlexAttention BlockMask (training on CUDA), built from the same rule's `mask_mod`.
Models with sliding-window layers get a dict {"full_attention": ..., "sliding_attention": ...} whose second entry
also enforces the window, which is the form those transformers models accept for per-layer masks.
`training_backend()` picks FlexAttention on CUDA when available and SDPA elsewhere.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusionvl.core import masks

Tensor = torch.Tensor


def attn_implementation(config: Any) -> str:
    return getattr(config, "_attn_implementation", None) or "eager"


def sliding_layout(text_config: Any) -> tuple[bool, int | None]:
    """(uses per-layer mask dict, window). Window applies to 'sliding_attention' layers (or to all layers when the
    config has one sliding window and no per-layer types)."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types:
        per_layer = "sliding_attention" in layer_types and window is not None
        return per_layer, window if per_layer else None
    if window is not None and getattr(text_config, "use_sliding_window", True):
        return False, window
    return False, None


def dense_form(mask: Tensor, implementation: str, dtype: torch.dtype) -> Tensor:
    """Bool mask -> the dense form the attention implementation applies correctly."""
    if implementation == "sdpa":
        return mask
    return masks.to_additive(mask, dtype)


def build(rule: Callable[[int | None], Tensor], config: Any, text_config: Any, dtype: torch.dtype) -> Any:
    """Masks for one forward. `rule(window)` returns the boolean [N, 1, Q, K] mask for that window (None = none)."""
    implementation = attn_implementation(config)
    if implementation == "flex_attention":
        implementation = "sdpa"  # decoding steps are tiny: dense masks; flex is used for training (flex_block_mask)
    per_layer, window = sliding_layout(text_config)
    if per_layer:
        return {
            "full_attention": dense_form(rule(None), implementation, dtype),
            "sliding_attention": dense_form(rule(window), implementation, dtype),
        }
    return dense_form(rule(window), implementation, dtype)


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def training_backend(device: torch.device) -> str:
    """FlexAttention on CUDA (block-sparse BD3 mask, no (2L)^2 tensor), SDPA elsewhere."""
    if device.type == "cuda" and flex_available():
        return "flex_attention"
    return "sdpa"


def flex_block_mask(valid: Tensor, block_size: int, window: int | None = None, segment: Tensor | None = None,
                    context: Tensor | None = None, groups: Tensor | None = None) -> Any:
    """BD3 training BlockMask for FlexAttention. valid: [N, L] bool; segment, context: packed rows; groups: the
    clean half's bidirectional groups (masks.py)."""
    from torch.nn.attention.flex_attention import create_block_mask, or_masks

    n, length = valid.shape
    mod = masks.bd3_mask_mod(valid, block_size, window, segment, context)
    if groups is not None:
        mod = or_masks(mod, masks.bd3_group_mod(groups, window))
    return create_block_mask(mod, B=n, H=None, Q_LEN=2 * length, KV_LEN=2 * length, device=valid.device)


def bd3_training_masks(valid: Tensor, block_size: int, config: Any, text_config: Any, dtype: torch.dtype,
                       segment: Tensor | None = None, context: Tensor | None = None,
                       groups: Tensor | None = None) -> Any:
    """The [x_t ; x0] training mask in the form the model's attention implementation takes (segment, context:
    packed rows; groups [N, L]: bidirectional groups of the clean half, masks.open_groups)."""
    implementation = attn_implementation(config)
    per_layer, window = sliding_layout(text_config)
    if implementation == "flex_attention":
        if per_layer:
            return {"full_attention": flex_block_mask(valid, block_size, None, segment, context, groups),
                    "sliding_attention": flex_block_mask(valid, block_size, window, segment, context, groups)}
        return flex_block_mask(valid, block_size, window, segment, context, groups)

    def rule(w: int | None) -> Tensor:
        mask = masks.bd3_dense_mask(valid, block_size, w, segment, context)
        return mask if groups is None else mask | masks.group_pairs(groups, w, clean_half=True)

    return build(rule, config, text_config, dtype)
