"""Autoregressive baseline on the same backbone: causal prefill, then one token per forward with the slot cache.

Contract: same generator protocol as the block decoders (yields a DecodeState every `chunk` tokens). The layout is
the B = 1 layout (plain left padding), whose block-causal mask is the causal mask, so this is exactly greedy or
sampled AR decoding of the unconverted backbone (test: equals transformers `generate`). Host sync once per chunk;
the mask is built once per chunk too (attention reads up to the chunk's end; the causal mask hides the rest).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from diffusionvl.config import DecodeConfig
from diffusionvl.decoding.block import DecodeState, charge, mark_done
from diffusionvl.decoding.layout import Layout
from diffusionvl.decoding.runner import Runner
from diffusionvl.sampling import sample

Tensor = torch.Tensor


def ar_decode(model: Any, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
              generator: torch.Generator | None, chunk: int = 8) -> Iterator[DecodeState]:
    head = model.adapter.head
    runner = Runner(model, layout, vision, use_cache=True)
    tokens = layout.tokens.to(model.device)
    state = DecodeState(layout, tokens, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device))
    p = layout.prefill
    logits = head(runner.forward(tokens[:, :p], 0)[:, -1])  # [N, V]
    state.prefill_forwards = 1
    last_mark = p
    for j in range(cfg.max_new_tokens):
        logits = logits.float()
        logits[:, model.mask_token_id] = float("-inf")
        nxt, _ = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
        tokens[:, p + j] = nxt
        end = p + j + 1
        if end - last_mark >= chunk or j == cfg.max_new_tokens - 1:
            charge(state, None, runner.forwards - 1 - state.forwards)  # this chunk's forwards, to samples not done
            state.forwards = runner.forwards - 1
            mark_done(state, last_mark, end, stop_ids, cfg.max_new_tokens)
            last_mark = end
            yield state
            if bool(state.done.all()):
                return
        if j < cfg.max_new_tokens - 1:
            q = p + j
            if j % chunk == 0:  # one mask (and one cache view length) per chunk of tokens
                kv_end = min(q + chunk, layout.total)
                runner.prepare_mask(q, kv_end, kv_end)
            logits = head(runner.forward(tokens[:, q:q + 1], q, kv_len=kv_end)[:, -1])
