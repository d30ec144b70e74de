"""objective.py and sampling.py: the pure math of training and decoding."""

from __future__ import annotations

import math

import torch

from diffusionvl.core import objective, sampling


def test_pad_to_block_appends_eos_as_input_and_label():
    ids, labels = objective.pad_to_block([1, 2, 3, 4, 5], [-100, -100, 3, 4, 5], 4, 9)
    assert ids == [1, 2, 3, 4, 5, 9, 9, 9] and labels == [-100, -100, 3, 4, 5, 9, 9, 9]
    assert objective.pad_to_block([1, 2, 3, 4], [1, 2, 3, 4], 4, 9) == ([1, 2, 3, 4], [1, 2, 3, 4])


def test_antithetic_rates_cover_every_stratum():
    g = torch.Generator().manual_seed(0)
    rates = objective.sample_block_rates(4, 8, eps=1e-3, antithetic=True, generator=g)
    assert rates.shape == (4, 8) and rates.min() >= 1e-3 and rates.max() <= 1.0
    u = ((rates.flatten() - 1e-3) / (1 - 1e-3))
    strata = torch.sort((u * 32).floor().long()).values
    assert torch.equal(strata, torch.arange(32))  # exactly one draw per stratum of [0, 1)


def test_noise_only_on_loss_tokens_and_rate_follows_t():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, 50, (64, 64), generator=g)
    labels = x0.clone()
    labels[:, :16] = -100
    rates = torch.full((64, 16), 0.3)
    rates[:, 8:] = 0.9
    x_t, masked, t = objective.noise_tokens(x0, labels, rates, 4, 99, g)
    assert not masked[:, :16].any()
    assert torch.equal(x_t == 99, masked) and torch.equal(x_t[~masked], x0[~masked])
    assert abs(masked[:, 16:32].float().mean().item() - 0.3) < 0.03
    assert abs(masked[:, 32:].float().mean().item() - 0.9) < 0.03
    assert torch.all(t[:, :32] == 0.3) and torch.all(t[:, 32:] == 0.9)


def test_prediction_index_shift_and_same():
    assert objective.prediction_index(8, 4, "same").tolist() == list(range(8))
    # shift: within a block the previous noisy row; at a block start the previous clean row (L + i - 1)
    assert objective.prediction_index(8, 4, "shift").tolist() == [0, 0, 1, 2, 8 + 3, 4, 5, 6]


def test_bd3_loss_weights_by_inverse_t_and_normalizes_per_sample():
    vocab = 5
    x0 = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    labels = torch.tensor([[-100, 2, 3, 4], [-100, -100, 3, 4]])
    masked = torch.tensor([[False, True, False, True], [False, False, True, False]])
    t = torch.tensor([[0.5] * 4, [0.25] * 4])
    logits = torch.zeros(int(masked.sum()), vocab)  # uniform: CE = log 5 everywhere
    loss = objective.bd3_loss(logits, x0, masked, t, labels)
    ce = math.log(vocab)
    expected = ((ce / 0.5 + ce / 0.5) / 3 + (ce / 0.25) / 2) / 2
    assert abs(loss.item() - expected) < 1e-5


def test_transfer_schedule_sums_to_block():
    for b in range(1, 17):
        for s in range(1, b + 1):
            sched = sampling.transfer_schedule(b, s)
            assert len(sched) == s and sum(sched) == b and max(sched) - min(sched) <= 1


def _loop_static(conf, is_mask, k):
    out = torch.zeros_like(is_mask)
    for r in range(conf.shape[0]):
        score = torch.where(is_mask[r], conf[r], torch.tensor(-float("inf")))
        n = min(k, int(is_mask[r].sum()))
        if n:
            out[r, torch.topk(score, n).indices] = True
    return out


def test_static_policy_equals_per_row_topk_loop():
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        conf = torch.rand(5, 8, generator=g)
        is_mask = torch.rand(5, 8, generator=g) < 0.6
        for k in (1, 2, 3, 8):
            assert torch.equal(sampling.static_policy(conf, is_mask, k, 0.9), _loop_static(conf, is_mask, k))


def test_threshold_policy_is_union_of_confident_and_topk():
    conf = torch.tensor([[0.95, 0.2, 0.92, 0.1], [0.3, 0.4, 0.1, 0.2]])
    is_mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    got = sampling.threshold_policy(conf, is_mask, 1, 0.9)
    assert got.tolist() == [[True, False, True, False], [False, True, False, False]]


def test_sampling_greedy_and_filters():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]])
    tok, conf = sampling.sample(logits, 0.0)
    assert tok.item() == 1 and abs(conf.item() - torch.softmax(logits, -1)[0, 1].item()) < 1e-6
    assert torch.isinf(sampling.filter_logits(logits, top_k=2)).tolist() == [[True, False, False, True]]
    kept = ~torch.isinf(sampling.filter_logits(logits, top_p=0.5))
    assert kept.tolist() == [[False, True, False, False]]


def test_sampling_matches_distribution_and_seed():
    logits = torch.log(torch.tensor([0.1, 0.6, 0.3])).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    tok, conf = sampling.sample(logits, 1.0, generator=g)
    freq = torch.bincount(tok, minlength=3).float() / tok.numel()
    assert torch.allclose(freq, torch.tensor([0.1, 0.6, 0.3]), atol=0.015)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(sampling.sample(logits, 1.0, generator=g2)[0], tok)
