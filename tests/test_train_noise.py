"""Split-invariant training noise and the global-batch sampler: the same global batch gets the same samples and the
same masks however it is split over processes and micro-steps."""

from __future__ import annotations

import torch

from diffusionvl.jobs.train import noise
from diffusionvl.jobs.train.sampler import EvalSampler, GlobalBatchSampler


def test_hash_uniforms_are_deterministic_uniform_and_key_sensitive():
    keys = torch.arange(200_000)
    u = noise.uniform(7, 3, keys)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert torch.equal(u, noise.uniform(7, 3, keys))
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=20, min=0, max=1)
    assert float(hist.min()) > 0.9 * 10_000 and float(hist.max()) < 1.1 * 10_000
    assert float((u == noise.uniform(7, 4, keys)).float().mean()) < 0.001  # another step: other values
    # neighbouring keys are not correlated
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01
    # large seeds and steps stay in range (no int64 overflow anywhere)
    big = noise.uniform(2**40 + 5, 2**31 - 1, keys[:10])
    assert float(big.max()) < 1.0 and float(big.min()) >= 0.0


def test_mask_draws_do_not_depend_on_padding_or_batch_split():
    pos = torch.arange(4)
    full = noise.mask_draws(0, 5, pos, 24)  # [4, 24]
    assert torch.equal(noise.mask_draws(0, 5, pos[2:], 16), full[2:, :16])  # other process, shorter padding
    assert not torch.equal(full[0], full[1])


def test_block_rates_split_invariant_and_stratified_over_the_global_batch():
    group, n_blocks, eps = 8, 6, 1e-3
    pos = torch.arange(group)
    full = noise.block_rates(1, 9, pos, group, n_blocks, eps)  # [8, 6]
    halves = [noise.block_rates(1, 9, pos[:4], group, n_blocks, eps),
              noise.block_rates(1, 9, pos[4:], group, 3, eps)]  # fewer blocks on the other process
    assert torch.equal(torch.cat([halves[0][:, :3], halves[1]]), full[:, :3])
    assert float(full.min()) >= eps and float(full.max()) <= 1.0
    v = (full - eps) / (1 - eps)
    shift = (torch.arange(n_blocks, dtype=torch.float64) * noise.GOLDEN % 1.0).to(torch.float32)
    strata = torch.floor(torch.remainder(v - shift, 1.0) * group + 1e-4).long() % group  # [8, 6]
    for b in range(n_blocks):  # every block column covers each stratum of [0, 1) exactly once
        assert sorted(strata[:, b].tolist()) == list(range(group))
    assert not torch.equal(strata[:, 0], strata[:, 1])  # strata are reassigned per block


def test_block_rates_are_uniform_marginally():
    pos = torch.arange(4)
    rates = torch.cat([noise.block_rates(0, s, pos, 4, 8, 0.0) for s in range(600)])  # [2400, 8]
    assert abs(float(rates.mean()) - 0.5) < 0.01
    per_sample_block = rates.view(600, 4, 8).mean(0)  # each (position, block) over steps: ~U[0, 1) mean 0.5
    assert float((per_sample_block - 0.5).abs().max()) < 0.06  # 5 sigma of a 600-sample mean
    one = torch.cat([noise.block_rates(0, s, torch.zeros(1, dtype=torch.long), 1, 4, 0.0) for s in range(800)])
    assert abs(float(one.mean()) - 0.5) < 0.03 and abs(float(one.std()) - 12 ** -0.5) < 0.02  # group of 1
    iid = noise.block_rates(0, 0, pos, 4, 8, 0.0, stratified=False)
    assert iid.shape == (4, 8)


def _epoch(world, micro, accum, seed=0, size=13):
    """{(step, position): dataset index} seen by all processes over one epoch."""
    seen = {}
    for rank in range(world):
        s = GlobalBatchSampler(size, micro, world, rank, accum, seed)
        for k, batch in enumerate(s):
            step = k // accum
            for index, position in batch:
                assert (step, position) not in seen
                seen[(step, position)] = index
    return seen


def test_global_batches_do_not_depend_on_world_size_or_accumulation():
    ref = _epoch(1, 4, 1)
    assert ref == _epoch(2, 2, 1) == _epoch(1, 2, 2) == _epoch(2, 1, 2)
    assert len(ref) == 12 and len(set(ref.values())) == 12  # 13 samples: 3 global batches of 4, 1 dropped
    assert _epoch(1, 4, 1, seed=1) != ref


def test_sampler_resumes_mid_epoch_and_eval_sampler_pads():
    s = GlobalBatchSampler(16, 2, 1, 0, 2, seed=5)
    s.set_position(3, 0)
    whole = list(s)
    s.set_position(3, 2)
    assert list(s) == whole[4:] and len(s) == 4
    assert s.order(3) != s.order(4)
    ev = [EvalSampler(5, 2, 2, r) for r in range(2)]
    got = sorted(p for e in ev for batch in e for _, p in batch)
    assert got == list(range(8)) and len(ev[0]) == 2  # 5 samples padded to 8; positions >= 5 are repeats
