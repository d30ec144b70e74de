"""Autoregressive baseline on the same backbone: causal prefill, then one token per forward with the slot cache.

Contract: same generator protocol as the block decoders (block.py; yields a DecodeState every `chunk` tokens),
written once over a slot forward (`open_forward`: plain or static, protocol.py). The layout is the B = 1 layout
(plain left padding), whose block-causal mask is the causal mask, so this is exactly greedy or sampled AR decoding
of the unconverted backbone (test: equals transformers `generate`). The step (steps.py `ARStepper`) forwards one
token, samples the next into the following slot and advances its own slot, so consecutive steps need no host work.
Host sync once per chunk; the plain forward builds one mask per chunk too (attention reads up to the chunk's end;
the causal mask hides the rest). Generation slots hold the mask id until a token is sampled into them; an answer
template's fixed tokens (template.py) are there from the start and the step keeps them, so a template is decoded left
to right with its fixed tokens forced and one forward per token, fixed ones included (the honest AR baseline).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from diffusionvl.core.config import DecodeConfig
from diffusionvl.decoding.block import OpenForward, finish_block, new_state
from diffusionvl.decoding.layout import Layout
from diffusionvl.decoding.plain import open_plain
from diffusionvl.decoding.protocol import DecoderModel
from diffusionvl.decoding.state import DecodeState, charge, stop_ban
from diffusionvl.decoding.steps import ARStepper

Tensor = torch.Tensor


def ar_decode(model: DecoderModel, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
              generator: torch.Generator | None, open_forward: OpenForward = open_plain,
              chunk: int = 8) -> Iterator[DecodeState]:
    p, last = layout.prefill, cfg.max_new_tokens - 1
    with open_forward(model, layout, vision, cfg, use_cache=True, attention_block=1) as fwd:
        stepper = fwd.stepper(lambda f: ARStepper(f, model, cfg))
        stepper.set_ban(stop_ban(layout, stop_ids, model.eos_token_id))
        state = new_state(fwd, layout)
        logits = stepper.prepare(model.adapter.head(fwd.prefill(p)[:, -1]))  # [N, V]
        state.prefill_forwards = 1
        fwd.aim(stepper.slot, p - 1)
        stepper.advance(logits, generator)  # token 0 at slot p
        last_mark, forwards = p, 0
        for j in range(cfg.max_new_tokens):  # token j is in slot p + j
            end = p + j + 1
            if end - last_mark >= chunk or j == last:
                charge(state, None, forwards - state.forwards)  # this chunk's forwards, to samples not done
                finish_block(state, fwd, forwards, last_mark, end, stop_ids, cfg.max_new_tokens)
                last_mark = end
                yield state
                if bool(state.done.all()):
                    return
            if j < last:
                if j % chunk == 0:  # one mask (and one cache view length) per chunk of tokens
                    fwd.plan(p + j, min(p + j + chunk, layout.total))
                logits = fwd.run("token", stepper.fns["token"])
                if logits is not None:
                    stepper.advance(logits, generator)
                forwards += 1
