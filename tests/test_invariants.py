"""docs/design.md section 3: the equivalences that prove the engine correct, on tiny random models in fp32 on CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import TEXT_ARCHS, VL_ARCHS, red_square, tiny_ar, tiny_diffusion
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.core import attention, masks, objective
from diffusionvl.model.wrapping import wrap

PROMPTS = ["Hello, how are you?", "What is the capital of France? Answer in one short sentence, please."]


def _hf_greedy(model, dm, conv, n):
    enc = dm.adapter.encode([conv])
    kwargs = {}
    if enc.vision:
        inp = dm.processor(text=[dm.adapter.render(conv)], images=conv.images, return_tensors="pt")
        kwargs = {k: inp[k] for k in ("pixel_values", "image_grid_thw", "mm_token_type_ids")}
    ids = torch.tensor([enc.input_ids[0]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=dm.pad_token_id, **kwargs)[0, ids.shape[1]:].tolist()
    stop = set(dm.stop_token_ids)
    return out[: next((i for i, t in enumerate(out) if t in stop), len(out))]


# ---- invariant 1: B = 1, S = 1 block decoding of an unconverted AR model == greedy transformers generate ----------
@pytest.mark.parametrize("arch", TEXT_ARCHS + VL_ARCHS)
def test_b1_block_decoding_equals_hf_greedy_generate(arch):
    model, proc = tiny_ar(arch)
    dm = wrap(model, proc, block_size=1, prediction="shift")
    for prompt in PROMPTS:
        images = [red_square()] if arch in VL_ARCHS else None
        conv = to_conversation(prompt, images)
        ref = _hf_greedy(model, dm, conv, 24)
        ours = dm.generate(prompt, images=images, decoder="block", block_size=1, steps=1, max_new_tokens=24)
        assert ours.token_ids[0] == ref
        ar = dm.generate(prompt, images=images, decoder="ar", max_new_tokens=24)
        assert ar.token_ids[0] == ref


# ---- invariant 2: block decoding with the KV cache == recomputing the whole prefix every step ----------------------
@pytest.mark.parametrize("arch", TEXT_ARCHS + VL_ARCHS)
@pytest.mark.parametrize("prediction", ["shift", "same"])
@pytest.mark.parametrize("policy", ["static", "threshold"])
def test_cache_equals_no_cache(arch, prediction, policy):
    dm = tiny_diffusion(arch, block_size=4, prediction=prediction)
    images = [[red_square()], [red_square(color="blue")]] if arch in VL_ARCHS else None
    kw = dict(decoder="block", block_size=4, steps=2, policy=policy, threshold=0.05, max_new_tokens=19)
    cached = dm.generate(PROMPTS, images=images, use_cache=True, **kw)
    fresh = dm.generate(PROMPTS, images=images, use_cache=False, **kw)
    assert cached.token_ids == fresh.token_ids
    # the fused commit costs no extra forward: the cache only adds the prefill
    assert cached.stats["forwards"] == fresh.stats["forwards"] + cached.stats["prefill_forwards"]


# ---- invariant 3: training forward (x_t half) == inference forward of [clean blocks < k ; noisy block k] ---------
def _noisy_batch(dm, arch, length_blocks=4):
    tok = dm.tokenizer
    convs = [to_conversation([{"role": "user", "content": "Name a colour."},
                              {"role": "assistant", "content": "Red, like a ripe tomato in summer."}],
                             [red_square()] if arch in VL_ARCHS else None)]
    enc = dm.adapter.tokenize([dm.adapter.render(convs[0], False)], [convs[0].images]) if arch in VL_ARCHS else None
    ids = enc.input_ids[0] if enc else tok(dm.adapter.render(convs[0], False), add_special_tokens=False)["input_ids"]
    ids = ids[: (len(ids) // dm.config.block_size) * dm.config.block_size]
    x0 = torch.tensor([ids])
    labels = x0.clone()
    labels[:, : len(ids) // 2] = -100
    batch = {"input_ids": x0, "labels": labels, "attention_mask": torch.ones_like(x0)}
    if enc:
        batch.update({k: enc.vision[k] for k in ("pixel_values", "image_grid_thw", "image_grid_thw_per_sample")})
    return batch


@pytest.mark.parametrize("arch", TEXT_ARCHS + VL_ARCHS)
@pytest.mark.parametrize("prediction", ["shift", "same"])
def test_training_forward_matches_inference_forward(arch, prediction):
    bsz = 4
    dm = tiny_diffusion(arch, block_size=bsz, prediction=prediction).eval()
    prep = dm.prepare_batch(_noisy_batch(dm, arch))
    x0, labels = prep["x0"], prep["labels"]
    g = torch.Generator().manual_seed(3)
    rates = torch.full((1, x0.shape[1] // bsz), 0.6)
    x_t, masked, _ = objective.noise_tokens(x0, labels, rates, bsz, dm.mask_token_id, g)
    assert masked.any()
    with torch.no_grad():
        train_logits = dm.bd3_prediction_logits(x_t, prep)  # [1, L, V]
        text_cfg = dm.adapter.text_config
        for k in range(x0.shape[1] // bsz):
            s, e = k * bsz, (k + 1) * bsz
            ids = torch.cat([x0[:, :s], x_t[:, s:e]], dim=1)  # clean blocks < k ; noisy block k
            if prep["vision"]:
                feats = dm.adapter.image_features(prep["vision"])
                n_img = int((ids == dm.adapter.image_token_id).sum())
                emb = dm.adapter.embed(ids, features=feats[:n_img]) if n_img else dm.adapter.input_embeddings()(ids)
            else:
                emb = dm.adapter.input_embeddings()(ids)
            q = torch.arange(e)

            def rule(window):
                return masks.block_causal_dense_mask(q, e, torch.zeros(1, dtype=torch.long), bsz, window)

            mask = attention.build(rule, text_cfg, text_cfg, emb.dtype)
            hidden = dm.adapter.run_decoder(emb, mask, prep["positions"][:, :, :e])
            rows = slice(s - 1, e - 1) if prediction == "shift" else slice(s, e)
            if prediction == "shift" and s == 0:
                continue  # token 0 has no predecessor
            infer_logits = dm.adapter.head(hidden[:, rows])
            torch.testing.assert_close(train_logits[:, s:e], infer_logits, rtol=1e-4, atol=1e-4)


# ---- invariant 5: batched decoding (padded, different prompt lengths) == decoding each sample alone ---------------
@pytest.mark.parametrize("arch", TEXT_ARCHS + VL_ARCHS)
@pytest.mark.parametrize("decoder", ["block", "ar", "full"])
def test_batched_equals_alone(arch, decoder):
    dm = tiny_diffusion(arch, block_size=4)
    prompts = PROMPTS + ["Count: one two three four five six seven eight nine ten eleven twelve"]
    images = [[red_square()], [red_square(color="blue")], [red_square((60, 60))]] if arch in VL_ARCHS else None
    kw = dict(decoder=decoder, block_size=4, steps=2, max_new_tokens=13)
    batched = dm.generate(prompts, images=images, **kw)
    for i, p in enumerate(prompts):
        alone = dm.generate(p, images=images[i] if images else None, **kw)
        assert batched.token_ids[i] == alone.token_ids[0], f"sample {i}"


def test_per_sample_eos_stop_in_batch():
    """Sample 0 emits EOS at once and stops; sample 1 goes on exactly as alone (the reference stops the batch)."""
    dm = tiny_diffusion("llama", block_size=4)
    head = dm.adapter.head

    def eos_for_row0(hidden):
        logits = head(hidden)
        if logits.shape[0] == 2:
            logits[0, ..., dm.eos_token_id] = 1e4
        return logits

    alone = dm.generate(PROMPTS[1], max_new_tokens=12)
    dm.adapter.head = eos_for_row0
    out = dm.generate(PROMPTS, max_new_tokens=12)
    assert out.token_ids[0] == [] and out.finish_reasons[0] == "stop"
    assert out.token_ids[1] == alone.token_ids[0] and out.finish_reasons[1] == alone.finish_reasons[0]
    assert len(out.token_ids[1]) == 12 or out.finish_reasons[1] == "stop"


# ---- invariant 6: convert -> save -> load keeps weights, mask token and block size -------------------------------
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen2_5_vl"])
def test_convert_save_load_round_trip(tmp_path, arch):
    import diffusionvl

    model, proc = tiny_ar(arch)
    src = tmp_path / "ar"
    model.save_pretrained(src)
    proc.save_pretrained(src)
    dst = diffusionvl.convert(src, tmp_path / "dvl", block_size=4)
    loaded = diffusionvl.load(dst, device="cpu")
    fresh = wrap(*tiny_ar(arch), block_size=4)
    assert loaded.config.block_size == 4
    assert loaded.tokenizer.convert_ids_to_tokens(loaded.mask_token_id) == "<|mask|>"
    assert loaded.mask_token_id == fresh.mask_token_id
    ref = fresh.hf_model.state_dict()
    for name, tensor in loaded.hf_model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)
    again = diffusionvl.load(dst, device="cpu")  # loading twice finds the mask token by name, adds nothing
    assert len(again.tokenizer) == len(loaded.tokenizer)
    prompt = PROMPTS[0]
    images = [red_square()] if arch in VL_ARCHS else None
    assert loaded.generate(prompt, images=images, max_new_tokens=8).token_ids == \
        fresh.generate(prompt, images=images, max_new_tokens=8).token_ids


def test_mask_token_found_by_name_not_added_twice():
    model, tok = tiny_ar("qwen2")
    tok.add_tokens(["<|mdm_mask|>"], special_tokens=True)
    n = len(tok)
    dm = wrap(model, tok, block_size=4)
    assert dm.config.mask_token == "<|mdm_mask|>" and len(tok) == n
    assert dm.mask_token_id == tok.convert_tokens_to_ids("<|mdm_mask|>")


def test_added_mask_row_is_mean_embedding():
    model, tok = tiny_ar("llama")
    rows = model.get_input_embeddings().weight.shape[0]
    mean = model.get_input_embeddings().weight.mean(0).clone()
    out_mean = model.lm_head.weight.mean(0).clone()
    dm = wrap(model, tok, block_size=4)
    assert dm.mask_token_id == rows  # no spare row: the embeddings grew by one
    torch.testing.assert_close(dm.hf_model.get_input_embeddings().weight[dm.mask_token_id], mean)
    torch.testing.assert_close(dm.hf_model.lm_head.weight[dm.mask_token_id], out_mean)
