"""The plain slot forward: dynamic shapes, attention over the live prefix only (protocol.SlotForward).

Contract: `PlainForward` holds one call's canvas (layout.tokens on the device) and runs the backbone on the tokens of
a window, slots [start, start + L): embeddings (image rows and their layer residuals substituted from the
prompt's features, computed once at construction: decoding steps never re-run the vision tower), positions, the slot mask (slots.py) and the cache.
With a `BlockKVCache` the window's keys/values are written into its slots and attention reads slots [0, kv_len):
kv_len is the window's end, or the end given to `plan` while the window lies inside the planned range. With any
other cache (the reference loop's growing transformers `DynamicCache`) the cache is passed through as it is; with
none, the window must start at slot 0 (the whole prefix is recomputed). A mask is built once for the rows of the
last window or plan and reused while later windows fall inside it with the same keys (a block's later steps reuse
its fused step's rows; AR reuses one mask per chunk). Windows are host integers, steps are plain calls.
`open_plain` is the decoders' factory for it (static.py's `open_static` is the other one).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

import torch

from diffusionvl.core.cache import BlockKVCache
from diffusionvl.decoding.layout import Layout
from diffusionvl.decoding.protocol import DecoderModel, Window
from diffusionvl.decoding.slots import prompt_images, slot_groups, slot_mask, with_images

Tensor = torch.Tensor
T = TypeVar("T")


class PlainForward:
    backend = "plain"

    def __init__(self, model: DecoderModel, layout: Layout, vision: dict[str, Any] | None, *, cache: Any,
                 attention_block: int):
        self.adapter, self.device, self.dtype = model.adapter, model.device, model.dtype
        self.tokens = layout.tokens.to(self.device)  # [N, T]
        self.start = layout.start.to(self.device)
        self.positions = layout.positions.to(self.device)  # [P, N, T]
        self.cache, self.attention_block = cache, attention_block
        self.text_config = self.adapter.text_config  # looked up once: config access is slow in HF 5
        self.notes: list[str] = []
        self.images = prompt_images(self.adapter, self.tokens, layout, vision)
        self.groups = slot_groups(self.adapter, self.tokens.clone(), layout, vision)  # [N, T] | None
        self._rows: tuple[int, int, int, Any] | None = None  # (first row, end row, kv_len, mask) last built
        self._plan: tuple[int, int] | None = None

    # ---- windows on the canvas ---------------------------------------------------------------------------------
    def window(self, length: int) -> Window:
        return Window(length)

    def aim(self, window: Window, start: int) -> None:
        window.start = start

    def advance(self, window: Window) -> None:
        window.start += 1

    def read(self, window: Window) -> Tensor:
        return self.tokens[:, window.start:window.start + window.length]

    def write(self, window: Window, values: Tensor) -> None:
        self.tokens[:, window.start:window.start + window.length] = values

    def rows(self, hidden: Tensor, of: Window, at: Window) -> Tensor:
        first = at.start - of.start
        return hidden[:, first:first + at.length]

    # ---- forwards ----------------------------------------------------------------------------------------------
    def prefill(self, length: int) -> Tensor:
        return self._forward(0, length, length)

    def hidden(self, window: Window) -> Tensor:
        end = window.start + window.length
        planned = self._plan is not None and self._plan[0] <= window.start and end <= self._plan[1]
        return self._forward(window.start, window.length, self._plan[1] if planned else end)

    def plan(self, start: int, end: int) -> None:
        self._plan = (start, end)
        self._rows = (start, end, end, self._build_mask(start, end, end))

    def run(self, name: str, step: Callable[[], Any]) -> Any:
        return step()

    def stepper(self, make: Callable[["PlainForward"], T]) -> T:
        return make(self)

    def forget_captures(self) -> None:
        pass

    def _inputs(self, ids: Tensor, q_start: int) -> tuple[Tensor, Tensor | None]:
        """Embeddings [N, Q, D] of the window's tokens, image rows in place, and its layer residuals [K, N, Q, D]
        (None when the window holds no prompt slot or the family has none)."""
        emb = self.adapter.input_embeddings()(ids)  # [N, Q, D]
        images = self.images
        if images is None or q_start >= images.embeds.shape[1]:
            return emb, None
        end = min(q_start + ids.shape[1], images.embeds.shape[1])
        head = with_images(emb[:, :end - q_start], images.embeds[:, q_start:end], images.where[:, q_start:end])
        residuals = None
        if images.residuals is not None:
            residuals = images.residuals.new_zeros(images.residuals.shape[0], *emb.shape)  # [K, N, Q, D]
            residuals[:, :, :end - q_start] = images.residuals[:, :, q_start:end]
        return torch.cat([head, emb[:, end - q_start:]], dim=1), residuals

    def _build_mask(self, q_start: int, q_end: int, kv_len: int) -> Any:
        q_slots = torch.arange(q_start, q_end, device=self.device)
        return slot_mask(self.text_config, self.dtype, q_slots, kv_len, self.start, self.attention_block,
                         self.groups)

    def _mask(self, q_start: int, q_len: int, kv_len: int) -> Any:
        """Rows of the last built mask when they cover these queries with the same keys, else built now."""
        if self._rows is not None:
            r0, r1, kv, rows = self._rows
            if kv == kv_len and r0 <= q_start and q_start + q_len <= r1:
                a, b = q_start - r0, q_start - r0 + q_len
                if isinstance(rows, dict):
                    return {k: v[:, :, a:b] for k, v in rows.items()}
                return rows[:, :, a:b]
        self._rows = (q_start, q_start + q_len, kv_len, self._build_mask(q_start, q_start + q_len, kv_len))
        return self._rows[3]

    def _forward(self, q_start: int, q_len: int, kv_len: int) -> Tensor:
        """Canvas slots [q_start, q_start + q_len) -> hidden [N, Q, D], attention over slots [0, kv_len)."""
        if isinstance(self.cache, BlockKVCache):
            self.cache.set_write(torch.arange(q_start, q_start + q_len, device=self.device), view_len=kv_len)
        elif self.cache is None:
            assert q_start == 0, "without a cache the whole prefix is recomputed"
        ids = self.tokens[:, q_start:q_start + q_len]
        positions = self.positions[:, :, q_start:q_start + q_len]
        mask = self._mask(q_start, q_len, kv_len)
        embeds, residuals = self._inputs(ids, q_start)
        return self.adapter.run_decoder(embeds, mask, positions, self.cache, residuals)


@contextmanager
def open_plain(model: DecoderModel, layout: Layout, vision: dict[str, Any] | None, cfg: Any, *, use_cache: bool,
               attention_block: int) -> Iterator[PlainForward]:
    """A fresh `PlainForward` for one call (with a `BlockKVCache` of the layout's slots when `use_cache`)."""
    cache = BlockKVCache(model.adapter.text_config.num_hidden_layers, layout.total) if use_cache else None
    yield PlainForward(model, layout, vision, cache=cache, attention_block=attention_block)
