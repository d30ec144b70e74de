"""Static-shape decoding state for the fast path: buffers allocated once per shape and reused across calls.

Contract: a `StaticSession` owns, for one shape (model, batch N, canvas length T, decoder and its settings), every
tensor a decoding step touches: the token canvas [N, T], positions [P, N, T], each sample's first real slot, a
`BlockKVCache` of T slots (none for the full-diffusion baseline), image embeddings padded to T when the prompt has
images, and a `StepExecutor` (backend.py) holding the step shapes' CUDA graphs. `forward(slots, view_len)` runs the
backbone on the canvas tokens at `slots` (a [Q] device tensor whose storage never changes for a given step shape),
with attention reading the first `view_len` cache slots. Captured steps read all T slots (fixed shapes): the
block-causal mask hides every slot after the query's block, so the result equals reading only the live prefix.
Embeddings, positions and the mask are all computed on the device from these buffers, which is what lets a CUDA
graph replay a step with new slot values.
Sessions are cached per model (`acquire`, LRU of `MAX_SESSIONS`) so graphs captured in one call are replayed by the
next call of the same shape; `load(layout, vision)` refills the buffers in place. A session in use by one decoding
generator is never handed to another (a second concurrent call of the same shape gets its own session).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from diffusionvl import attention, masks
from diffusionvl.cache import BlockKVCache
from diffusionvl.decoding.backend import StepExecutor
from diffusionvl.decoding.layout import Layout

Tensor = torch.Tensor

MAX_SESSIONS = 4  # per model; each holds a KV cache of N x T slots (and, on GPU, its CUDA graphs)
SLOT_BUCKET = 128  # cached decoders round T up to a multiple of this, so nearby prompt lengths share a session


def bucketed(total: int) -> int:
    """Session length for a layout of `total` slots (cached decoders). The extra slots are never queried, and the
    block-causal mask hides them as keys (they lie after every query's block)."""
    return -(-total // SLOT_BUCKET) * SLOT_BUCKET


class StaticSession:
    def __init__(self, model: Any, n: int, total: int, mask_block: int, use_cache: bool, has_vision: bool,
                 mode: str):
        dev, adapter = model.device, model.adapter
        self.model, self.adapter, self.device = model, adapter, dev
        self.n, self.total, self.mask_block, self.dtype = n, total, mask_block, model.dtype
        self.tokens = torch.zeros(n, total, dtype=torch.long, device=dev)  # [N, T]
        self.positions = torch.zeros(adapter.position_dims, n, total, dtype=torch.long, device=dev)  # [P, N, T]
        self.start = torch.zeros(n, dtype=torch.long, device=dev)  # [N]
        self.text_config = adapter.text_config  # looked up once: config attribute access is slow in transformers 5
        self.cache = BlockKVCache(self.text_config.num_hidden_layers, total) if use_cache else None
        self.vision_embeds: Tensor | None = None  # [N, T, D], image rows filled (prompt region only)
        self.vision_where: Tensor | None = None  # [N, T] bool, True at image-token slots
        if has_vision:
            width = adapter.input_embeddings().weight.shape[1]
            self.vision_embeds = torch.zeros(n, total, width, dtype=model.dtype, device=dev)
            self.vision_where = torch.zeros(n, total, dtype=torch.bool, device=dev)
        self.executor = StepExecutor(mode, dev)
        self.steps: Any = None  # the decoder's step object (fast.py), created once per session
        self.busy = False

    def load(self, layout: Layout, vision: dict[str, Any] | None) -> None:
        """Refill the buffers for a new call of the same shape (prompt tokens, positions, padding, images)."""
        t = layout.total
        self.tokens[:, :t] = layout.tokens
        self.positions[:, :, :t] = layout.positions
        self.start.copy_(layout.start)
        if self.vision_embeds is not None and self.vision_where is not None:
            region = int((layout.start + layout.prompt_len).max())
            ids = self.tokens[:, :region]
            self.vision_embeds[:, :region] = self.adapter.embed(ids, vision)  # [N, R, D], as Runner does
            self.vision_where.zero_()
            self.vision_where[:, :region] = ids == self.adapter.image_token_id

    def mask(self, slots: Tensor, view_len: int) -> Any:
        def rule(window: int | None) -> Tensor:
            return masks.block_causal_dense_mask(slots, view_len, self.start, self.mask_block, window)

        return attention.build(rule, self.text_config, self.text_config, self.dtype)

    def forward(self, slots: Tensor, view_len: int) -> Tensor:
        """Canvas tokens at `slots` [Q] -> hidden [N, Q, D]; writes their keys/values at those cache slots."""
        ids = self.tokens.index_select(1, slots)  # [N, Q]
        embeds = self.adapter.input_embeddings()(ids)  # [N, Q, D]
        if self.vision_embeds is not None and self.vision_where is not None:
            where = self.vision_where.index_select(1, slots).unsqueeze(-1)  # [N, Q, 1]
            embeds = torch.where(where, self.vision_embeds.index_select(1, slots), embeds)
        positions = self.positions.index_select(2, slots)  # [P, N, Q]
        if self.cache is not None:
            self.cache.slots = slots  # bind (not copy): a captured graph reads this very buffer
            self.cache.view_len = view_len
        return self.adapter.run_decoder(embeds, self.mask(slots, view_len), positions, self.cache)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        return self.executor.run(name, fn)


_SESSIONS: "weakref.WeakKeyDictionary[Any, OrderedDict[tuple, StaticSession]]" = weakref.WeakKeyDictionary()


def _weights_key(model: Any) -> tuple:
    """Changes when the weights are replaced or moved (captured graphs hold their addresses)."""
    params = list(model.hf_model.parameters())
    return (len(params), params[0].data_ptr(), params[-1].data_ptr(), str(params[0].device), params[0].dtype)


def acquire(model: Any, key: tuple, layout: Layout, vision: dict[str, Any] | None, *, total: int, mask_block: int,
            use_cache: bool, mode: str) -> StaticSession:
    """A free session of `total` >= layout.total slots (cached, or new), loaded with `layout`; `release` it after."""
    has_vision = bool(vision) and vision.get("pixel_values") is not None
    n = layout.tokens.shape[0]
    full_key = (key, n, total, mask_block, use_cache, has_vision, mode, _weights_key(model))
    cache = _SESSIONS.setdefault(model, OrderedDict())
    index = 0
    while (full_key, index) in cache and cache[(full_key, index)].busy:
        index += 1
    session = cache.pop((full_key, index), None)
    if session is None:
        session = StaticSession(model, n, total, mask_block, use_cache, has_vision, mode)
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
