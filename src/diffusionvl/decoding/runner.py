"""One forward of the backbone over a range of slots: embeddings, positions, mask and cache, done in one place.

Contract: `Runner.forward(ids, q_start)` runs the queries in slots [q_start, q_start + Q) (ids: [N, Q]) and returns
their hidden states [N, Q, D]. With a cache, their keys/values are written into those slots and attention reads
slots [0, kv_len); without one, the caller passes the whole prefix (q_start = 0). Image features are computed once
at construction for the prompt region and substituted at image-token slots, so decoding steps never re-run the
vision tower. The mask is the block-causal inference rule (masks.py) or, for the full-diffusion baseline,
bidirectional over all real slots.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusionvl import attention, masks
from diffusionvl.cache import BlockKVCache
from diffusionvl.decoding.layout import Layout

Tensor = torch.Tensor


class Runner:
    def __init__(self, model: Any, layout: Layout, vision: dict[str, Any] | None, use_cache: bool,
                 bidirectional: bool = False):
        self.model = model
        self.adapter = model.adapter
        self.layout = layout
        self.device = model.device
        self.block_size = layout.block_size
        self.start = layout.start.to(self.device)
        self.positions = layout.positions.to(self.device)
        self.bidirectional = bidirectional
        self.dtype = model.dtype
        self.forwards = 0
        self._rows: tuple[int, int, int, Any] | None = None  # (first row, end row, kv_len, mask) last built
        text_cfg = self.text_config = self.adapter.text_config  # looked up once: config access is slow in HF 5
        self.cache = BlockKVCache(text_cfg.num_hidden_layers, layout.total) if use_cache else None
        self.vision_embeds: Tensor | None = None
        self.vision_slots: Tensor | None = None
        if vision:
            region = int((layout.start + layout.prompt_len).max())
            ids = layout.tokens[:, :region].to(self.device)
            self.vision_embeds = self.adapter.embed(ids, vision)  # [N, R, D]
            self.vision_slots = ids == self.adapter.image_token_id  # [N, R]

    def embed(self, ids: Tensor, q_start: int) -> Tensor:
        emb = self.adapter.input_embeddings()(ids)  # [N, Q, D]
        if self.vision_embeds is None or q_start >= self.vision_embeds.shape[1]:
            return emb
        end = min(q_start + ids.shape[1], self.vision_embeds.shape[1])
        width = end - q_start
        where = self.vision_slots[:, q_start:end].unsqueeze(-1)
        head = torch.where(where, self.vision_embeds[:, q_start:end], emb[:, :width])
        return torch.cat([head, emb[:, width:]], dim=1)

    def _build_mask(self, q_start: int, q_end: int, kv_len: int) -> Any:
        b = self.block_size if not self.bidirectional else self.layout.total
        q_slots = torch.arange(q_start, q_end, device=self.device)

        def rule(window: int | None) -> Tensor:
            return masks.block_causal_dense_mask(q_slots, kv_len, self.start, b, window)

        return attention.build(rule, self.text_config, self.text_config, self.dtype)

    def prepare_mask(self, q_start: int, q_end: int, kv_len: int) -> None:
        """Build the mask rows of queries [q_start, q_end) over `kv_len` keys once, for the forwards that follow."""
        self._rows = (q_start, q_end, kv_len, self._build_mask(q_start, q_end, kv_len))

    def mask(self, q_start: int, q_len: int, kv_len: int) -> Any:
        """Mask of queries [q_start, q_start + q_len) over `kv_len` keys: rows of the last built mask when they cover
        them with the same keys (a block's later steps reuse its fused step's rows), else built now."""
        if self._rows is not None:
            r0, r1, kv, rows = self._rows
            if kv == kv_len and r0 <= q_start and q_start + q_len <= r1:
                a, b = q_start - r0, q_start - r0 + q_len
                if isinstance(rows, dict):
                    return {k: v[:, :, a:b] for k, v in rows.items()}
                return rows[:, :, a:b]
        self.prepare_mask(q_start, q_start + q_len, kv_len)
        return self._rows[3]

    def forward(self, ids: Tensor, q_start: int, kv_len: int | None = None) -> Tensor:
        """ids [N, Q] at slots [q_start, q_start + Q) -> hidden [N, Q, D]; attention reads slots [0, kv_len)
        (default: up to the last query; a longer view gives the same result, the mask hides the extra slots)."""
        q_len = ids.shape[1]
        kv_len = kv_len if kv_len is not None else q_start + q_len
        if self.cache is not None:
            self.cache.set_write(torch.arange(q_start, q_start + q_len, device=self.device), view_len=kv_len)
        else:
            assert q_start == 0, "without a cache the whole prefix is recomputed"
        embeds = self.embed(ids, q_start)
        positions = self.positions[:, :, q_start:q_start + q_len]
        hidden = self.adapter.run_decoder(embeds, self.mask(q_start, q_len, kv_len), positions, self.cache)
        self.forwards += 1
        return hidden
