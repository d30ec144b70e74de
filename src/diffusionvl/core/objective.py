"""The BD3 training objective as pure tensor functions: noise on token ids, block-aligned EOS, loss.

Contract (docs/design.md section 1): only loss tokens (labels != -100) are ever noised; a position is masked iff its id
is the mask id; every (sample, block) draws one masking rate t ~ U[eps, 1], stratified over the batch when
`antithetic`; the loss is sum over masked positions of CE / t, divided by each sample's number of loss tokens,
averaged over the batch. Nothing here knows about models, tokenizers or files.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
IGNORE_INDEX = -100


def pad_to_block(input_ids: list[int], labels: list[int], block_size: int, eos_id: int) -> tuple[list[int], list[int]]:
    """Block-aligned EOS: append EOS (as input and as label) until the length is a multiple of `block_size`.

    The model thereby learns to end inside a block and to fill the rest of that block with EOS.
    """
    extra = (-len(input_ids)) % block_size
    return input_ids + [eos_id] * extra, labels + [eos_id] * extra


def sample_block_rates(n_samples: int, n_blocks: int, eps: float = 1e-3, antithetic: bool = True,
                       generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Masking rate per (sample, block): [N, n_blocks] in [eps, 1].

    Antithetic: the n = N * n_blocks draws are u_i / n + i / n (mod 1), one per stratum of [0, 1).
    """
    u = torch.rand(n_samples, n_blocks, generator=generator, device=device)
    if antithetic:
        n = u.numel()
        offset = torch.arange(n, device=u.device, dtype=u.dtype).view_as(u) / n
        u = (u / n + offset) % 1.0
    return eps + (1.0 - eps) * u


def noise_tokens(x0: Tensor, labels: Tensor, rates: Tensor, block_size: int, mask_id: int,
                 generator: torch.Generator | None = None, draw: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Mask each loss token of block b of sample n with probability rates[n, b].

    x0, labels: [N, L]; rates: [N, ceil(L / B)]; draw: optional [N, L] uniforms in [0, 1) to use instead of
    drawing from `generator` (the trainer passes split-invariant, counter-based draws).
    Returns x_t [N, L] (mask id at masked positions), masked [N, L] bool, t [N, L] (each token's block rate).
    """
    length = x0.shape[1]
    t = rates.repeat_interleave(block_size, dim=1)[:, :length]  # [N, L]
    if draw is None:
        draw = torch.rand(x0.shape, generator=generator, device=x0.device)
    masked = (draw < t) & (labels != IGNORE_INDEX)
    x_t = torch.where(masked, torch.full_like(x0, mask_id), x0)
    return x_t, masked, t


def prediction_index(length: int, block_size: int, prediction: str, device: torch.device | str | None = None) -> Tensor:
    """Which row of the 2L-long training output predicts token i of the x_t half: [L] long.

    'same':  row i (the noisy token itself).
    'shift': row i - 1 (as in AR), except at a block's first token, whose predecessor lies in the previous block:
             there the clean stream's row L + i - 1 predicts it (x_t rows never see earlier noisy blocks).
             Token 0 has no predecessor; row 0 is returned and its loss is dropped by `bd3_loss`.
    """
    i = torch.arange(length, device=device)
    if prediction == "same":
        return i
    first = (i % block_size) == 0
    prev = torch.where(first, length + i - 1, i - 1)
    prev[0] = 0
    return prev


def bd3_sample_losses(logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """Per-sample 1/t-weighted masked cross entropy: [N].

    logits: [M, V] for the M masked positions (in `masked.nonzero()` order), x0/masked/t/labels: [N, L].
    Sample n's value = sum over its masked positions of CE / t, divided by its number of loss tokens.
    """
    n = x0.shape[0]
    if logits.shape[0] == 0:
        return logits.sum() * 0.0 + logits.new_zeros(n, dtype=torch.float32)
    ce = F.cross_entropy(logits.float(), x0[masked], reduction="none")  # [M]
    per_token = ce / t[masked]
    n_loss = (labels != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(per_token.dtype)  # [N]
    rows = masked.nonzero()[:, 0]  # [M] sample index of each masked position
    return per_token.new_zeros(n).index_add(0, rows, per_token / n_loss[rows])


def bd3_loss(logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor, labels: Tensor) -> Tensor:
    """1/t-weighted masked cross entropy, averaged over the batch (see `bd3_sample_losses`)."""
    return bd3_sample_losses(logits, x0, masked, t, labels).mean()
