"""Per-batch decoding state and its bookkeeping, shared by every decoding loop (block.py, ar.py) and step (steps.py).

Contract: `DecodeState` is what a decoder yields after each finished block (or AR chunk): the slot canvas, which
samples are done, how far the canvas is final, and the forward counts (batch totals, and per sample in
`row_forwards`, charged by `charge` only for forwards that still had work for the sample). `denoise` is one
denoising step on a block (sample a candidate and a confidence per position; the policy, sampling.py, picks which
masked positions take theirs). `mark_done` ends samples at a stop token inside their budget or at the budget's end.

Early stop (`DecodeConfig.stop_early`, block decoder): a sample's answer ends at its first stop token; positions after
it are never read. So once every position up to and including that token is filled, the sample needs no more forwards
in its block: its remaining masks are dropped from the work mask (`live_masks`, which also drops samples done in
earlier blocks) and never filled, and a block ends when no sample has work left. Which positions a step fills is
unchanged (the policies still rank every masked position, those after the stop token included), so every answer is
the same token for token; only forwards are saved. With sampling, a batch whose block ends earlier draws fewer random
numbers, so the other samples' later blocks see other (equally distributed) draws. No function here syncs with the
host.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.sampling import POLICIES, sample
from diffusionvl.decoding.layout import Layout

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


def denoise(logits: Tensor, block: Tensor, is_mask: Tensor, k: Tensor | int, cfg: DecodeConfig, mask_id: int,
            generator: torch.Generator | None, ban: Ban | None = None) -> tuple[Tensor, Tensor]:
    """One denoising step. logits [N, B, V], block/is_mask [N, B] -> (block, is_mask) after filling; `k` is the
    static schedule's count (an int or a 0-d device tensor, same result); `ban` (`stop_ban`): tokens some rows never
    sample."""
    logits = logits.float()
    logits[..., mask_id] = float("-inf")  # never predict the mask token itself
    if ban is not None:
        logits = apply_ban(logits, ban)
    cand, conf = sample(logits, cfg.temperature, cfg.top_k, cfg.top_p, generator)
    fill = POLICIES[cfg.policy](conf, is_mask, k, cfg.threshold)
    return torch.where(fill, cand, block), is_mask & ~fill


Ban = tuple[Tensor, Tensor]  # ([N] bool rows, [K] long token ids): those rows never sample those tokens


def stop_ban(layout: Layout, stop_ids: Tensor, eos_id: int) -> Ban | None:
    """The stop tokens (and the end-of-answer token) as banned for the rows with an answer template (template.py:
    a slot is filled with exactly N tokens); None when no row has a template."""
    rows = layout.templated
    if rows is None or not bool(rows.any()):
        return None
    ids = torch.cat([stop_ids, torch.tensor([eos_id], dtype=torch.long, device=stop_ids.device)]).unique()
    return rows.to(stop_ids.device), ids


def apply_ban(logits: Tensor, ban: Ban) -> Tensor:
    """logits [N, ..., V] with the banned tokens of the banned rows at -inf."""
    rows, ids = ban
    shape = (-1,) + (1,) * (logits.dim() - 1)
    banned = logits.index_select(-1, ids).masked_fill(rows.view(shape), float("-inf"))
    return logits.index_copy(-1, ids, banned)


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
