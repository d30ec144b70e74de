"""Training noise that does not depend on how a global batch is split: counter-based, keyed per sample.

Contract (pure tensor functions, same values on CPU and CUDA):
- `uniform(*keys)` hashes integer keys (broadcast tensors / ints) into uniforms in [0, 1) with 24-bit resolution,
  using only 32-bit arithmetic held in int64 (no overflow anywhere), so it is deterministic across devices.
- `mask_draws(seed, step, position, length)`: the [N, L] uniforms that decide which loss tokens are masked; token
  i of the sample at global-batch position p at optimizer step s always gets the same value, whatever the batch
  padding, process count or micro-batch split.
- `block_rates(seed, step, position, group, n_blocks, eps, stratified)`: the per-(sample, block) masking rate
  t in [eps, 1]. Stratified ("antithetic") means: for each block index b, the `group` samples of the global
  batch (positions p mod group) take one stratum [k/G, (k+1)/G) each, assigned by a random permutation keyed by
  (seed, step, b), the point inside the stratum is the sample's own uniform u_p, and column b is rotated by
  b * 0.618... (mod 1). Every rate is still exactly U[0, 1) before the eps map, so the loss stays unbiased; within
  a column the G rates cover [0, 1) evenly, and along one sample the golden-ratio rotation spreads its blocks
  (the only stratification left when the global batch holds one sample). This stratifies over the *global*
  batch (not per process), so 1 process with batch 4 and 2 processes with batch 2 draw identical rates.
  Unstratified: independent uniforms per (sample, block).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
MASK32 = 0xFFFFFFFF
GOLDEN = 0.6180339887498949
TAG_MASK, TAG_RATE, TAG_PERM, TAG_IID = 0x6D61736B, 0x72617465, 0x7065726D, 0x69696421


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) without int64 overflow (16-bit halves)."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & MASK32


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer finalizer (lowbias32): int64 tensor of values in [0, 2^32) -> same range, well mixed."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _key(value: Tensor | int, device: torch.device | None) -> Tensor:
    return torch.as_tensor(value, dtype=torch.long, device=device) & MASK32


def mix(*keys: Tensor | int, device: torch.device | None = None) -> Tensor:
    """Hash a sequence of integer keys (broadcast against each other) into one 32-bit value per element."""
    tensors = [k for k in keys if isinstance(k, Tensor)]
    device = tensors[0].device if tensors else device
    h = hash32(_key(keys[0], device))
    for k in keys[1:]:
        h = hash32(h ^ _key(k, device))
    return h


def to_unit(h: Tensor) -> Tensor:
    """32-bit hashes -> float32 uniforms in [0, 1) (the top 24 bits, exact in float32)."""
    return (h >> 8).to(torch.float32) / float(1 << 24)


def uniform(*keys: Tensor | int, device: torch.device | None = None) -> Tensor:
    return to_unit(mix(*keys, device=device))


def mask_draws(seed: int, step: int, position: Tensor, length: int) -> Tensor:
    """[N, L] uniforms keyed by (seed, step, sample position, token index). position: [N] long."""
    tokens = torch.arange(length, device=position.device)
    return uniform(TAG_MASK, seed, step, position[:, None], tokens[None, :])


def block_rates(seed: int, step: int, position: Tensor, group: int, n_blocks: int, eps: float = 1e-3,
                stratified: bool = True) -> Tensor:
    """[N, n_blocks] masking rates in [eps, 1] (module docstring). position: [N] long, each in [0, group)."""
    device = position.device
    blocks = torch.arange(n_blocks, device=device)
    if not stratified:
        v = uniform(TAG_IID, seed, step, position[:, None], blocks[None, :])
        return eps + (1.0 - eps) * v
    u = uniform(TAG_RATE, seed, step, position)[:, None]  # [N, 1] the sample's point inside its strata
    members = torch.arange(group, device=device)
    order = torch.argsort(mix(TAG_PERM, seed, step, blocks[:, None], members[None, :]), dim=1, stable=True)
    rank = torch.argsort(order, dim=1, stable=True)  # [n_blocks, G] stratum of each batch position per block
    stratum = rank[:, position % group].T.to(torch.float32)  # [N, n_blocks]
    shift = (blocks.to(torch.float64) * GOLDEN % 1.0).to(torch.float32)  # [n_blocks]
    v = torch.remainder((stratum + u) / group + shift[None, :], 1.0)
    return eps + (1.0 - eps) * v
