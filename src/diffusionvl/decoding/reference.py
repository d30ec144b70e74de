"""Block decoding done the way the DiffusionVL reference code does it: a benchmark baseline, not for real use.

Contract: `reference_generate(model, input_ids, ...)` decodes a batch of equal-length prompts ([N, L] ids, no
padding, as the reference requires) and returns `ReferenceResult(ids [N, gen_length], forwards, first_block_seconds)`.
It reproduces the structure of the reference's `generate_with_bd3lm` that decides its speed:
- a transformers `DynamicCache` that grows by concatenation; the prompt's complete blocks are prefilled;
- per block, up to S + 1 iterations: each checks on the host whether masks remain (one sync per step); while they
  do, a forward whose keys/values are dropped again (cache cropped back), then the static transfer schedule applied
  row by row in Python with `.item()` syncs and a per-row `topk` (threshold policy: the reference's either/or rule);
  once none remain, one more forward over the finished block only to commit it to the cache;
- after each block, the whole batch stops if any row produced a stop token (the reference hard-codes one EOS id).
Two deliberate differences, neither affecting speed: masked positions are found by token id (rule 2) instead of by
comparing float embeddings, and the mask token itself is never sampled (the reference can sample it and then loop).
The reference also re-derives the prompt ids from the prompt embeddings with an argmax over the vocabulary; here the
ids are given. With B = S = 8, a 512-token prompt and 256 new tokens this costs 1 + 32 * 9 = 289 forwards.
The backbone forward itself is the plain slot forward (plain.py) given that `DynamicCache`, so the reference differs
from our decoders only in its loop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from diffusionvl.core.sampling import sample, transfer_schedule
from diffusionvl.decoding.layout import build_layout
from diffusionvl.decoding.plain import PlainForward
from diffusionvl.decoding.protocol import Window

Tensor = torch.Tensor


@dataclass
class ReferenceResult:
    ids: Tensor  # [N, gen_length]
    forwards: int
    first_block_seconds: float | None


def _row_transfer(conf: Tensor, is_mask: Tensor, k: int, policy: str, threshold: float) -> Tensor:
    """The reference's per-row selection loop (host syncs on purpose). conf/is_mask: [N, B] -> transfer [N, B]."""
    transfer = torch.zeros_like(is_mask)
    conf = torch.where(is_mask, conf, torch.full_like(conf, float("-inf")))
    for j in range(conf.shape[0]):
        if policy == "threshold":
            high = conf[j] > threshold
            if int(high.sum().item()) >= k:
                transfer[j] = high
                continue
        kk = min(k, int(is_mask[j].sum().item()))
        if kk > 0 and not bool(torch.all(torch.isinf(conf[j]))):
            transfer[j, torch.topk(conf[j], kk).indices] = True
    return transfer


def _denoise_block(fwd: PlainForward, block: Window, mask_id: int, schedule: list[int], policy: str,
                   threshold: float, temperature: float) -> int:
    """Denoise the canvas block at `block` the reference's way; returns the forwards it took."""
    for step in range(len(schedule) + 1):
        cur = fwd.read(block)  # [N, B]
        is_mask = cur == mask_id
        if not bool(is_mask.any()):
            fwd.hidden(block)  # the separate commit forward: its keys stay in the cache
            return step + 1
        logits = fwd.adapter.head(fwd.hidden(block)).float()  # [N, B, V]
        fwd.cache.crop(-block.length)  # the reference's store_kv=False: attend to the block, keep nothing
        logits[..., mask_id] = float("-inf")
        x0, conf = sample(logits, temperature)
        k = schedule[min(step, len(schedule) - 1)]
        transfer = _row_transfer(conf, is_mask, k, policy, threshold)
        fwd.write(block, torch.where(transfer, x0, cur))
    return len(schedule) + 1


def _reference_forward(model: Any, input_ids: Tensor, gen_length: int, block_size: int) -> PlainForward:
    """The plain slot forward over [prompt ; masks] (no padding: equal-length prompts) with a transformers
    `DynamicCache` that grows by concatenation, as the reference's."""
    from transformers import DynamicCache

    n, plen = input_ids.shape
    dims = model.adapter.position_dims
    positions = [(torch.arange(plen).view(1, -1).expand(dims, -1), 0)] * n
    layout = build_layout(input_ids.tolist(), positions, block_size, gen_length, model.mask_token_id,
                          model.pad_token_id)
    return PlainForward(model, layout, None, cache=DynamicCache(), attention_block=block_size)


@torch.inference_mode()
def reference_generate(model: Any, input_ids: Tensor, gen_length: int, block_size: int, steps: int,
                       policy: str = "static", threshold: float = 0.9, temperature: float = 0.0,
                       stop_ids: list[int] | None = None) -> ReferenceResult:
    t0 = time.perf_counter()
    n, plen = input_ids.shape
    fwd = _reference_forward(model, input_ids, gen_length, block_size)
    num_blocks, forwards = fwd.tokens.shape[1] // block_size, 0
    prefill_blocks = plen // block_size
    if prefill_blocks > 0:
        fwd.prefill(prefill_blocks * block_size)
        forwards += 1
    schedule = transfer_schedule(block_size, steps)
    stops = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=model.device)
    first: float | None = None
    block = fwd.window(block_size)
    for b in range(prefill_blocks, num_blocks):
        s, e = b * block_size, (b + 1) * block_size
        fwd.aim(block, s)
        forwards += _denoise_block(fwd, block, model.mask_token_id, schedule, policy, threshold, temperature)
        if first is None:
            first = time.perf_counter() - t0
        if e > plen and bool(torch.isin(fwd.tokens[:, max(plen, s):e], stops).any()):
            break  # the reference stops the whole batch at the first stop token of any row
    return ReferenceResult(fwd.tokens[:, plen:plen + gen_length], forwards, first)
