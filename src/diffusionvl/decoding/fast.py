"""Fast path of the block, AR and full-diffusion decoders: static shapes, device-side state, capturable steps.

Contract: same generator protocol and the same tokens as the plain decoders (block.py, ar.py; test:
tests/test_fast_decoding.py), but every decoding step is a zero-argument closure over static buffers
(static.py) that `StepExecutor` (backend.py) runs eagerly or replays as a CUDA graph:
- block: two step shapes, "fused" (2B queries: commit of block b-1 + first step of block b) and "step" (B queries);
  the prefill (dynamic length) runs eagerly. Slot indices, the static schedule's k and the is-mask state are device
  buffers updated in place; the mask is computed on the device from the slot buffer.
- ar: one step shape (1 query) that also samples and writes the next token and advances its own slot buffer, so
  consecutive steps need no host work at all.
- full: one step shape (the whole canvas, no cache).
Greedy steps include the sampling and unmasking in the captured graph; with temperature > 0 the graph ends at the
logits and sampling runs eagerly after it (a user generator's state is not captured), giving the same tokens.
Host syncs: one per block (is every sample done?) for static block decoding, plus one per step only where a step can
end a block early (threshold policy; `stop_early`; the first block, whose prompt leftovers can leave fewer masks than
the schedule expects) and one per `chunk` tokens for AR. Early stop and the per-sample forward count (block.py) run
eagerly between the steps, on the is-mask buffer in place: the captured steps are the same with or without them.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from diffusionvl.config import DecodeConfig
from diffusionvl.decoding.block import DecodeState, charge, denoise, live_masks, mark_done
from diffusionvl.decoding.layout import Layout
from diffusionvl.decoding.static import StaticSession, acquire, bucketed, release
from diffusionvl.sampling import sample, transfer_schedule

Tensor = torch.Tensor


def _settings_key(cfg: DecodeConfig, model: Any) -> tuple:
    """Everything a captured step bakes in besides shapes (policy, sampling, alignment, special ids)."""
    return (cfg.decoder, cfg.block_size, cfg.policy, cfg.threshold, cfg.temperature, cfg.top_k, cfg.top_p,
            model.config.prediction, model.mask_token_id)


class _BlockSteps:
    """Step closures of the cached block decoder over one session's buffers."""

    def __init__(self, sess: StaticSession, cfg: DecodeConfig):
        model, dev, bsz = sess.model, sess.device, cfg.block_size
        self.sess, self.cfg, self.bsz, self.head = sess, cfg, bsz, model.adapter.head
        self.shift = model.config.prediction == "shift"
        self.greedy = cfg.temperature == 0.0
        self.mask_id = model.mask_token_id
        self.arange = torch.arange(2 * bsz, device=dev)
        self.slots_b = torch.zeros(bsz, dtype=torch.long, device=dev)  # [B] the current block's slots
        self.slots_2b = torch.zeros(2 * bsz, dtype=torch.long, device=dev)  # [2B] previous block + current block
        self.is_mask = torch.zeros(sess.n, bsz, dtype=torch.bool, device=dev)  # [N, B]
        self.k = torch.zeros((), dtype=torch.long, device=dev)  # static schedule's count for this step
        self.prev: Tensor | None = None  # [N, 1, V] logits predicting the block's first token ('shift')
        self.fns = {"step": lambda: self._step(False), "fused": lambda: self._step(True)}

    def set_prev(self, logits: Tensor) -> None:
        if self.prev is None or self.prev.shape != logits.shape or self.prev.dtype != logits.dtype:
            if self.prev is not None:
                self.sess.executor.reset()  # captured graphs read the old buffer: capture again
            self.prev = torch.empty_like(logits)
        self.prev.copy_(logits)

    def begin_block(self, s: int) -> None:
        self.slots_b.copy_(self.arange[: self.bsz] + s)
        self.slots_2b.copy_(self.arange + (s - self.bsz))
        self.is_mask.copy_(self.sess.tokens.index_select(1, self.slots_b) == self.mask_id)

    def settle(self, state: DecodeState, s: int, stop_ids: Tensor, max_new: int) -> None:
        """Early stop: clear, in place, the is-mask rows of samples that are done or whose answer is complete."""
        block = self.sess.tokens[:, s:s + self.bsz]  # [N, B]
        self.is_mask.copy_(live_masks(state, block, self.is_mask, s, stop_ids, max_new))

    def logits(self, fused: bool) -> Tensor:
        """[N, B, V] logits predicting the current block (see block.py for the alignment)."""
        bsz, total = self.bsz, self.sess.total
        if fused:
            h = self.sess.forward(self.slots_2b, total)  # [N, 2B, D]
            logits = self.head(h[:, bsz - 1:2 * bsz - 1]) if self.shift else self.head(h[:, bsz:])
            if self.shift:
                assert self.prev is not None
                self.prev.copy_(logits[:, :1])
            return logits
        h = self.sess.forward(self.slots_b, total)  # [N, B, D]
        if not self.shift:
            return self.head(h)
        assert self.prev is not None
        return torch.cat([self.prev.to(h.dtype), self.head(h[:, :bsz - 1])], dim=1)

    def apply(self, logits: Tensor, generator: torch.Generator | None) -> None:
        """Sample and unmask in place: canvas block and is-mask state."""
        block = self.sess.tokens.index_select(1, self.slots_b)  # [N, B]
        block, is_mask = denoise(logits, block, self.is_mask, self.k, self.cfg, self.mask_id, generator)
        self.sess.tokens.index_copy_(1, self.slots_b, block)
        self.is_mask.copy_(is_mask)

    def _step(self, fused: bool) -> Tensor | None:
        logits = self.logits(fused)
        if self.greedy:
            self.apply(logits, None)
            return None
        return logits


