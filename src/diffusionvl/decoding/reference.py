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
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from diffusionvl import attention, masks
from diffusionvl.sampling import sample, transfer_schedule

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


class _Forward:
    """Backbone forward over slots [s, e) with a DynamicCache and slices of one precomputed block-causal mask."""

    def __init__(self, model: Any, n: int, total: int, block_size: int):
        from transformers import DynamicCache

        self.model, self.adapter = model, model.adapter
        dev = model.device
        q = torch.arange(total, device=dev)
        text_cfg = self.adapter.text_config

        def rule(window: int | None) -> Tensor:
            return masks.block_causal_dense_mask(q, total, torch.zeros(1, dtype=torch.long, device=dev), block_size,
                                                 window)  # [1, 1, T, T]

        self.mask = attention.build(rule, text_cfg, text_cfg, model.dtype)
        self.positions = q.view(1, 1, -1).expand(self.adapter.position_dims, n, total)  # [P, N, T]
        self.cache = DynamicCache()
        self.forwards = 0

    def __call__(self, ids: Tensor, s: int, store: bool) -> Tensor:
        e = s + ids.shape[1]
        mask = ({k: v[:, :, s:e, :e] for k, v in self.mask.items()} if isinstance(self.mask, dict)
                else self.mask[:, :, s:e, :e])
        embeds = self.adapter.input_embeddings()(ids)
        hidden = self.adapter.run_decoder(embeds, mask, self.positions[:, :, s:e], self.cache)
        if not store:
            self.cache.crop(-ids.shape[1])  # the reference's store_kv=False: attend to the block, keep nothing
        self.forwards += 1
        return hidden


def _denoise_block(fwd: _Forward, cur: Tensor, s: int, schedule: list[int], policy: str, threshold: float,
                   temperature: float) -> Tensor:
    mask_id = fwd.model.mask_token_id
    for step in range(len(schedule) + 1):
        is_mask = cur == mask_id  # [N, B]
        if not bool(is_mask.any()):
            fwd(cur, s, store=True)  # the separate commit forward
            break
        logits = fwd.adapter.head(fwd(cur, s, store=False)).float()  # [N, B, V]
        logits[..., mask_id] = float("-inf")
        x0, conf = sample(logits, temperature)
        k = schedule[min(step, len(schedule) - 1)]
        transfer = _row_transfer(conf, is_mask, k, policy, threshold)
        cur = torch.where(transfer, x0, cur)
    return cur


@torch.inference_mode()
def reference_generate(model: Any, input_ids: Tensor, gen_length: int, block_size: int, steps: int,
                       policy: str = "static", threshold: float = 0.9, temperature: float = 0.0,
                       stop_ids: list[int] | None = None) -> ReferenceResult:
    t0 = time.perf_counter()
    dev = model.device
    n, plen = input_ids.shape
    num_blocks = -(-(plen + gen_length) // block_size)
    total = num_blocks * block_size
    x = torch.full((n, total), model.mask_token_id, dtype=torch.long, device=dev)
    x[:, :plen] = input_ids.to(dev)
    fwd = _Forward(model, n, total, block_size)
    prefill_blocks = plen // block_size
    if prefill_blocks > 0:
        fwd(x[:, :prefill_blocks * block_size], 0, store=True)
    schedule = transfer_schedule(block_size, steps)
    stops = torch.tensor(sorted(stop_ids or []), dtype=torch.long, device=dev)
    first: float | None = None
    for b in range(prefill_blocks, num_blocks):
        s, e = b * block_size, (b + 1) * block_size
        x[:, s:e] = _denoise_block(fwd, x[:, s:e].clone(), s, schedule, policy, threshold, temperature)
        if first is None:
            first = time.perf_counter() - t0
        if e > plen and bool(torch.isin(x[:, max(plen, s):e], stops).any()):
            break  # the reference stops the whole batch at the first stop token of any row
    return ReferenceResult(x[:, plen:plen + gen_length], fwd.forwards, first)
