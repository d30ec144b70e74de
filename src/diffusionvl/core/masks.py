"""Attention masks of block diffusion, as pure functions of token indices.

Contract: one *rule* per mask, written once as elementwise tensor logic on (query index, key index). The dense
form (a boolean [N, 1, Q, K] tensor for SDPA, or additive float for eager attention) and the FlexAttention form (a
`mask_mod` for `create_block_mask`) both evaluate that same rule, so they cannot drift apart.

Index conventions
- Training (BD3): the backbone sees 2L tokens [x_t ; x0]. Index i < L is noisy token i, index L + i is clean token
  i. Block of a token = (its index within its half) // B. Rules (True = may attend):
    x_t -> x_t same block;  x_t -> x0 strictly earlier blocks;  x0 -> x0 same or earlier blocks;  x0 -> x_t never.
- Inference: tokens live in cache *slots*; sample n's tokens start at slot `start[n]` (left padding, a multiple of
  B, so slot blocks and position blocks coincide). Rule: key slot k visible to query slot q iff
  start[n] <= k and k // B <= q // B (block-causal; bidirectional inside a block), and within the sliding
  window when the layer has one.
- Packed rows (training): a row may hold several independent *segments* and optional shared prefixes. Each token
  carries `segment` (its own segment's id) and `context` (the id of the prefix it may also read; its own id when it
  has none). Key k is visible to query q only if segment[k] == segment[q] or segment[k] == context[q]; this term is
  ANDed onto the block rules, so a segment sees itself and its prefix and nothing else. With every token in one
  segment (segment == context == 1, the default when none is given) the rules are the plain ones. The packer lays
  the prefix and every segment out in whole blocks (train/packing.py), so the index-based block rules above give
  each segment exactly the attention it gets alone.
- Every query may always attend to itself, so padding rows never become all-masked (which would turn into NaN
  in SDPA and leak through 0 * NaN into valid rows).
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def bd3_rule(q: Tensor, k: Tensor, length: int, block_size: int, window: int | None = None) -> Tensor:
    """BD3 training rule on indices into [x_t ; x0] (each half `length` long). Broadcasts q against k.

    `window` (sliding-window layers) also requires position(q) - position(k) < window.
    """
    q_clean, k_clean = q >= length, k >= length
    qp = torch.where(q_clean, q - length, q)
    kp = torch.where(k_clean, k - length, k)
    qb, kb = qp // block_size, kp // block_size
    noisy_self = ~q_clean & ~k_clean & (qb == kb)
    noisy_ctx = ~q_clean & k_clean & (kb < qb)
    clean_ctx = q_clean & k_clean & (kb <= qb)
    allowed = noisy_self | noisy_ctx | clean_ctx
    if window is not None:
        allowed = allowed & (qp - kp < window)
    return allowed


def block_causal_rule(q: Tensor, k: Tensor, block_size: int, start: Tensor | int = 0,
                      window: int | None = None) -> Tensor:
    """Inference rule on cache slots: key k visible to query q (see module docstring)."""
    allowed = (k >= start) & (k // block_size <= q // block_size)
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed


def segment_rule(q_segment: Tensor, q_context: Tensor, k_segment: Tensor) -> Tensor:
    """Packed rows: a key is visible iff it lies in the query's own segment or in the query's prefix."""
    return (k_segment == q_segment) | (k_segment == q_context)


def default_segments(valid: Tensor, segment: Tensor | None, context: Tensor | None) -> tuple[Tensor, Tensor]:
    """(segment, context) [N, L] long; one segment per row when none is given."""
    if segment is None:
        segment = valid.long()
    return segment, segment if context is None else context


def bd3_dense_mask(valid: Tensor, block_size: int, window: int | None = None, segment: Tensor | None = None,
                   context: Tensor | None = None) -> Tensor:
    """Dense BD3 training mask.

    valid: [N, L] bool, True on real tokens (False on batch padding); segment, context: optional [N, L] long
    (packed rows, module docstring). Returns [N, 1, 2L, 2L] bool.
    """
    n, length = valid.shape
    segment, context = default_segments(valid, segment, context)
    idx = torch.arange(2 * length, device=valid.device)
    allowed = bd3_rule(idx[:, None], idx[None, :], length, block_size, window)  # [2L, 2L]
    valid2 = torch.cat([valid, valid], dim=1)  # [N, 2L]
    seg2, ctx2 = torch.cat([segment, segment], dim=1), torch.cat([context, context], dim=1)  # [N, 2L]
    allowed = allowed[None] & valid2[:, :, None] & valid2[:, None, :]  # [N, 2L, 2L]
    allowed = allowed & segment_rule(seg2[:, :, None], ctx2[:, :, None], seg2[:, None, :])
    allowed = allowed | torch.eye(2 * length, dtype=torch.bool, device=valid.device)[None]
    return allowed[:, None]


def bd3_mask_mod(valid: Tensor, block_size: int, window: int | None = None, segment: Tensor | None = None,
                 context: Tensor | None = None) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention `mask_mod` of the same BD3 rule (valid: [N, L] bool; segment, context as in bd3_dense_mask)."""
    length = valid.shape[1]
    segment, context = default_segments(valid, segment, context)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        qi, ki = torch.where(q >= length, q - length, q), torch.where(k >= length, k - length, k)
        same = segment_rule(segment[b, qi], context[b, qi], segment[b, ki])
        return (bd3_rule(q, k, length, block_size, window) & valid[b, qi] & valid[b, ki] & same) | (q == k)

    return mask_mod


