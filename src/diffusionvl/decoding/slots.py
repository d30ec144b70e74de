"""What both slot forwards (plain.py, static.py) compute the same way: prompt image embeddings and the slot mask.

Contract: `prompt_images` runs the vision tower once per call over the prompt region of the canvas and returns
`PromptImages`: the embeddings with image features in place ([N, R, D]), where they are ([N, R] bool, image-token
slots) and the per-layer residuals the adapter adds there (Qwen3-VL's deepstack, [K, N, R, D], else None), which
every forward holding those slots passes on (prefill, steps, recomputed prefixes); `with_images` puts the rows
into a forward's token embeddings. `slot_mask` builds the block-causal inference mask
(masks.py) of query slots over the first `kv_len` slots in the form the backbone's attention expects
(attention.py); `attention_block` = B gives block-causal attention, = T (the whole canvas) bidirectional.
`slot_groups` gives the slots of the prefilled prompt blocks their bidirectional groups (adapter.image_groups:
Gemma 3's images), which `slot_mask` opens both ways: the prefill forward (and a recomputed prefix) then sees what
transformers' own prompt forward sees, and no later forward changes it (slots from the prefill on have no group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from diffusionvl.core import attention, masks
from diffusionvl.decoding.layout import Layout

Tensor = torch.Tensor


@dataclass
class PromptImages:
    embeds: Tensor  # [N, R, D] token embeddings of the prompt region, image features in place
    where: Tensor  # [N, R] bool, image-token slots
    residuals: Tensor | None  # [K, N, R, D] added after decoder layers 0..K-1 (adapter.layer_residuals)


def prompt_images(adapter: Any, tokens: Tensor, layout: Layout, vision: dict[str, Any] | None) -> PromptImages | None:
    """The images of the prompt region R of `tokens` [N, >=R] (module docstring); None without images."""
    if not vision:
        return None
    region = int((layout.start + layout.prompt_len).max())
    ids = tokens[:, :region]
    features = adapter.image_features(vision)
    return PromptImages(adapter.embed(ids, features=features), ids == adapter.image_token_id,
                        adapter.layer_residuals(ids, features))


def with_images(embeds: Tensor, image_embeds: Tensor, where: Tensor) -> Tensor:
    """embeds [N, Q, D] with the rows at `where` [N, Q] taken from image_embeds [N, Q, D]."""
    return torch.where(where.unsqueeze(-1), image_embeds, embeds)


def slot_groups(adapter: Any, tokens: Tensor, layout: Layout, vision: dict[str, Any] | None) -> Tensor | None:
    """[N, T] bidirectional groups of the canvas `tokens` (0 from slot `layout.prefill` on); None when the family has
    none or the prompts have no images."""
    groups = adapter.image_groups(tokens) if vision else None
    if groups is None:
        return None
    groups[:, layout.prefill:] = 0
    return groups


def slot_mask(text_config: Any, dtype: torch.dtype, q_slots: Tensor, kv_len: int, start: Tensor,
              attention_block: int, groups: Tensor | None = None) -> Any:
    """Mask of queries at `q_slots` [Q] over keys [0, kv_len); `start` [N] is each sample's first real slot;
    `groups` [N, >= kv_len] (slot_groups) adds its pairs both ways, within the sliding window where a layer has one."""

    def rule(window: int | None) -> Tensor:
        mask = masks.block_causal_dense_mask(q_slots, kv_len, start, attention_block, window)  # [N, 1, Q, K]
        if groups is None:
            return mask
        pairs = masks.group_rule(groups.index_select(1, q_slots)[:, :, None], groups[:, None, :kv_len])  # [N, Q, K]
        if window is not None:
            pairs = pairs & (q_slots[:, None] - torch.arange(kv_len, device=q_slots.device)[None] < window)[None]
        return mask | pairs[:, None]

    return attention.build(rule, text_config, text_config, dtype)
