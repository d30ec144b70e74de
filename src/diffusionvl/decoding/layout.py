"""Where each sample's tokens live during batched decoding: the slot layout.

Contract: a batch of prompts of different lengths shares one slot axis of length T. Block k of a sample always
covers positions [kB, kB + B) of *that* sample (blocks are counted from its position 0), and all samples decode
their blocks in the same slots. That is achieved by left padding each sample by `start[n]` slots, a multiple of B:
    full[n]  = (n_prompt // B) * B        the prompt's complete blocks, prefilled into the cache
    prefill  = max(full)                  slots [0, prefill) are prefilled for every sample
    start[n] = prefill - full[n]          first real slot of sample n
The first decoded block [prefill, prefill + B) holds each sample's leftover prompt tokens (n_prompt mod B of them,
fixed) followed by masks. Slot s of sample n has position index s - start[n] (0 on padding slots); for M-RoPE
prompts the prompt's own 3-D positions are used and generated tokens continue at index + delta.
With B = 1 this is plain left padding, which the AR decoder uses.
An answer template (template.py) writes its fixed tokens onto a sample's generation slots after the layout is built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Tensor = torch.Tensor


@dataclass
class Layout:
    block_size: int
    start: Tensor  # [N] first real slot of each sample
    prompt_len: Tensor  # [N]
    prefill: int  # slots [0, prefill) hold complete prompt blocks
    total: int  # T
    tokens: Tensor  # [N, T] prompt ids in place, `fill` id on the generation slots, pad id before `start`
    positions: Tensor  # [P, N, T]
    templated: Tensor | None = None  # [N] bool: rows with an answer template (template.py), None when no row has one

    @property
    def gen_start(self) -> Tensor:
        """[N] slot of each sample's first generated token."""
        return self.start + self.prompt_len

    @property
    def num_blocks(self) -> int:
        return (self.total - self.prefill) // self.block_size


def build_layout(prompts: list[list[int]], positions: list[tuple[Tensor, int]], block_size: int,
                 max_new_tokens: int, fill_id: int, pad_id: int, *, prefill_to: int | None = None,
                 canvas: int | None = None) -> Layout:
    """Slot layout for block decoding (see module docstring).

    `prefill_to` / `canvas` override the defaults for the full-diffusion decoder: every prompt is then left-padded
    to end at slot `prefill_to` and followed by `canvas` generation slots.
    """
    b = block_size
    n = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    if prefill_to is None:
        full = (n // b) * b
        prefill = int(full.max())
        start = prefill - full
        leftover = n - full
        blocks = int(((leftover + max_new_tokens + b - 1) // b).max())
        total = prefill + blocks * b
    else:
        prefill = prefill_to
        start = prefill - n
        total = prefill + int(canvas or 0)
    dims = positions[0][0].shape[0]
    tokens = torch.full((len(prompts), total), fill_id, dtype=torch.long)
    pos = torch.zeros(dims, len(prompts), total, dtype=torch.long)
    slots = torch.arange(total)
    for i, (ids, (ppos, delta)) in enumerate(zip(prompts, positions)):
        s0, length = int(start[i]), len(ids)
        tokens[i, :s0] = pad_id
        tokens[i, s0:s0 + length] = torch.tensor(ids, dtype=torch.long)
        pos[:, i, s0:s0 + length] = ppos
        after = slots[s0 + length:]
        pos[:, i, s0 + length:] = (after - s0 + delta).view(1, -1)
    return Layout(block_size=b, start=start, prompt_len=n, prefill=prefill, total=total, tokens=tokens, positions=pos)
