"""Early stop (DecodeConfig.stop_early, decoding/state.py `live_masks`): a sample's block stops denoising once every
position up to its first stop token is filled. Same tokens as without it, never more forwards, fewer where a stop
token lands early in a block; and the per-sample speed stats (decoding/__init__.py). CPU, fp32, tiny models."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_diffusion
from diffusionvl.backbone.adapters import Encoded
from diffusionvl.core.config import DecodeConfig
from diffusionvl.decoding import run_encoded, state, static
from diffusionvl.decoding.state import DecodeState

PROMPTS = ["Count: one two", "Hello, how are you?", "What is the capital of France? Answer in one short sentence.",
           "Tell me a story about a dragon and a knight."]
PATHS = {"plain": dict(fast="off"), "fast": dict(fast="on"), "no_cache": dict(fast="off", use_cache=False)}


def _stop_prone(prediction: str):
    """A tiny model whose stop token is likely enough that answers end at different, data-dependent places."""
    dm = tiny_diffusion("llama", block_size=4, prediction=prediction)
    static.clear_sessions(dm)
    head, eos = dm.adapter.head, dm.eos_token_id

    def biased(hidden):
        logits = head(hidden)
        logits[..., eos] += 0.35
        return logits

    dm.adapter.head = biased
    return dm


def _both(dm, prompts, **kw):
    opts = dict(block_size=4, steps=4, max_new_tokens=18, threshold=0.004) | kw
    return dm.generate(prompts, stop_early=False, **opts), dm.generate(prompts, stop_early=True, **opts)


def _assert_same_fewer(ref, out):
    assert out.token_ids == ref.token_ids and out.finish_reasons == ref.finish_reasons
    assert out.stats["tokens_per_sample"] == ref.stats["tokens_per_sample"]
    assert out.stats["forwards"] <= ref.stats["forwards"]
    assert all(a <= b for a, b in zip(out.stats["forwards_per_sample"], ref.stats["forwards_per_sample"]))


# ---- the rule, on hand-built rows ----------------------------------------------------------------------------------
def test_live_masks_rule():
    """Block [8, 12), stop id 2, mask id 9: a sample keeps its masks until a placed stop token of its answer has no
    mask before it; done samples have no work; a stop id among the prompt's leftover tokens ends nothing."""
    m = 9
    block_ = torch.tensor([[5, m, 2, m],  # stop token placed, a mask before it: keeps working
                           [5, 6, 2, m],  # answer ended at column 2: no more work
                           [5, 6, 7, m],  # no stop token: keeps working
                           [m, m, m, m],  # done in an earlier block: no work
                           [2, 7, m, m]])  # columns 0-1 are prompt (answer starts at slot 10): keeps working
    batch = DecodeState(None, block_, torch.tensor([False, False, False, True, False]),
                        gen_start=torch.tensor([8, 8, 8, 8, 10]))
    live = state.live_masks(batch, block_, block_ == m, 8, torch.tensor([2]), max_new=16)
    assert live.any(dim=1).tolist() == [True, False, True, False, True]
    assert torch.equal(live[[0, 2, 4]], (block_ == m)[[0, 2, 4]])


# ---- (1) same tokens, never more forwards -------------------------------------------------------------------------
@pytest.mark.parametrize("prediction", ["shift", "same"])
@pytest.mark.parametrize("policy", ["static", "threshold"])
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("steps", [2, 4])
def test_same_tokens_never_more_forwards(prediction, policy, path, batch, steps):
    """Batch 1 and a batch of different prompt and answer lengths, both alignments, plain / fast / no-cache loops,
    one or two tokens per static step."""
    dm = _stop_prone(prediction)
    ref, out = _both(dm, PROMPTS[:batch], policy=policy, steps=steps, **PATHS[path])
    assert "stop" in ref.finish_reasons  # the case exercises early stop
    _assert_same_fewer(ref, out)
    assert out.stats["backend"] == ("fast/eager" if path == "fast" else "plain")


@pytest.mark.parametrize("policy", ["static", "threshold"])
def test_fast_equals_plain_with_early_stop(policy):
    dm = _stop_prone("shift")
    plain = dm.generate(PROMPTS, block_size=4, steps=2, threshold=0.004, policy=policy, max_new_tokens=18, fast="off")
    quick = dm.generate(PROMPTS, block_size=4, steps=2, threshold=0.004, policy=policy, max_new_tokens=18, fast="on")
    assert quick.token_ids == plain.token_ids
    assert quick.stats["forwards"] == plain.stats["forwards"]
    assert quick.stats["forwards_per_sample"] == plain.stats["forwards_per_sample"]


