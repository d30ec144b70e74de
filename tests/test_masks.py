"""masks.py / attention.py: the BD3 and block-causal rules, their dense and FlexAttention forms."""

from __future__ import annotations

import pytest
import torch

from conftest import has_cuda
from diffusionvl.core import attention, masks


def _reference_bd3(length: int, b: int) -> torch.Tensor:
    """Straight transcription of docs/design.md section 1, training step 4, one pair at a time."""
    out = torch.zeros(2 * length, 2 * length, dtype=torch.bool)
    for q in range(2 * length):
        for k in range(2 * length):
            qn, kn = q < length, k < length
            qb, kb = (q % length) // b, (k % length) // b
            if qn and kn:
                out[q, k] = qb == kb
            elif qn and not kn:
                out[q, k] = kb < qb
            elif not qn and not kn:
                out[q, k] = kb <= qb
    return out


@pytest.mark.parametrize("length,b", [(8, 2), (12, 4), (9, 3), (6, 1)])
def test_bd3_rule_matches_definition(length, b):
    idx = torch.arange(2 * length)
    assert torch.equal(masks.bd3_rule(idx[:, None], idx[None, :], length, b), _reference_bd3(length, b))


def test_bd3_dense_mask_padding_and_diagonal():
    valid = torch.tensor([[True] * 6 + [False] * 2])
    m = masks.bd3_dense_mask(valid, 2)[0, 0]  # [16, 16]
    length = 8
    pad = [6, 7, 14, 15]
    for p in pad:
        assert m[p].sum() == 1 and m[p, p]  # padding queries see only themselves
        others = [q for q in range(16) if q != p]
        assert not m[others, p].any()  # nobody attends to padding
    assert not m[:length, length:][torch.eye(length, dtype=torch.bool)].any()  # x_t never sees its own clean token


def test_flex_mask_mod_equals_dense_rule():
    valid = torch.tensor([[True] * 10 + [False] * 2, [True] * 12])
    mod = masks.bd3_mask_mod(valid, 4)
    dense = masks.bd3_dense_mask(valid, 4)[:, 0]
    n, length2 = dense.shape[0], dense.shape[1]
    for b in range(n):
        q = torch.arange(length2)[:, None]
        k = torch.arange(length2)[None, :]
        got = mod(torch.tensor(b), torch.tensor(0), q, k)
        assert torch.equal(got, dense[b])


def test_sliding_window_restricts_positions():
    idx = torch.arange(16)
    m = masks.bd3_rule(idx[:, None], idx[None, :], 8, 2, window=3)
    assert not m[8 + 7, 8 + 3]  # clean token 7 cannot see clean token 3 (distance 4 >= 3)
    assert m[8 + 7, 8 + 5]


def test_block_causal_dense_mask_with_left_padding():
    start = torch.tensor([0, 4])
    m = masks.block_causal_dense_mask(torch.arange(8, 12), 12, start, 4)[:, 0]  # queries = block 2
    assert m[0].all()  # sample 0 sees every slot up to the end of its block
    assert not m[1, :, :4].any() and m[1, :, 4:].all()  # sample 1 never sees its padding


def test_to_additive_and_backend_forms():
    mask = torch.tensor([[[[True, False]]]])
    add = masks.to_additive(mask, torch.float32)
    assert add[0, 0, 0, 0] == 0 and add[0, 0, 0, 1] == torch.finfo(torch.float32).min

    class Cfg:
        _attn_implementation = "eager"
        sliding_window = 4
        layer_types = ["sliding_attention", "full_attention"]

    built = attention.build(lambda w: mask, Cfg(), Cfg(), torch.float32)
    assert set(built) == {"full_attention", "sliding_attention"} and built["full_attention"].dtype == torch.float32


def test_training_backend_choice():
    assert attention.training_backend(torch.device("cpu")) == "sdpa"
    if has_cuda() and attention.flex_available():
        assert attention.training_backend(torch.device("cuda")) == "flex_attention"


# ---- invariant 4: FlexAttention BlockMask path == dense-mask SDPA path (GPU) ---------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not has_cuda() or not attention.flex_available(), reason="needs CUDA and FlexAttention")
def test_flex_training_forward_equals_sdpa():
    from conftest import tiny_diffusion

    dm = tiny_diffusion("qwen2", block_size=4)
    dm.hf_model.to("cuda")
    x0 = torch.randint(0, 300, (2, 32), device="cuda")
    labels = x0.clone()
    labels[:, :12] = -100
    mask = torch.ones_like(x0)
    mask[1, 28:] = 0
    batch = {"input_ids": x0, "labels": labels, "attention_mask": mask}
    prep = dm.prepare_batch(batch)
    x_t = x0.clone()
    x_t[:, 16:20] = dm.mask_token_id
    with torch.no_grad():
        dm.hf_model.set_attn_implementation("sdpa")
        ref = dm.bd3_prediction_logits(x_t, prep)
        dm.hf_model.set_attn_implementation("flex_attention")
        got = dm.bd3_prediction_logits(x_t, prep)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=2e-3, atol=2e-3)
