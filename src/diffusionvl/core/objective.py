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


LOSS_NORMS = ("sample", "segment", "token")


def unit_losses(values: Tensor, rows: Tensor, segs: Tensor, labels: Tensor, segment: Tensor) -> tuple[Tensor, Tensor]:
    """Sum of per-token losses and number of loss tokens of every (row, segment) unit: two [N, L + 1] tensors.

    values: [M] per-token losses at positions (rows [M], with segment ids segs [M]); labels, segment: [N, L]
    (segment ids lie in [0, L]). A unit's loss-token count is taken from `labels`, not from the M positions, so a
    BD3 unit divides by all its loss tokens, masked or not (the NELBO bound of that segment)."""
    n, length = labels.shape
    k = length + 1
    sums = values.new_zeros(n * k).index_add(0, rows * k + segs, values)
    keys = torch.arange(n, device=labels.device)[:, None] * k + segment  # [N, L]
    has_loss = (labels != IGNORE_INDEX).to(values.dtype)  # weights, not a boolean index: no host sync
    counts = values.new_zeros(n * k).index_add(0, keys.flatten(), has_loss.flatten())
    return sums.view(n, k), counts.view(n, k)


def reduce_units(sums: Tensor, counts: Tensor, norm: str) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, per-sample [N], per-segment [N, L + 1]) from `unit_losses`.

    norm: 'sample' = mean over samples (rows) of each row's mean over its loss tokens; 'segment' = mean over
    segments of each segment's mean (packed rows: every segment counts as the sample it would be alone);
    'token' = mean over all loss tokens of the batch (the transformers Trainer convention)."""
    per_segment = sums / counts.clamp(min=1)  # [N, L + 1]
    per_sample = sums.sum(1) / counts.sum(1).clamp(min=1)  # [N]
    if norm == "sample":
        loss = per_sample.mean()
    elif norm == "segment":
        loss = per_segment.sum() / (counts > 0).sum().clamp(min=1)
    elif norm == "token":
        loss = sums.sum() / counts.sum().clamp(min=1)
    else:
        raise ValueError(f"unknown loss norm {norm!r}; choose one of {', '.join(LOSS_NORMS)}")
    return loss, per_sample, per_segment


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