def test_sampled_batch_of_one_same_tokens():
    """With sampling, a batch of one draws the same numbers up to its stop token with or without early stop."""
    dm = _stop_prone("shift")
    for prompt in PROMPTS:
        ref, out = _both(dm, prompt, temperature=0.8, seed=5)
        _assert_same_fewer(ref, out)


# ---- (2) strictly fewer forwards where a stop token lands early in a block ----------------------------------------
def _force_stop_at_column_2(monkeypatch, stop_id: int):
    """Stub sampling: in every block, column 2's candidate is the stop token with the top confidence, columns 0 and 1
    (model candidates) come next, column 3 keeps the model's (tiny) confidence. A static step of k = 1 thus places
    the stop token first, while columns 0 and 1 are still masked (that must not end the block), then fills 0, then 1;
    the threshold policy (threshold 0.5) fills 0-2 in one step. Column 3 lies after the answer."""
    real = state.sample

    def forced(logits, *args, **kwargs):
        cand, conf = real(logits, *args, **kwargs)
        cand, conf = cand.clone(), conf.clone()
        cand[:, 2] = stop_id
        conf[:, 2], conf[:, 0], conf[:, 1] = 2.0, 1.6, 1.5
        return cand, conf

    monkeypatch.setattr(state, "sample", forced)


# prompt lengths 8, 9, 11 (B = 4): leftovers 0, 1, 3 in the first block. Row 0 answers columns 0-1 of block 0, row 1
# column 1, row 2 column 3 of block 0 and columns 0-1 of block 1 (then the stop token at column 2).
LENGTHS = [8, 9, 11]
EXPECTED = {  # policy -> (forwards, forwards per sample) with early stop, then without
    "static": ((7, [4, 3, 5]), (9, [5, 4, 6])),
    "threshold": ((3, [2, 2, 3]), (5, [3, 3, 4])),
}


@pytest.mark.parametrize("policy", ["static", "threshold"])
@pytest.mark.parametrize("fast", ["off", "on"])
@pytest.mark.parametrize("rows", [[0], [1], [0, 1, 2]])
def test_stop_early_in_block_saves_forwards(monkeypatch, policy, fast, rows):
    dm = tiny_diffusion("llama", block_size=4)
    static.clear_sessions(dm)
    _force_stop_at_column_2(monkeypatch, dm.eos_token_id)
    ids = [[20 + i for i in range(LENGTHS[r])] for r in rows]

    def decode(stop_early):
        cfg = DecodeConfig(block_size=4, steps=4, policy=policy, threshold=0.5, max_new_tokens=16, fast=fast,
                           stop_early=stop_early)
        *_, final = run_encoded(dm, Encoded(input_ids=ids), cfg)
        return final.output

    ref, out = decode(False), decode(True)
    _assert_same_fewer(ref, out)
    assert out.finish_reasons == ["stop"] * len(rows)
    assert out.stats["tokens_per_sample"] == [[3, 2, 4][r] for r in rows]
    assert out.stats["forwards"] < ref.stats["forwards"]
    (on_total, on_rows), (off_total, off_rows) = EXPECTED[policy]
    assert out.stats["forwards_per_sample"] == [on_rows[r] for r in rows]
    assert ref.stats["forwards_per_sample"] == [off_rows[r] for r in rows]
    if rows == [0, 1, 2]:
        assert (out.stats["forwards"], ref.stats["forwards"]) == (on_total, off_total)


# ---- the speed stats ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("decoder,stop_early", [("block", True), ("block", False), ("ar", True), ("full", True)])
def test_per_sample_stats(decoder, stop_early):
    """Alone, a sample takes every forward of the call; in a batch, tokens per forward is the mean of the samples'
    own ratios (answer tokens, stop token included, over the forwards that had work for them)."""
    dm = _stop_prone("shift")
    kw = dict(decoder=decoder, block_size=4, steps=2, max_new_tokens=18, stop_early=stop_early)
    for prompt in PROMPTS:
        alone = dm.generate(prompt, **kw).stats
        assert alone["forwards_per_sample"] == [alone["forwards"]]
        assert alone["tokens_per_sample"] == [alone["tokens"]]
    st = dm.generate(PROMPTS, **kw).stats
    assert sum(st["tokens_per_sample"]) == st["tokens"]
    assert all(1 <= f <= st["forwards"] for f in st["forwards_per_sample"])
    ratios = [n / f for n, f in zip(st["tokens_per_sample"], st["forwards_per_sample"])]
    assert st["tokens_per_forward"] == pytest.approx(sum(ratios) / len(ratios))
    assert st["stop_early"] == (stop_early and decoder == "block")


def test_default_is_on():
    assert DecodeConfig().stop_early is True
