"""The decoding steps, written once over a slot forward (protocol.SlotForward): block / full-diffusion and AR.

Contract: a stepper owns a decoder's per-step state (windows on the canvas, the is-mask state, the static
schedule's count `k`, the kept logits `prev`) as tensors updated in place, and exposes its step closures in
`fns` by step shape. The loops (block.py, ar.py) aim the windows between steps and execute a step with
`forward.run(name, fns[name])`: the plain forward calls it, the static one may replay it as a CUDA graph, so a
step touches state only in place (protocol.py). Greedy steps sample and write the tokens inside the step; with
temperature > 0 a step returns the logits and the loop samples right after it (`apply` / `advance` with the
user's generator), so a generator's state is never captured and both forwards make the same draws.

Block step shapes, for block [s, s + B): "fused" forwards [s - B, s + B) (the previous block, now clean, is written
to the cache in the forward of this block's first step); "step" forwards [s, s + B); "prefix" forwards [0, s + B)
(no cache: the prefix is recomputed; plain forward only); "canvas" forwards the whole canvas (full diffusion).
Prediction alignment (DiffusionConfig.prediction): 'same' reads each position's own row; 'shift' reads the row of
the slot before, [s - 1, s + B - 1). When slot s - 1 is not in the forward (the "step" shape, or a first block at
slot 0), its logits are `prev`: kept from the prefill or from the block's fused step (the previous block's last
token is clean, so they do not change), or zeros when nothing precedes the block.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.sampling import sample
from diffusionvl.decoding.protocol import DecoderModel, SlotForward, Window
from diffusionvl.decoding.state import Ban, DecodeState, apply_ban, denoise, live_masks

Tensor = torch.Tensor


def keep_ban(fwd: SlotForward, current: Ban | None, new: Ban | None) -> Ban | None:
    """The call's ban (state.stop_ban) in buffers a captured step can keep reading: copied into `current` in place
    when the shapes match, else replaced, and then the forward's captured steps are forgotten."""
    if new is None:
        if current is not None:
            fwd.forget_captures()
        return None
    if current is not None and all(a.shape == b.shape for a, b in zip(current, new)):
        current[0].copy_(new[0])
        current[1].copy_(new[1])
        return current
    fwd.forget_captures()
    return new[0].clone(), new[1].clone()


