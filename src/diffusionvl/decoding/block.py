"""Block decoding (with a KV cache or recomputing the prefix) and the LLaDA-style full-diffusion baseline.

Contract: each decoder is a generator over one batch, written once over a slot forward (protocol.py) that
`open_forward` provides: `plain.open_plain` (the default; dynamic shapes) or `static.open_static` (static shapes,
CUDA graphs / compile; decoding/__init__.py picks it via backend.choose). It fills the canvas ([N, T] slots,
layout.py) block by block and yields the `DecodeState` (state.py) after every finished block; the caller turns
states into texts, streams and stats. Within a block, every step (steps.py) predicts all masked positions, samples a
candidate and a confidence per position, and the policy (sampling.py) picks which to fill. Host syncs: one per block
(is every sample done?), plus one per step only where a step can end the block early (threshold policy,
`stop_early`, or the first block, whose prompt leftovers leave fewer masks than the static schedule expects).

Cache variant, per block b starting at slot s: step 0 (b > 0) forwards slots [s - B, s + B), committing the
previous block, now clean, to the cache in the same forward as block b's first denoising step (the "fused commit",
no extra forward); later steps forward [s, s + B), overwriting the same cache slots. Without a cache every step
recomputes [0, s + B) (plain forward only). Full diffusion re-runs the whole canvas every step, bidirectionally.
Early stop and the per-sample forward count (state.py) run between the steps on the stepper's is-mask state.
Fixed positions (an answer template's tokens, template.py) are not the mask id: like a prompt's leftover tokens they
are in the block before its first step and never remasked; a block needs at most the steps that fill its most-masked
row (`block_steps`, known on the host before decoding), none when every position is fixed.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, ContextManager, Iterator

import torch

from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.sampling import transfer_schedule
from diffusionvl.decoding.layout import Layout
from diffusionvl.decoding.plain import open_plain
from diffusionvl.decoding.protocol import DecoderModel, SlotForward
from diffusionvl.decoding.state import DecodeState, charge, mark_done, stop_ban
from diffusionvl.decoding.steps import BlockStepper

Tensor = torch.Tensor
OpenForward = Callable[..., ContextManager[SlotForward]]  # (model, layout, vision, cfg, *, use_cache, attention_block)


def new_state(fwd: SlotForward, layout: Layout) -> DecodeState:
    state = DecodeState(layout, fwd.tokens, torch.zeros(fwd.tokens.shape[0], dtype=torch.bool,
                                                        device=fwd.tokens.device))
    state.backend = fwd.backend
    return state


def finish_block(state: DecodeState, fwd: SlotForward, forwards: int, s: int, e: int, stop_ids: Tensor,
                 max_new: int) -> None:
    """Record a finished block (or AR chunk) [s, e): forward count, what ran the steps, which samples are done."""
    state.forwards = forwards
    state.backend = fwd.backend
    state.notes = list(fwd.notes)
    mark_done(state, s, e, stop_ids, max_new)


def block_steps(layout: Layout, cfg: DecodeConfig, mask_id: int) -> list[int]:
    """Steps each block needs at most, read on the host from the layout before decoding: the static schedule's steps
    to fill the block's most-masked row (every policy fills at least that many a step); 0 for a block whose every
    position is fixed (an answer template's tokens, a prompt's leftover): it needs no denoising step."""
    bsz, n = cfg.block_size, layout.tokens.shape[0]
    masks = (layout.tokens[:, layout.prefill:] == mask_id).view(n, -1, bsz).sum(dim=2).amax(dim=0)  # [blocks]
    filled = list(itertools.accumulate(transfer_schedule(bsz, cfg.steps)))
    return [next(j + 1 for j, c in enumerate(filled) if c >= m) if m else 0 for m in masks.tolist()]


def commit(fwd: SlotForward, state: DecodeState, start: int, end: int) -> int:
    """One forward over the clean slots [start, end) whose keys are not cached yet (blocks of fixed tokens that no
    step forwarded): their keys/values are written to the cache. Returns the forwards spent (1)."""
    window = fwd.window(end - start)
    fwd.aim(window, start)
    fwd.hidden(window)
    charge(state, None)
    return 1


def denoise_block(fwd: SlotForward, stepper: BlockStepper, state: DecodeState, cfg: DecodeConfig, shapes: list[str],
                  stop_ids: Tensor, generator: torch.Generator | None, *, early_exit: bool, stop_early: bool,
                  cap: int | None = None) -> int:
    """Run the block's steps (step i has shape `shapes[i]`) until its schedule is spent (or `cap` steps, block_steps),
    or, with `early_exit`, until no sample has a mask left to fill (with `stop_early`, none with work left). Returns
    the forwards spent."""
    schedule = transfer_schedule(cfg.block_size, cfg.steps)
    steps = cfg.steps if cap is None else min(cap, cfg.steps)
    for step in range(steps):
        stepper.k.fill_(schedule[step])
        charge(state, stepper.is_mask.any(dim=1))
        logits = fwd.run(shapes[step], stepper.fns[shapes[step]])
        if logits is not None:
            stepper.apply(logits, generator)
        if stop_early:
            stepper.settle(state, stop_ids, cfg.max_new_tokens)
        if early_exit and not bool(stepper.is_mask.any()):
            return step + 1
    return steps


def _block_shapes(cfg: DecodeConfig, b: int) -> list[str]:
    if not cfg.use_cache:
        return ["prefix"] * cfg.steps
    return ["fused" if b > 0 and step == 0 else "step" for step in range(cfg.steps)]


def block_decode(model: DecoderModel, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
                 generator: torch.Generator | None, open_forward: OpenForward = open_plain) -> Iterator[DecodeState]:
    """Blocks whose every position is fixed (block_steps: 0) get no step; with the cache their keys are written by
    the next block's fused step, or, when several such blocks precede a block with masks, the ones before the last
    by one `commit` forward. `stale` is the first block whose final keys are not cached yet."""
    bsz, p = cfg.block_size, layout.prefill
    caps = block_steps(layout, cfg, model.mask_token_id)
    with open_forward(model, layout, vision, cfg, use_cache=cfg.use_cache, attention_block=bsz) as fwd:
        stepper = fwd.stepper(lambda f: BlockStepper(f, model, cfg))
        stepper.set_ban(stop_ban(layout, stop_ids, model.eos_token_id))
        state = new_state(fwd, layout)
        if cfg.use_cache and p > 0:
            stepper.set_prev(model.adapter.head(fwd.prefill(p)[:, -1:]))
            state.prefill_forwards = 1
        else:  # no complete prompt block before the first block (or no cache): nothing precedes slot `prefill`
            stepper.set_prev(None)
        forwards, stale = 0, 0
        for b in range(layout.num_blocks):
            s = p + b * bsz
            stepper.begin_block(s, prefix=not cfg.use_cache)
            if caps[b]:
                if cfg.use_cache and b - stale > 1:
                    forwards += commit(fwd, state, p + stale * bsz, s - bsz)
                if cfg.stop_early:
                    stepper.settle(state, stop_ids, cfg.max_new_tokens)
                early_exit = cfg.policy != "static" or b == 0 or cfg.stop_early
                forwards += denoise_block(fwd, stepper, state, cfg, _block_shapes(cfg, b), stop_ids, generator,
                                          early_exit=early_exit, stop_early=cfg.stop_early, cap=caps[b])
                stale = b
            finish_block(state, fwd, forwards, s, s + bsz, stop_ids, cfg.max_new_tokens)
            yield state
            if bool(state.done.all()):
                return


def full_decode(model: DecoderModel, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
                generator: torch.Generator | None, open_forward: OpenForward = open_plain) -> Iterator[DecodeState]:
    """LLaDA-style baseline: the whole [prompt ; answer canvas] is re-run every step with bidirectional attention
    and no cache; the canvas is denoised in semi-autoregressive blocks of B tokens, S steps each."""
    bsz = cfg.block_size
    caps = block_steps(layout, cfg, model.mask_token_id)
    with open_forward(model, layout, vision, cfg, use_cache=False, attention_block=layout.total) as fwd:
        stepper = fwd.stepper(lambda f: BlockStepper(f, model, cfg))
        stepper.set_ban(stop_ban(layout, stop_ids, model.eos_token_id))
        state = new_state(fwd, layout)
        forwards = 0
        for b in range(layout.num_blocks):
            s = layout.prefill + b * bsz
            stepper.begin_block(s)
            if caps[b]:
                forwards += denoise_block(fwd, stepper, state, cfg, ["canvas"] * cfg.steps, stop_ids, generator,
                                          early_exit=cfg.policy != "static", stop_early=False, cap=caps[b])
            finish_block(state, fwd, forwards, s, s + bsz, stop_ids, cfg.max_new_tokens)
            yield state
            if bool(state.done.all()):
                return
