"""The engine's invariants (docs/design.md section 3) as hypothesis properties over generated cases, on tiny random
models (CPU, fp32): ragged batches of token-id prompts (shorter and longer than a block), block sizes, steps, policies,
thresholds, budgets, extra stop tokens, sampling with seeds; training rows of generated lengths, prompt spans and
masking rates; packed rows of generated questions. The hand-picked cases live in test_invariants.py,
test_fast_decoding.py and test_packing.py.

CI runs the `ci` profile (tests/conftest.py: 40 examples a property, derandomized: the same cases every run);
`pytest tests/test_properties.py --hypothesis-profile long` is the deep run (docs/reliability.md)."""

from __future__ import annotations

import collections
import functools
from contextlib import contextmanager

import pytest
import torch

from conftest import red_square, tiny_diffusion

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from diffusionvl.backbone.adapters import Encoded  # noqa: E402
from diffusionvl.core import attention, masks, objective  # noqa: E402
from diffusionvl.core.config import DecodeConfig  # noqa: E402
from diffusionvl.decoding import run_encoded  # noqa: E402

FIRST_PLAIN_ID = 7  # the tiny tokenizer's ids 0..6 are special; the mask token is the last id
WORDS = "red blue green square circle small large left right top one two three the a is near corner".split()


@functools.lru_cache(maxsize=None)
def _model(arch: str, block_size: int, prediction: str):
    return tiny_diffusion(arch, block_size=block_size, prediction=prediction).eval()


@functools.lru_cache(maxsize=None)
def _frequent_tokens(prediction: str) -> tuple[int, ...]:
    """Tokens the tiny random model emits most, so that generated stop tokens do stop answers (at different places)."""
    dm = _model("llama", 4, prediction)
    out = dm.generate(["Hello", "Name a colour.", "Count to five."], max_new_tokens=24)
    return tuple(t for t, _ in collections.Counter(sum(out.token_ids, [])).most_common(8))


@contextmanager
def _stops(dm, extra: list[int]):
    base = dm.stop_token_ids
    dm.stop_token_ids = sorted({*base, *extra})
    try:
        yield
    finally:
        dm.stop_token_ids = base


def _decode(dm, prompts: list[list[int]], **kw):
    *_, final = run_encoded(dm, Encoded(input_ids=prompts), DecodeConfig(**kw))
    return final.output


_prompts = st.lists(st.lists(st.integers(FIRST_PLAIN_ID, 383), min_size=1, max_size=19), min_size=1, max_size=4)


@st.composite
def decode_cases(draw, sampled: bool):
    """(prediction, prompts, DecodeConfig fields, extra stop tokens)."""
    decoder = draw(st.sampled_from(["block", "block", "ar", "full"]))
    block = 1 if decoder == "ar" else draw(st.sampled_from([1, 2, 3, 4, 8]))
    kw = dict(decoder=decoder, block_size=block, steps=draw(st.integers(1, block)),
              policy=draw(st.sampled_from(["static", "threshold"])), threshold=draw(st.floats(0.01, 1.0)),
              max_new_tokens=draw(st.integers(1, 20)), stop_early=draw(st.booleans()))
    if sampled and draw(st.booleans()):
        kw.update(temperature=draw(st.floats(0.3, 1.5)), top_k=draw(st.sampled_from([0, 5, 50])),
                  top_p=draw(st.sampled_from([1.0, 0.9])), seed=draw(st.integers(0, 2**32)))
    prediction = draw(st.sampled_from(["shift", "same"]))
    stops = draw(st.lists(st.sampled_from(_frequent_tokens(prediction)), max_size=2, unique=True))
    return prediction, draw(_prompts), kw, stops


# ---- invariant 5: a ragged greedy batch == each sample alone --------------------------------------------------------
@given(decode_cases(sampled=False))
def test_batch_equals_each_sample_alone(case):
    prediction, prompts, kw, stops = case
    dm = _model("llama", 4, prediction)
    with _stops(dm, stops):
        batched = _decode(dm, prompts, **kw)
        for i, p in enumerate(prompts):
            alone = _decode(dm, [p], **kw)
            assert batched.token_ids[i] == alone.token_ids[0], f"sample {i}"
            assert batched.finish_reasons[i] == alone.finish_reasons[0], f"sample {i}"
        assert all(len(t) <= kw["max_new_tokens"] for t in batched.token_ids)


# ---- invariant 2: the KV cache == recomputing the prefix every step (greedy and seeded sampling) ------------------
@given(decode_cases(sampled=True))
def test_cache_equals_no_cache(case):
    prediction, prompts, kw, stops = case
    dm = _model("llama", 4, prediction)
    with _stops(dm, stops):
        cached, fresh = _decode(dm, prompts, use_cache=True, **kw), _decode(dm, prompts, use_cache=False, **kw)
    assert cached.token_ids == fresh.token_ids and cached.finish_reasons == fresh.finish_reasons


# ---- the fast path (static shapes) == the plain path, token for token --------------------------------------------
@given(decode_cases(sampled=True))
def test_fast_equals_plain(case):
    prediction, prompts, kw, stops = case
    dm = _model("llama", 4, prediction)
    with _stops(dm, stops):
        plain, quick = _decode(dm, prompts, fast="off", **kw), _decode(dm, prompts, fast="on", **kw)
    assert quick.token_ids == plain.token_ids and quick.finish_reasons == plain.finish_reasons
    assert quick.stats["forwards"] == plain.stats["forwards"]