def _session(model: Any, layout: Layout, vision: Any, cfg: DecodeConfig, mode: str, mask_block: int | None,
             steps_cls: type) -> StaticSession:
    """Block/AR: a bucketed KV-cached session. Full (mask_block None): no cache, exactly the canvas, all visible."""
    cached = mask_block is not None
    total = bucketed(layout.total) if cached else layout.total
    sess = acquire(model, _settings_key(cfg, model), layout, vision, total=total,
                   mask_block=mask_block if cached else total, use_cache=cached, mode=mode)
    if sess.steps is None:
        sess.steps = steps_cls(sess, cfg)
    return sess


def _new_state(sess: StaticSession, layout: Layout) -> DecodeState:
    state = DecodeState(layout, sess.tokens, torch.zeros(sess.n, dtype=torch.bool, device=sess.device))
    state.backend = f"fast/{sess.executor.mode}"
    return state


def _finish_block(state: DecodeState, sess: StaticSession, forwards: int) -> None:
    state.forwards = forwards
    state.backend = f"fast/{sess.executor.mode}"
    state.notes = list(sess.executor.fallbacks)


def fast_block_decode(model: Any, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
                      generator: torch.Generator | None, mode: str = "eager") -> Iterator[DecodeState]:
    sess = _session(model, layout, vision, cfg, mode, cfg.block_size, _BlockSteps)
    try:
        steps: _BlockSteps = sess.steps
        state = _new_state(sess, layout)
        bsz, schedule, p = cfg.block_size, transfer_schedule(cfg.block_size, cfg.steps), layout.prefill
        if p > 0:
            h = sess.forward(torch.arange(p, device=sess.device), p)  # eager prefill, [N, p, D]
            steps.set_prev(steps.head(h[:, -1:]))
            state.prefill_forwards = 1
        else:  # no complete prompt block: the first block starts at slot 0 with prompt tokens
            steps.set_prev(torch.zeros(sess.n, 1, model.vocab_size, dtype=model.dtype, device=sess.device))
        forwards = 0
        for b in range(layout.num_blocks):
            s = p + b * bsz
            steps.begin_block(s)
            if cfg.stop_early:
                steps.settle(state, s, stop_ids, cfg.max_new_tokens)
            early_exit = cfg.policy != "static" or b == 0 or cfg.stop_early
            for step in range(cfg.steps):
                steps.k.fill_(schedule[step])
                charge(state, steps.is_mask.any(dim=1))
                name = "fused" if b > 0 and step == 0 else "step"
                logits = sess.run(name, steps.fns[name])
                if logits is not None:
                    steps.apply(logits, generator)
                forwards += 1
                if cfg.stop_early:
                    steps.settle(state, s, stop_ids, cfg.max_new_tokens)
                if early_exit and not bool(steps.is_mask.any()):
                    break
            _finish_block(state, sess, forwards)
            mark_done(state, s, s + bsz, stop_ids, cfg.max_new_tokens)
            yield state
            if bool(state.done.all()):
                return
    finally:
        release(sess)


