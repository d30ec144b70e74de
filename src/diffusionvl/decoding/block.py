"""Block decoding (with a KV cache or recomputing the prefix) and the LLaDA-style full-diffusion baseline.

Contract: each decoder is a generator over one batch that fills `state.tokens` ([N, T] slot canvas, layout.py)
block by block and yields the state after every finished block; the caller (decoding/__init__.py) turns states
into texts, streams and stats. Within a block, every step predicts all masked positions, samples a candidate and a
confidence per position, and a policy (sampling.py) picks which to fill. Host syncs: one per block (is every
sample done?), plus one per step only where a step can end the block early (threshold policy, `stop_early`, or the
first block whose prompt leftovers leave fewer masks than the static schedule expects).

Early stop (`DecodeConfig.stop_early`, block decoder): a sample's answer ends at its first stop token; positions after
it are never read. So once every position up to and including that token is filled, the sample needs no more forwards
in its block: its remaining masks are dropped from the work mask (`live_masks`, which also drops samples done in
earlier blocks) and never filled, and a block ends when no sample has work left. Which positions a step fills is
unchanged (the policies still rank every masked position, those after the stop token included), so every answer is
the same token for token; only forwards are saved. With sampling, a batch whose block ends earlier draws fewer random
numbers, so the other samples' later blocks see other (equally distributed) draws. `state.row_forwards` counts, per
sample, the forwards that still had work for it (`charge`), for the per-sample stats (decoding/__init__.py).

Cache variant, per block b starting at slot s:
  step 0 (b > 0): forward slots [s - B, s + B): the previous block, now clean, is committed to the cache in the
                  same forward that runs the first denoising step of block b (the "fused commit");
  later steps:    forward slots [s, s + B) only; their keys overwrite the same cache slots.
Prediction alignment (DiffusionConfig.prediction): 'same' reads each position's own logits; 'shift' reads the
logits of the position before (the block's first token is predicted by the previous block's last, clean token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from diffusionvl.config import DecodeConfig
from diffusionvl.decoding.layout import Layout
from diffusionvl.decoding.runner import Runner
from diffusionvl.sampling import POLICIES, sample, transfer_schedule

Tensor = torch.Tensor


@dataclass
class DecodeState:
    layout: Layout
    tokens: Tensor  # [N, T] slot canvas (device)
    done: Tensor  # [N] bool: stop token seen or budget used
    final_end: int = 0  # slots < final_end hold final tokens
    forwards: int = 0
    prefill_forwards: int = 0
    backend: str = "plain"  # how the steps ran: "plain" or "fast/<eager|graph|compile>" (backend.py)
    notes: list[str] = field(default_factory=list)  # fallbacks taken on the way (backend.py)
    gen_start: Tensor | None = None  # [N] layout.gen_start on the device (copied once)
    row_forwards: Tensor | None = None  # [N] long: forwards that had work for each sample (prefill excluded)

    def __post_init__(self) -> None:
        if self.gen_start is None:
            self.gen_start = self.layout.gen_start.to(self.tokens.device)
        if self.row_forwards is None:
            self.row_forwards = torch.zeros(self.tokens.shape[0], dtype=torch.long, device=self.tokens.device)


def denoise(logits: Tensor, block: Tensor, is_mask: Tensor, k: int, cfg: DecodeConfig, mask_id: int,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """One denoising step. logits [N, B, V], block/is_mask [N, B] -> (block, is_mask) after filling."""
    logits = logits.float()
    logits[..., mask_id] = float("-inf")  # never predict the mask token itself
    cand, conf = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    fill = POLICIES[cfg.policy](conf, is_mask, k, cfg.threshold)
    return torch.where(fill, cand, block), is_mask & ~fill


def mark_done(state: DecodeState, s: int, e: int, stop_ids: Tensor, max_new: int) -> None:
    """Update `state.done` after slots [s, e) became final: a stop token in a sample's budget, or budget used."""
    gen_start = state.gen_start[:, None]  # [N, 1]
    slots = torch.arange(s, e, device=state.tokens.device)[None]  # [1, Q]
    in_budget = (slots >= gen_start) & (slots < gen_start + max_new)
    hit = (torch.isin(state.tokens[:, s:e], stop_ids) & in_budget).any(dim=1)
    state.done |= hit | (e >= gen_start[:, 0] + max_new)
    state.final_end = e


def live_masks(state: DecodeState, block: Tensor, is_mask: Tensor, s: int, stop_ids: Tensor,
               max_new: int) -> Tensor:
    """The masked positions of block [s, s + B) still worth filling: `is_mask` [N, B] with the rows of samples that
    are done, or whose answer ended in this block, cleared. A sample's answer ended when a stop token is placed (filled)
    in its budget with no masked position before it; a stop token placed after a still-masked position does not end
    it (that position may yet become the first stop token). No host sync. block: [N, B] tokens."""
    gen_start = state.gen_start[:, None]  # [N, 1]
    slots = torch.arange(s, s + block.shape[1], device=block.device)[None]  # [1, B]
    in_budget = (slots >= gen_start) & (slots < gen_start + max_new)
    stop = torch.isin(block, stop_ids) & ~is_mask & in_budget  # placed stop tokens of the answer
    needed = is_mask & (stop.cumsum(dim=1) == 0)  # masks before the first placed stop token
    return is_mask & (needed.any(dim=1) & ~state.done)[:, None]


