"""Packed training rows (invariant 7): several questions about one picture share one row and one copy of the image,
and each question gets exactly the loss it gets alone, for the AR objective and for BD3; no attention crosses
segments; positions restart after the shared prefix (M-RoPE included)."""

from __future__ import annotations

import pytest
import torch

from conftest import red_square, tiny_diffusion
from diffusionvl.core import masks
from diffusionvl.jobs.train.collator import Collator
from diffusionvl.jobs.train.data import Record
from diffusionvl.jobs.train.encode import SampleEncoder
from diffusionvl.jobs.train.packing import PackingEncoder, split_turns

QA = [("What colour is the square?", "Red."), ("Where is it?", "At the top left, near the corner."),
      ("How many squares are there?", "One.")]


def _text(t):
    return [{"type": "text", "text": t}]


def _record(with_image: bool) -> Record:
    messages = []
    for i, (q, a) in enumerate(QA):
        user = ([{"type": "image"}] if with_image and i == 0 else []) + _text(q)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": _text(a)}]
    return Record(messages, [red_square()] if with_image else [], "test")


def _collate(dm, samples):
    items = [{"sample": s, "index": i, "position": i, "skipped": []} for i, s in enumerate(samples)]
    batch = Collator(dm.pad_token_id, dm.config.block_size, dm.adapter)(items)
    batch.pop("meta")
    return batch


def _setup(arch, objective):
    dm = tiny_diffusion(arch, block_size=4).eval()
    enc = SampleEncoder(dm, 512, "truncate", objective)
    record = _record(arch == "qwen2_5_vl")
    packed = PackingEncoder(enc)(record)
    alone = [enc(r) for r in split_turns(record)]
    return dm, packed, alone


@pytest.mark.parametrize("arch", ["llama", "qwen2_5_vl"])
def test_packed_row_layout(arch):
    dm, packed, alone = _setup(arch, "bd3")
    p, b = packed.prefix, dm.config.block_size
    assert len(packed.pieces) == 3 and p > 0 and p % b == 0
    assert all(start % b == 0 and size % b == 0 for start, size in packed.pieces)  # whole blocks
    for (start, size), a in zip(packed.pieces, alone):
        assert torch.equal(packed.input_ids[:p], a.input_ids[:p])
        assert torch.equal(packed.input_ids[start:start + size], a.input_ids[p:])
        assert int((packed.labels[start:start + size] != -100).sum()) == int((a.labels != -100).sum())
    if arch == "qwen2_5_vl":  # the image is paid once: its tokens sit in the prefix only
        image = dm.adapter.image_token_id
        assert int((packed.input_ids == image).sum()) == int((alone[0].input_ids == image).sum()) > 0
        assert int((packed.input_ids[p:] == image).sum()) == 0


@pytest.mark.parametrize("arch", ["llama", "qwen2_5_vl"])
def test_packed_ar_loss_equals_each_question_alone(arch):
    dm, packed, alone = _setup(arch, "ar")
    with torch.no_grad():
        out = dm.ar_loss(_collate(dm, [packed]), norm="segment")
        for i, a in enumerate(alone):
            ref = dm.ar_loss(_collate(dm, [a])).loss
            torch.testing.assert_close(out.per_segment[0, i + 2], ref, rtol=1e-4, atol=1e-5)
        refs = torch.stack([dm.ar_loss(_collate(dm, [a])).loss for a in alone])
    torch.testing.assert_close(out.loss, refs.mean(), rtol=1e-4, atol=1e-5)  # 'segment': every question once