class _ARSteps:
    """The one-token AR step: forward the token at `slot`, sample the next one into slot + 1, advance."""

    def __init__(self, sess: StaticSession, cfg: DecodeConfig):
        self.sess, self.cfg, self.head = sess, cfg, sess.model.adapter.head
        self.mask_id = sess.model.mask_token_id
        self.greedy = cfg.temperature == 0.0
        self.slot = torch.zeros(1, dtype=torch.long, device=sess.device)  # [1] slot of the token fed next
        self.fns = {"token": self._step}

    def prepare(self, logits: Tensor) -> Tensor:
        logits = logits.float()
        logits[:, self.mask_id] = float("-inf")
        return logits

    def advance(self, logits: Tensor, generator: torch.Generator | None) -> None:
        nxt, _ = sample(logits, self.cfg.temperature, self.cfg.top_k, self.cfg.top_p, generator)  # [N]
        self.sess.tokens.index_copy_(1, self.slot + 1, nxt[:, None])
        self.slot.add_(1)

    def _step(self) -> Tensor | None:
        h = self.sess.forward(self.slot, self.sess.total)  # [N, 1, D]
        logits = self.prepare(self.head(h[:, -1]))  # [N, V]
        if self.greedy:
            self.advance(logits, None)
            return None
        return logits


def fast_ar_decode(model: Any, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
                   generator: torch.Generator | None, mode: str = "eager", chunk: int = 8) -> Iterator[DecodeState]:
    sess = _session(model, layout, vision, cfg, mode, 1, _ARSteps)
    try:
        steps: _ARSteps = sess.steps
        state = _new_state(sess, layout)
        p = layout.prefill
        logits = steps.prepare(steps.head(sess.forward(torch.arange(p, device=sess.device), p)[:, -1]))  # [N, V]
        state.prefill_forwards = 1
        steps.slot.fill_(p - 1)
        steps.advance(logits, generator)  # token 0 at slot p
        last_mark, forwards = p, 0
        for j in range(cfg.max_new_tokens):  # token j is in slot p + j
            end = p + j + 1
            if end - last_mark >= chunk or j == cfg.max_new_tokens - 1:
                charge(state, None, forwards - state.forwards)
                _finish_block(state, sess, forwards)
                mark_done(state, last_mark, end, stop_ids, cfg.max_new_tokens)
                last_mark = end
                yield state
                if bool(state.done.all()):
                    return
            if j < cfg.max_new_tokens - 1:
                logits = sess.run("token", steps.fns["token"])
                if logits is not None:
                    steps.advance(logits, generator)
                forwards += 1
    finally:
        release(sess)


class _FullSteps(_BlockSteps):
    """Full-diffusion step: the whole canvas, no cache; logits of the current block's rows only."""

    def __init__(self, sess: StaticSession, cfg: DecodeConfig):
        super().__init__(sess, cfg)
        self.all_slots = torch.arange(sess.total, device=sess.device)  # [T]
        self.rows = torch.zeros(cfg.block_size, dtype=torch.long, device=sess.device)  # [B] hidden rows to read
        self.fns = {"canvas": self._canvas_step}

    def begin_block(self, s: int) -> None:
        super().begin_block(s)
        self.rows.copy_(self.slots_b - 1 if self.shift else self.slots_b)

    def _canvas_step(self) -> Tensor | None:
        h = self.sess.forward(self.all_slots, self.sess.total)  # [N, T, D]
        logits = self.head(h.index_select(1, self.rows))  # [N, B, V]
        if self.greedy:
            self.apply(logits, None)
            return None
        return logits


def fast_full_decode(model: Any, layout: Layout, vision: Any, cfg: DecodeConfig, stop_ids: Tensor,
                     generator: torch.Generator | None, mode: str = "eager") -> Iterator[DecodeState]:
    sess = _session(model, layout, vision, cfg, mode, None, _FullSteps)
    try:
        steps: _FullSteps = sess.steps
        state = _new_state(sess, layout)
        schedule, forwards = transfer_schedule(cfg.block_size, cfg.steps), 0
        for b in range(layout.num_blocks):
            s = layout.prefill + b * cfg.block_size
            steps.begin_block(s)
            for step in range(cfg.steps):
                steps.k.fill_(schedule[step])
                charge(state, steps.is_mask.any(dim=1))
                logits = sess.run("canvas", steps.fns["canvas"])
                if logits is not None:
                    steps.apply(logits, generator)
                forwards += 1
                if cfg.policy != "static" and not bool(steps.is_mask.any()):
                    break
            _finish_block(state, sess, forwards)
            mark_done(state, s, s + cfg.block_size, stop_ids, cfg.max_new_tokens)
            yield state
            if bool(state.done.all()):
                return
    finally:
        release(sess)


FAST_DECODERS = {"block": fast_block_decode, "ar": fast_ar_decode, "full": fast_full_decode}
