"""The static slot forward of the fast path: buffers allocated once per shape and reused across calls.

Contract: a `StaticSession` implements protocol.SlotForward for one shape (model, batch N, canvas length T,
decoder and its settings). It owns every tensor a decoding step touches: the token canvas [N, T], positions
[P, N, T], each sample's first real slot, a `BlockKVCache` of T slots (none for the full-diffusion baseline), image
embeddings (and layer residuals, slots.py) padded to T when the prompt has images, the decoder's stepper (steps.py:
windows, is-mask state, ...), created once per session, and a `StepExecutor` (backend.py) holding the step shapes' CUDA graphs. Windows are
device slot buffers (same storage for the session's life) that `aim` refills in place and `advance` moves inside a
step; `hidden(window)` runs the backbone on the canvas tokens at the window's slots with attention reading all T
slots (fixed shapes): the block-causal mask (`attention_block` = B; = T for full diffusion, i.e. bidirectional)
hides every slot after the query's block, so the result equals reading only the live prefix (plain.py). Embeddings,
positions and the mask are all computed on the device from these buffers, which is what lets a CUDA graph replay a
step with new slot values. The prefill runs eagerly, reading only its own slots.
Sessions are cached per model (`acquire`, LRU of `MAX_SESSIONS`) so graphs captured in one call are replayed by the
next call of the same shape; `load(layout, vision)` refills the buffers in place. A session in use by one decoding
generator is never handed to another (a second concurrent call of the same shape gets its own session).
`open_static` is the decoders' factory for it (plain.py's `open_plain` is the other one).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

from diffusionvl.core.cache import BlockKVCache
from diffusionvl.core.config import DecodeConfig
from diffusionvl.decoding.backend import StepExecutor
from diffusionvl.decoding.layout import Layout
from diffusionvl.decoding.protocol import DecoderModel, Window
from diffusionvl.decoding.slots import prompt_images, slot_groups, slot_mask, with_images

Tensor = torch.Tensor
T = TypeVar("T")

MAX_SESSIONS = 4  # per model; each holds a KV cache of N x T slots (and, on GPU, its CUDA graphs)
SLOT_BUCKET = 128  # cached decoders round T up to a multiple of this, so nearby prompt lengths share a session


def bucketed(total: int) -> int:
    """Session length for a layout of `total` slots (cached decoders). The extra slots are never queried, and the
    block-causal mask hides them as keys (they lie after every query's block)."""
    return -(-total // SLOT_BUCKET) * SLOT_BUCKET


class StaticSession:
    def __init__(self, model: DecoderModel, n: int, total: int, attention_block: int, use_cache: bool,
                 has_vision: bool, mode: str):
        dev, adapter = model.device, model.adapter
        self.adapter, self.device = adapter, dev
        self.total, self.attention_block, self.dtype = total, attention_block, model.dtype
        self.tokens = torch.zeros(n, total, dtype=torch.long, device=dev)  # [N, T]
        self.positions = torch.zeros(adapter.position_dims, n, total, dtype=torch.long, device=dev)  # [P, N, T]
        self.start = torch.zeros(n, dtype=torch.long, device=dev)  # [N]
        self.text_config = adapter.text_config  # looked up once: config attribute access is slow in transformers 5
        self.cache = BlockKVCache(self.text_config.num_hidden_layers, total) if use_cache else None
        self.image_embeds: Tensor | None = None  # [N, T, D], image rows filled (prompt region only)
        self.image_where: Tensor | None = None  # [N, T] bool, True at image-token slots
        self.image_residuals: Tensor | None = None  # [K, N, T, D] layer residuals (slots.PromptImages), zero off them
        self.step_residuals = False  # whether steps (not only the prefill) pass them: images in the slots they read
        self.groups: Tensor | None = None  # [N, T] bidirectional groups of the prefilled prompt (slots.slot_groups)
        if has_vision:
            width = adapter.input_embeddings().weight.shape[1]
            self.image_embeds = torch.zeros(n, total, width, dtype=model.dtype, device=dev)
            self.image_where = torch.zeros(n, total, dtype=torch.bool, device=dev)
        self.arange = torch.arange(total, device=dev)
        self.executor = StepExecutor(mode, dev)
        self._stepper: Any = None  # the decoder's stepper (steps.py), made once per session
        self.busy = False

    @property
    def backend(self) -> str:
        return f"fast/{self.executor.mode}"

    @property
    def notes(self) -> list[str]:
        return self.executor.fallbacks

    def load(self, layout: Layout, vision: dict[str, Any] | None) -> None:
        """Refill the buffers for a new call of the same shape (prompt tokens, positions, padding, images)."""
        t = layout.total
        self.tokens[:, :t] = layout.tokens
        self.positions[:, :, :t] = layout.positions
        self.start.copy_(layout.start)
        if self.image_embeds is not None and self.image_where is not None:
            images = prompt_images(self.adapter, self.tokens, layout, vision)
            assert images is not None
            region = images.embeds.shape[1]
            self.image_embeds[:, :region] = images.embeds  # [N, R, D]
            self.image_where.zero_()
            self.image_where[:, :region] = images.where
            if images.residuals is not None:
                if self.image_residuals is None:  # allocated at the session's first load, before any capture
                    k = images.residuals.shape[0]
                    self.image_residuals = self.image_embeds.new_zeros(k, *self.image_embeds.shape)
                self.image_residuals.zero_()
                self.image_residuals[:, :, :region] = images.residuals
                self._aim_residuals(images.where, layout.prefill if self.cache is not None else 0)
            groups = slot_groups(self.adapter, self.tokens.clone(), layout, vision)
            if groups is not None:
                if self.groups is None:  # allocated at the session's first load, before any capture
                    self.groups = torch.zeros_like(groups)
                self.groups.copy_(groups)

    def _aim_residuals(self, where: Tensor, first: int) -> None:
        """Steps read slots from `first` on (the prefill's end; 0 without a cache): they pass the layer residuals only
        when an image token lies there (a prompt's leftover tokens), since the model's deepstack add indexes by a
        boolean mask, which a CUDA graph cannot capture. A change of that choice re-captures the steps."""
        needed = bool(where[:, first:].any())
        if needed != self.step_residuals:
            self.executor.reset()
            self.step_residuals = needed

    # ---- windows on the canvas: device slot buffers ------------------------------------------------------------
    def window(self, length: int) -> Window:
        if length > self.arange.shape[0]:
            self.arange = torch.arange(length, device=self.device)
        return Window(length, slots=torch.zeros(length, dtype=torch.long, device=self.device))

    def aim(self, window: Window, start: int) -> None:
        window.start = start
        assert window.slots is not None
        window.slots.copy_(self.arange[:window.length] + start)

    def advance(self, window: Window) -> None:
        assert window.slots is not None
        window.slots.add_(1)

    def read(self, window: Window) -> Tensor:
        return self.tokens.index_select(1, window.slots)

    def write(self, window: Window, values: Tensor) -> None:
        self.tokens.index_copy_(1, window.slots, values)

    def rows(self, hidden: Tensor, of: Window, at: Window) -> Tensor:
        assert of.slots is not None and at.slots is not None
        return hidden.index_select(1, at.slots - of.slots[:1])

    # ---- forwards ----------------------------------------------------------------------------------------------
    def prefill(self, length: int) -> Tensor:
        return self._forward(self.arange[:length], length, prefill=True)

    def hidden(self, window: Window) -> Tensor:
        assert window.slots is not None
        return self._forward(window.slots, self.total)

    def plan(self, start: int, end: int) -> None:
        pass  # attention always reads the whole canvas

    def run(self, name: str, step: Callable[[], Any]) -> Any:
        return self.executor.run(name, step)

    def stepper(self, make: Callable[["StaticSession"], T]) -> T:
        if self._stepper is None:
            self._stepper = make(self)
        return self._stepper

    def forget_captures(self) -> None:
        self.executor.reset()

    def _forward(self, slots: Tensor, view_len: int, prefill: bool = False) -> Tensor:
        """Canvas tokens at `slots` [Q] -> hidden [N, Q, D]; writes their keys/values at those cache slots."""
        ids = self.tokens.index_select(1, slots)  # [N, Q]
        embeds = self.adapter.input_embeddings()(ids)  # [N, Q, D]
        if self.image_embeds is not None and self.image_where is not None:
            embeds = with_images(embeds, self.image_embeds.index_select(1, slots),
                                 self.image_where.index_select(1, slots))
        residuals = None
        if self.image_residuals is not None and (prefill or self.step_residuals):
            residuals = self.image_residuals.index_select(2, slots)  # [K, N, Q, D]
        positions = self.positions.index_select(2, slots)  # [P, N, Q]
        if self.cache is not None:
            self.cache.slots = slots  # bind (not copy): a captured graph reads this very buffer
            self.cache.view_len = view_len
        mask = slot_mask(self.text_config, self.dtype, slots, view_len, self.start, self.attention_block,
                         self.groups)
        return self.adapter.run_decoder(embeds, mask, positions, self.cache, residuals)


_SESSIONS: "weakref.WeakKeyDictionary[Any, OrderedDict[tuple, StaticSession]]" = weakref.WeakKeyDictionary()


def _weights_key(model: Any) -> tuple:
    """Changes when the weights are replaced or moved (captured graphs hold their addresses)."""
    params = list(model.hf_model.parameters())
    return (len(params), params[0].data_ptr(), params[-1].data_ptr(), str(params[0].device), params[0].dtype)


def acquire(model: DecoderModel, key: tuple, layout: Layout, vision: dict[str, Any] | None, *, total: int,
            attention_block: int, use_cache: bool, mode: str) -> StaticSession:
    """A free session of `total` >= layout.total slots (cached, or new), loaded with `layout`; `release` it after."""
    has_vision = bool(vision) and vision.get("pixel_values") is not None
    n = layout.tokens.shape[0]
    full_key = (key, n, total, attention_block, use_cache, has_vision, mode, _weights_key(model))
    cache = _SESSIONS.setdefault(model, OrderedDict())
    index = 0
    while (full_key, index) in cache and cache[(full_key, index)].busy:
        index += 1
    session = cache.pop((full_key, index), None)
    if session is None:
        session = StaticSession(model, n, total, attention_block, use_cache, has_vision, mode)
    cache[(full_key, index)] = session  # most recently used last
    free = [k for k, s in cache.items() if not s.busy and s is not session]
    while len(cache) > MAX_SESSIONS and free:
        del cache[free.pop(0)]
    session.busy = True
    session.load(layout, vision)
    return session


def release(session: StaticSession) -> None:
    session.busy = False


def clear_sessions(model: Any) -> None:
    """Drop every cached session of `model` (frees their KV caches and CUDA graphs)."""
    _SESSIONS.pop(model, None)


def settings_key(cfg: DecodeConfig, model: DecoderModel) -> tuple:
    """Everything a captured step bakes in besides shapes (policy, sampling, alignment, special ids)."""
    return (cfg.decoder, cfg.block_size, cfg.policy, cfg.threshold, cfg.temperature, cfg.top_k, cfg.top_p,
            model.config.prediction, model.mask_token_id)


@contextmanager
def open_static(model: DecoderModel, layout: Layout, vision: dict[str, Any] | None, cfg: DecodeConfig, *,
                use_cache: bool, attention_block: int, mode: str) -> Iterator[StaticSession]:
    """A session for this call, released after it: cached decoders get a canvas rounded up to `SLOT_BUCKET` slots
    (`bucketed`); full diffusion (no cache, `attention_block` = T) exactly the layout's canvas, all of it visible."""
    total = bucketed(layout.total) if use_cache else layout.total
    block = attention_block if use_cache else total
    session = acquire(model, settings_key(cfg, model), layout, vision, total=total, attention_block=block,
                      use_cache=use_cache, mode=mode)
    try:
        yield session
    finally:
        release(session)