class BlockStepper:
    """Steps of the block decoders (cached, prefix-recomputing) and of full diffusion over one forward's canvas."""

    def __init__(self, forward: SlotForward, model: DecoderModel, cfg: DecodeConfig):
        fwd, bsz = forward, cfg.block_size
        self.fwd, self.cfg, self.bsz, self.head = fwd, cfg, bsz, model.adapter.head
        self.shift = model.config.prediction == "shift"
        self.greedy = cfg.temperature == 0.0
        self.mask_id, self.vocab, self.dtype = model.mask_token_id, model.vocab_size, model.dtype
        n, dev = fwd.tokens.shape[0], fwd.tokens.device
        self.block = fwd.window(bsz)  # [s, s + B): the tokens being denoised
        self.fused = fwd.window(2 * bsz)  # [s - B, s + B): previous block + this one
        self.pred = fwd.window(bsz)  # [s - 1, s + B - 1) ('shift') or the block ('same'): rows predicting it
        self.tail = fwd.window(bsz - 1)  # [s, s + B - 1): 'shift' rows after slot s - 1
        self.canvas = fwd.window(fwd.tokens.shape[1])  # [0, T)
        self.prefix: Window = fwd.window(0)  # [0, s + B), re-made per block (plain forward only)
        fwd.aim(self.canvas, 0)
        self.is_mask = torch.zeros(n, bsz, dtype=torch.bool, device=dev)  # [N, B]
        self.k = torch.zeros((), dtype=torch.long, device=dev)  # static schedule's count for this step
        self.prev: Tensor | None = None  # [N, 1, V] logits of slot s - 1 ('shift')
        self.ban: Ban | None = None  # stop tokens never sampled in rows with an answer template (state.stop_ban)
        self.fns: dict[str, Callable[[], Tensor | None]] = {
            "fused": lambda: self._step(self.fused), "step": lambda: self._step(self.block),
            "prefix": lambda: self._step(self.prefix), "canvas": lambda: self._step(self.canvas)}

    def set_prev(self, logits: Tensor | None) -> None:
        """Logits of the slot before the first block (None: nothing precedes it, zeros)."""
        if logits is None:
            logits = torch.zeros(self.is_mask.shape[0], 1, self.vocab, dtype=self.dtype, device=self.k.device)
        if self.prev is None or self.prev.shape != logits.shape or self.prev.dtype != logits.dtype:
            if self.prev is not None:
                self.fwd.forget_captures()  # captured steps read the old buffer
            self.prev = torch.empty_like(logits)
        self.prev.copy_(logits)

    def set_ban(self, ban: Ban | None) -> None:
        self.ban = keep_ban(self.fwd, self.ban, ban)

    def begin_block(self, s: int, prefix: bool = False) -> None:
        """Aim the windows at block [s, s + B) and load its is-mask state."""
        fwd = self.fwd
        fwd.aim(self.block, s)
        fwd.aim(self.fused, s - self.bsz)
        fwd.aim(self.pred, s - 1 if self.shift else s)
        fwd.aim(self.tail, s)
        if prefix:
            self.prefix = fwd.window(s + self.bsz)
            fwd.aim(self.prefix, 0)
        self.is_mask.copy_(fwd.read(self.block) == self.mask_id)

    def settle(self, state: DecodeState, stop_ids: Tensor, max_new: int) -> None:
        """Early stop (state.py `live_masks`): clear, in place, the rows of samples with no work left in the block."""
        s = self.block.start
        self.is_mask.copy_(live_masks(state, self.fwd.read(self.block), self.is_mask, s, stop_ids, max_new))

    def logits(self, hidden: Tensor, window: Window) -> Tensor:
        """[N, B, V] logits predicting the block from the forward of `window` (module docstring: alignment)."""
        fwd = self.fwd
        if not self.shift:
            return self.head(fwd.rows(hidden, window, self.block))
        if window.start == self.block.start:  # slot s - 1 is not in this forward
            assert self.prev is not None
            return torch.cat([self.prev.to(hidden.dtype), self.head(fwd.rows(hidden, window, self.tail))], dim=1)
        logits = self.head(fwd.rows(hidden, window, self.pred))
        if window is self.fused:
            assert self.prev is not None
            self.prev.copy_(logits[:, :1])  # slot s - 1 is clean: the block's later steps reuse its logits
        return logits

    def apply(self, logits: Tensor, generator: torch.Generator | None) -> None:
        """Sample and unmask in place: the canvas block and the is-mask state."""
        block, is_mask = denoise(logits, self.fwd.read(self.block), self.is_mask, self.k, self.cfg, self.mask_id,
                                 generator, self.ban)
        self.fwd.write(self.block, block)
        self.is_mask.copy_(is_mask)

    def _step(self, window: Window) -> Tensor | None:
        logits = self.logits(self.fwd.hidden(window), window)
        if self.greedy:
            self.apply(logits, None)
            return None
        return logits


class ARStepper:
    """The one-token AR step: forward the token at `slot`, sample the next one into the slot after it, advance.
    A slot that already holds a token (an answer template's fixed token, not the mask id) keeps it."""

    def __init__(self, forward: SlotForward, model: DecoderModel, cfg: DecodeConfig):
        self.fwd, self.cfg, self.head = forward, cfg, model.adapter.head
        self.mask_id = model.mask_token_id
        self.greedy = cfg.temperature == 0.0
        self.slot = forward.window(1)  # the token fed next
        self.ban: Ban | None = None  # stop tokens never sampled in rows with an answer template (state.stop_ban)
        self.fns: dict[str, Callable[[], Any]] = {"token": self._step}

    def set_ban(self, ban: Ban | None) -> None:
        self.ban = keep_ban(self.fwd, self.ban, ban)

    def prepare(self, logits: Tensor) -> Tensor:
        """[N, V] logits -> float, the mask token (and the banned stop tokens) never predicted."""
        logits = logits.float()
        logits[:, self.mask_id] = float("-inf")
        return logits if self.ban is None else apply_ban(logits, self.ban)

    def advance(self, logits: Tensor, generator: torch.Generator | None) -> None:
        nxt, _ = sample(logits, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, generator)  # [N]
        self.fwd.advance(self.slot)
        held = self.fwd.read(self.slot)  # [N, 1]: the mask id, or a template's fixed token
        self.fwd.write(self.slot, torch.where(held == self.mask_id, nxt[:, None], held))

    def _step(self) -> Tensor | None:
        logits = self.prepare(self.head(self.fwd.hidden(self.slot)[:, -1]))  # [N, V]
        if self.greedy:
            self.advance(logits, None)
            return None
        return logits