def charge(state: DecodeState, busy: Tensor | None, forwards: int = 1) -> None:
    """Count `forwards` forwards in `state.row_forwards` for each sample that is busy ([N] bool; None = all) and not
    done yet. Block decoders pass `is_mask.any(1)` before each step (a sample with nothing left to fill in the block
    is not charged for the batch's remaining steps); AR passes None once per chunk."""
    work = ~state.done if busy is None else busy & ~state.done
    state.row_forwards += work.long() * forwards


def _zeros_logit(h: Tensor, vocab: int) -> Tensor:
    return h.new_zeros(h.shape[0], 1, vocab)


def block_decode(model: Any, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
                 generator: torch.Generator | None) -> Iterator[DecodeState]:
    bsz, steps, mask_id, head = cfg.block_size, cfg.steps, model.mask_token_id, model.adapter.head
    shift = model.config.prediction == "shift"
    runner = Runner(model, layout, vision, use_cache=cfg.use_cache)
    tokens = layout.tokens.to(model.device)
    state = DecodeState(layout, tokens, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device))
    schedule = transfer_schedule(bsz, steps)
    p = layout.prefill
    prev: Tensor | None = None  # [N, 1, V]: logits predicting the current block's first token (shift + cache)
    if cfg.use_cache and p > 0:
        prev = head(runner.forward(tokens[:, :p], 0)[:, -1:])
        state.prefill_forwards = 1
    for b in range(layout.num_blocks):
        s = p + b * bsz
        is_mask = tokens[:, s:s + bsz] == mask_id
        if cfg.stop_early:
            is_mask = live_masks(state, tokens[:, s:s + bsz], is_mask, s, stop_ids, cfg.max_new_tokens)
        early_exit = cfg.policy != "static" or b == 0 or cfg.stop_early
        for step in range(steps):
            charge(state, is_mask.any(dim=1))
            if cfg.use_cache and step == 0 and b > 0:  # fused commit of block b-1 + first step of block b
                h = runner.forward(tokens[:, s - bsz:s + bsz], s - bsz)
                logits = head(h[:, bsz - 1:2 * bsz - 1]) if shift else head(h[:, bsz:])
                prev = logits[:, :1] if shift else None
            elif cfg.use_cache:
                h = runner.forward(tokens[:, s:s + bsz], s)
                if shift:
                    first = prev if prev is not None else _zeros_logit(h, model.vocab_size)
                    logits = torch.cat([first.to(h.dtype), head(h[:, :bsz - 1])], dim=1)
                else:
                    logits = head(h)
            else:  # recompute the whole prefix every step
                h = runner.forward(tokens[:, :s + bsz], 0)
                if shift and s == 0:
                    logits = torch.cat([_zeros_logit(h, model.vocab_size), head(h[:, :bsz - 1])], dim=1)
                else:
                    logits = head(h[:, s - 1:s + bsz - 1]) if shift else head(h[:, s:s + bsz])
            block, is_mask = denoise(logits, tokens[:, s:s + bsz], is_mask, schedule[step], cfg, mask_id, generator)
            tokens[:, s:s + bsz] = block
            if cfg.stop_early:
                is_mask = live_masks(state, block, is_mask, s, stop_ids, cfg.max_new_tokens)
            if early_exit and not bool(is_mask.any()):
                break
        state.forwards = runner.forwards - state.prefill_forwards
        mark_done(state, s, s + bsz, stop_ids, cfg.max_new_tokens)
        yield state
        if bool(state.done.all()):
            return


def full_decode(model: Any, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
                generator: torch.Generator | None) -> Iterator[DecodeState]:
    """LLaDA-style baseline: the whole [prompt ; answer canvas] is re-run every step with bidirectional attention
    and no cache; the canvas is denoised in semi-autoregressive blocks of B tokens, S steps each."""
    bsz, steps, mask_id, head = cfg.block_size, cfg.steps, model.mask_token_id, model.adapter.head
    shift = model.config.prediction == "shift"
    runner = Runner(model, layout, vision, use_cache=False, bidirectional=True)
    tokens = layout.tokens.to(model.device)
    state = DecodeState(layout, tokens, torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device))
    schedule = transfer_schedule(bsz, steps)
    for b in range(layout.num_blocks):
        s = layout.prefill + b * bsz
        is_mask = tokens[:, s:s + bsz] == mask_id
        for step in range(steps):
            charge(state, is_mask.any(dim=1))
            h = runner.forward(tokens, 0)
            logits = head(h[:, s - 1:s + bsz - 1]) if shift else head(h[:, s:s + bsz])
            block, is_mask = denoise(logits, tokens[:, s:s + bsz], is_mask, schedule[step], cfg, mask_id, generator)
            tokens[:, s:s + bsz] = block
            if cfg.policy != "static" and not bool(is_mask.any()):
                break
        state.forwards = runner.forwards
        mark_done(state, s, s + bsz, stop_ids, cfg.max_new_tokens)
        yield state
        if bool(state.done.all()):
            return
