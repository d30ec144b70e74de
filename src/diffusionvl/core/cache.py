"""A preallocated, slot-addressed KV cache that Hugging Face attention layers can write into.

Contract: buffers of shape [N, H_kv, T, D] per layer are allocated once (lazily, on the first write, from the
key/value shapes the layer produces) for T = prompt + generation slots. Before each forward the decoder calls
`set_write(slots)`; every layer's `update(k, v, layer)` then copies its new keys/values into those slots
(`index_copy_`, graph-capturable) and returns the first `view_len` slots for attention. Overwriting the same slots
on every denoising step is what lets a block's noisy keys live in the cache until the block is committed, with no
crop and no extra commit forward. The mask (masks.py) decides which slots are visible.

It implements the small part of the transformers `Cache` interface the supported models use: `update`, with a
signature that accepts both the 5.x (no cache_kwargs) and older call styles, and the `is_compileable` /
`is_sliding` flags. Decoder stacks ask a cache for its length (`get_seq_length`) only to derive position ids when
none are given; the adapters always pass them (adapters.py `run_decoder`), so this cache keeps no length.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


class BlockKVCache:
    is_compileable = True
    is_sliding: list[bool] = []

    def __init__(self, num_layers: int, max_len: int):
        self.num_layers = num_layers
        self.max_len = max_len
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.slots: Tensor | None = None  # [Q] slots the next forward writes
        self.view_len = max_len  # slots returned to attention (fixed = max_len for captured graphs)

    def set_write(self, slots: Tensor, view_len: int | None = None) -> None:
        """Slots [Q] written by the next forward; `view_len` = how many leading slots attention reads."""
        if self.slots is not None and self.slots.shape == slots.shape and self.slots.device == slots.device:
            self.slots.copy_(slots)  # keep the same storage for CUDA graphs
        else:
            self.slots = slots.clone()
        self.view_len = self.max_len if view_len is None else view_len

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Write this layer's new [N, H, Q, D] keys/values at the current slots; return [N, H, view_len, D]."""
        if self.keys[layer_idx] is None:
            n, h, _, d = key_states.shape
            dv = value_states.shape[-1]
            self.keys[layer_idx] = key_states.new_zeros(n, h, self.max_len, d)
            self.values[layer_idx] = value_states.new_zeros(n, h, self.max_len, dv)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        assert self.slots is not None, "BlockKVCache.set_write() must be called before a forward"
        k_buf.index_copy_(2, self.slots, key_states.to(k_buf.dtype))
        v_buf.index_copy_(2, self.slots, value_states.to(v_buf.dtype))
        if self.view_len == self.max_len:
            return k_buf, v_buf
        return k_buf[:, :, : self.view_len], v_buf[:, :, : self.view_len]