@pytest.mark.parametrize("arch", ["llama", "qwen2_5_vl"])
def test_packed_bd3_loss_equals_each_question_alone(arch):
    dm, packed, alone = _setup(arch, "bd3")
    b, p = dm.config.block_size, packed.prefix
    batch = _collate(dm, [packed])
    length = batch["input_ids"].shape[1]
    g = torch.Generator().manual_seed(3)
    draw, rates = torch.rand(1, length, generator=g), torch.rand(1, length // b, generator=g) * 0.9 + 0.1
    with torch.no_grad():
        out = dm.training_loss(batch, rates=rates, draw=draw, norm="segment")
        for i, ((start, size), a) in enumerate(zip(packed.pieces, alone)):
            idx = torch.cat([torch.arange(p), torch.arange(start, start + size)])  # the row's tokens of this question
            blocks = idx[::b] // b
            ref = dm.training_loss(_collate(dm, [a]), rates=rates[:, blocks], draw=draw[:, idx])
            torch.testing.assert_close(out.per_segment[0, i + 2], ref.per_sample[0], rtol=1e-4, atol=1e-5)


def test_no_attention_crosses_segments():
    """Changing the second question's tokens moves none of the other questions' BD3 logits. (With 'shift'
    prediction the logit *for* a segment's first token is read from the row before it, in the previous segment; that
    token is a prompt token, never a loss token, so it is left out.)"""
    dm, packed, _ = _setup("llama", "bd3")
    batch = _collate(dm, [packed])
    (s1, n1), (s2, n2), (s3, n3) = packed.pieces
    other = batch["input_ids"].clone()
    other[0, s2:s2 + n2 - 2] = (other[0, s2:s2 + n2 - 2] + 7) % dm.vocab_size
    logits = []
    with torch.no_grad():
        for ids in (batch["input_ids"], other):
            prep = dm.prepare_batch({**batch, "input_ids": ids})
            logits.append(dm.bd3_prediction_logits(prep["x0"], prep))  # [1, L, V]
    keep = torch.cat([torch.arange(packed.prefix), torch.arange(s1 + 1, s1 + n1), torch.arange(s3 + 1, s3 + n3)])
    assert int(batch["labels"][0, s3]) == -100
    torch.testing.assert_close(logits[0][0, keep], logits[1][0, keep], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0][0, s2:s2 + n2], logits[1][0, s2:s2 + n2])


def test_segment_rule_dense_equals_flex_mask_mod():
    """The FlexAttention mask_mod and the dense SDPA mask evaluate the same packed-row rule."""
    valid = torch.tensor([[1] * 12 + [0] * 4]).bool()
    segment = torch.tensor([[1] * 4 + [2] * 4 + [3] * 4 + [0] * 4])
    context = torch.tensor([[1] * 12 + [0] * 4])
    dense = masks.bd3_dense_mask(valid, 4, None, segment, context)[:, 0]
    mod = masks.bd3_mask_mod(valid, 4, None, segment, context)
    q, k = torch.arange(32)[:, None], torch.arange(32)[None, :]
    assert torch.equal(mod(torch.zeros(1, dtype=torch.long), 0, q, k), dense[0])
    # a noisy block of segment 2 sees its own block, the prefix's clean blocks, never segment 3
    assert dense[0, 4, 16 + 0] and not dense[0, 4, 16 + 8] and not dense[0, 4, 8]


def test_records_that_cannot_be_split_are_encoded_unchanged():
    dm = tiny_diffusion("llama", block_size=4).eval()
    enc = SampleEncoder(dm, 512, "truncate", "bd3")
    one = Record([{"role": "user", "content": _text("Hi")}, {"role": "assistant", "content": _text("Hello.")}],
                 [], "one")
    assert split_turns(one) is None
    out = PackingEncoder(enc)(one)
    assert out.segment is None and torch.equal(out.input_ids, enc(one).input_ids)


def test_ar_objective_does_not_supervise_block_padding():
    """Block-aligned EOS is for BD3 only: an AR sample ends at its end-of-turn token."""
    dm = tiny_diffusion("llama", block_size=8).eval()
    rec = Record([{"role": "user", "content": _text("Colour?")}, {"role": "assistant", "content": _text("red")}],
                 [], "r")
    ar, bd3 = SampleEncoder(dm, 512, "truncate", "ar")(rec), SampleEncoder(dm, 512, "truncate", "bd3")(rec)
    assert int(ar.labels[-1]) == dm.eos_token_id and int((ar.labels == dm.eos_token_id).sum()) == 1
    assert bd3.input_ids.numel() % 8 == 0 and int((bd3.labels != -100).sum()) > int((ar.labels != -100).sum())