def block_causal_dense_mask(q_slots: Tensor, kv_len: int, start: Tensor, block_size: int,
                            window: int | None = None) -> Tensor:
    """Dense inference mask.

    q_slots: [Q] slot index of each query token (same for the whole batch).
    start:   [N] first real slot of each sample.
    Returns [N, 1, Q, kv_len] bool.
    """
    k = torch.arange(kv_len, device=q_slots.device)
    q = q_slots[:, None]  # [Q, 1]
    allowed = block_causal_rule(q[None], k[None, None], block_size, start[:, None, None], window)  # [N, Q, K]
    allowed = allowed | (q == k)[None]
    return allowed[:, None]


def causal_dense_mask(valid: Tensor, window: int | None = None, segment: Tensor | None = None,
                      context: Tensor | None = None) -> Tensor:
    """Plain causal mask of a right-padded batch (AR training). valid: [N, L] bool -> [N, 1, L, L] bool.
    segment, context: optional [N, L] long (packed rows, module docstring)."""
    length = valid.shape[1]
    segment, context = default_segments(valid, segment, context)
    idx = torch.arange(length, device=valid.device)
    allowed = block_causal_rule(idx[:, None], idx[None, :], 1, 0, window)[None] & valid[:, None, :]  # [N, L, L]
    allowed = allowed & segment_rule(segment[:, :, None], context[:, :, None], segment[:, None, :])
    allowed = allowed | torch.eye(length, dtype=torch.bool, device=valid.device)[None]
    return allowed[:, None]


def to_additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask -> additive float mask (0 where allowed, the dtype's minimum elsewhere) for eager attention."""
    out = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return out.masked_fill_(~mask, torch.finfo(dtype).min)


def group_rule(q_group: Tensor, k_group: Tensor) -> Tensor:
    """Bidirectional groups (Gemma 3's images): query and key share a group g > 0 (0 = in none). Broadcasts."""
    return (q_group == k_group) & (k_group > 0)


def open_groups(groups: Tensor, labels: Tensor, block_size: int, ignore_index: int = -100) -> Tensor:
    """What a decoder's prefill holds of the groups [N, L] of training rows: the ids of tokens whose block lies
    wholly before the block of the next answer token (labels [N, L] != ignore_index), i.e. a prompt's complete
    blocks; 0 elsewhere. The BD3 mask opens only these, so training sees what decoding computes."""
    n, length = groups.shape
    pos = torch.arange(length, device=groups.device).expand(n, length)
    answer = torch.where(labels != ignore_index, pos, length)  # [N, L]
    next_answer = answer.flip(1).cummin(1).values.flip(1)  # the first answer position at or after each token
    return groups * (next_answer // block_size > pos // block_size)


def group_pairs(groups: Tensor, window: int | None = None, clean_half: bool = False) -> Tensor:
    """[N, 1, M, M] the pairs of groups [N, L] (both ways, within the sliding window), to OR onto a mask: over the
    L tokens (M = L, causal_dense_mask), or over [x_t ; x0] where only the clean half takes part (M = 2L,
    bd3_dense_mask)."""
    length = groups.shape[1]
    pos = torch.arange(length, device=groups.device)
    if clean_half:
        groups, pos = torch.cat([torch.zeros_like(groups), groups], dim=1), pos.repeat(2)  # [N, 2L], [2L]
    pairs = group_rule(groups[:, :, None], groups[:, None, :])
    if window is not None:
        pairs = pairs & (pos[:, None] - pos[None, :] < window)[None]
    return pairs[:, None]


def bd3_group_mod(groups: Tensor, window: int | None = None) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention `mask_mod` of group_pairs(groups, window, clean_half=True), to or_masks onto bd3_mask_mod."""
    length = groups.shape[1]

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        qi, ki = q - length, k - length
        clean = (qi >= 0) & (ki >= 0)
        qi, ki = qi.clamp(min=0), ki.clamp(min=0)
        pairs = clean & group_rule(groups[b, qi], groups[b, ki])
        return pairs & (qi - ki < window) if window is not None else pairs

    return mask_mod