# ---- invariant 3: the 2L training forward's x_t half == the per-block inference forward ---------------------------
@given(block=st.sampled_from([1, 2, 3, 4, 8]), prediction=st.sampled_from(["shift", "same"]), data=st.data())
def test_training_forward_equals_per_block_forward(block, prediction, data):
    dm = _model("llama", block, prediction)
    n_blocks = data.draw(st.integers(1, max(2, 24 // block)), label="blocks")
    ids = data.draw(st.lists(st.integers(FIRST_PLAIN_ID, 383), min_size=n_blocks * block, max_size=n_blocks * block),
                    label="ids")
    prompt = data.draw(st.integers(0, len(ids) - 1), label="prompt tokens")
    rates = data.draw(st.lists(st.floats(0.05, 1.0), min_size=n_blocks, max_size=n_blocks), label="rates")
    x0 = torch.tensor([ids])
    labels = x0.clone()
    labels[:, :prompt] = -100
    prep = dm.prepare_batch({"input_ids": x0, "labels": labels, "attention_mask": torch.ones_like(x0)})
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31), label="noise seed"))
    x_t, _, _ = objective.noise_tokens(prep["x0"], prep["labels"], torch.tensor([rates]), block, dm.mask_token_id, g)
    text_cfg = dm.adapter.text_config
    with torch.no_grad():
        train = dm.bd3_prediction_logits(x_t, prep)  # [1, L, V]
        for k in range(n_blocks):
            s, e = k * block, (k + 1) * block
            if prediction == "shift" and s == 0:
                continue  # token 0 has no predecessor
            emb = dm.adapter.input_embeddings()(torch.cat([x0[:, :s], x_t[:, s:e]], dim=1))  # clean < k ; noisy k

            def rule(window, e=e):
                return masks.block_causal_dense_mask(torch.arange(e), e, torch.zeros(1, dtype=torch.long), block,
                                                     window)

            hidden = dm.adapter.run_decoder(emb, attention.build(rule, text_cfg, text_cfg, emb.dtype),
                                            prep["positions"][:, :, :e])
            rows = slice(s - 1, e - 1) if prediction == "shift" else slice(s, e)
            torch.testing.assert_close(train[:, s:e], dm.adapter.head(hidden[:, rows]), rtol=1e-4, atol=1e-4)


# ---- invariant 7: a packed row gives each question the loss it gets alone (AR and BD3) ----------------------------
def _words(n: int):
    return st.lists(st.sampled_from(WORDS), min_size=1, max_size=n).map(" ".join)


@settings(max_examples=max(2, settings.default.max_examples // 2))  # two models' worth of work per example
@given(arch=st.sampled_from(["llama", "qwen2_5_vl"]), block=st.sampled_from([2, 4, 8]),
       objective_name=st.sampled_from(["ar", "bd3"]), turns=st.lists(st.tuples(_words(8), _words(12)), min_size=2,
                                                                      max_size=4),
       seed=st.integers(0, 2**31))
def test_packed_segments_equal_each_alone(arch, block, objective_name, turns, seed):
    from diffusionvl.jobs.train.collator import Collator
    from diffusionvl.jobs.train.data import Record
    from diffusionvl.jobs.train.encode import SampleEncoder
    from diffusionvl.jobs.train.packing import PackingEncoder, split_turns

    dm = _model(arch, block, "shift")
    image = arch == "qwen2_5_vl"
    messages = []
    for i, (q, a) in enumerate(turns):
        user = ([{"type": "image"}] if image and i == 0 else []) + [{"type": "text", "text": q + "?"}]
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": a}]}]
    record = Record(messages, [red_square()] if image else [], "generated")
    encoder = SampleEncoder(dm, 512, "truncate", objective_name)
    packed, alone = PackingEncoder(encoder)(record), [encoder(r) for r in split_turns(record)]

    def collate(samples):
        items = [{"sample": s, "index": i, "position": i, "skipped": []} for i, s in enumerate(samples)]
        batch = Collator(dm.pad_token_id, block, dm.adapter)(items)
        batch.pop("meta")
        return batch

    batch = collate([packed])
    with torch.no_grad():
        if objective_name == "ar":
            out = dm.ar_loss(batch, norm="segment")
            refs = [dm.ar_loss(collate([a])).loss for a in alone]
        else:
            g = torch.Generator().manual_seed(seed)
            length = batch["input_ids"].shape[1]
            draw, rates = torch.rand(1, length, generator=g), torch.rand(1, length // block, generator=g) * 0.9 + 0.1
            out = dm.training_loss(batch, rates=rates, draw=draw, norm="segment")
            p, refs = packed.prefix, []
            for (start, size), a in zip(packed.pieces, alone):
                idx = torch.cat([torch.arange(p), torch.arange(start, start + size)])  # this question's tokens
                ref = dm.training_loss(collate([a]), rates=rates[:, idx[::block] // block], draw=draw[:, idx])
                refs.append(ref.per_sample[0])
    for i, ref in enumerate(refs):
        torch.testing.assert_close(out.per_segment[0, i + 2], ref, rtol=1e-4, atol=1e-5)
