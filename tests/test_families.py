"""The VLM families added behind the adapter interface (docs/architectures.md), each on its tiny random model with an
image in the prompt: B=1/S=1 block decoding == transformers' greedy `generate` on the same processor output (cache
on/off, fast path on/off); a ragged batch of 3 (with and without images) == each sample alone; the 2L training
forward == a per-block forward of [clean blocks < k ; noisy block k]; convert/save/load; `serve` answers an image
request. CPU, fp32."""

from __future__ import annotations

import base64
import io
from functools import partial

import pytest
import torch

from conftest import red_square, tiny_ar, tiny_diffusion
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.core import attention, masks, objective
from diffusionvl.model.wrapping import wrap

FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "gemma3_vl")
MODEL_TYPES = {"gemma3_vl": "gemma3"}  # tiny name -> model_type where they differ
PROMPT = "What shape is in the image? Answer in one short sentence."


def _hf_greedy(model, dm, conv, n):
    """transformers' own greedy generate on the processor's output for `conv` (every tensor it returns)."""
    inputs = dm.processor(text=[dm.adapter.render(conv)], images=conv.images or None, return_tensors="pt")
    ours = dm.adapter.encode([conv])
    assert inputs["input_ids"][0].tolist() == ours.input_ids[0]  # the adapter tokenizes as the processor does
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=dm.pad_token_id)[0, inputs["input_ids"].shape[1]:].tolist()
    stop = set(dm.stop_token_ids)
    return out[: next((i for i, t in enumerate(out) if t in stop), len(out))]


@pytest.mark.parametrize("arch", FAMILIES)
def test_b1_block_decoding_equals_hf_greedy_generate(arch):
    model, proc = tiny_ar(arch)
    dm = wrap(model, proc, block_size=1, prediction="shift")
    conv = to_conversation(PROMPT, [red_square()])
    ref = _hf_greedy(model, dm, conv, 16)
    assert len(ref) >= 4
    for use_cache in (True, False):
        for fast in ("off", "on"):
            if fast == "on" and not use_cache:
                continue  # the static path needs the cache (backend.choose)
            out = dm.generate(PROMPT, images=[red_square()], decoder="block", block_size=1, steps=1,
                              max_new_tokens=16, use_cache=use_cache, fast=fast)
            assert out.token_ids[0] == ref, (use_cache, fast)
    for fast in ("off", "on"):
        assert dm.generate(PROMPT, images=[red_square()], decoder="ar", max_new_tokens=16,
                           fast=fast).token_ids[0] == ref


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("fast", [False, True])
def test_prompt_forward_equals_hf_forward(arch, fast):
    """The decoders' prefill of a whole prompt (both slot forwards) gives transformers' own forward logits at every
    prompt position: positions, image features, deepstack residuals and Gemma 3's bidirectional image attention
    (without it the logits differ by ~0.06 here) all as the model computes them."""
    from diffusionvl.core.config import DecodeConfig
    from diffusionvl.decoding import _layout
    from diffusionvl.decoding.plain import open_plain
    from diffusionvl.decoding.static import clear_sessions, open_static

    model, proc = tiny_ar(arch)
    dm = wrap(model, proc, block_size=1)
    conv = to_conversation(PROMPT, [red_square()])
    inputs = dm.processor(text=[dm.adapter.render(conv)], images=[conv.images], return_tensors="pt") \
        if arch == "gemma3_vl" else dm.processor(text=[dm.adapter.render(conv)], images=conv.images, return_tensors="pt")
    encoded = dm.adapter.encode([conv])
    cfg = DecodeConfig(decoder="ar", max_new_tokens=4).resolved(1)
    clear_sessions(dm)
    with torch.no_grad():
        ref = model(**inputs).logits  # [1, P, V]
        layout = _layout(dm, encoded, cfg)
        opener = partial(open_static, mode="eager") if fast else open_plain
        with opener(dm, layout, encoded.vision, cfg, use_cache=True, attention_block=1) as fwd:
            ours = dm.adapter.head(fwd.prefill(layout.prefill))
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("decoder", ["block", "ar", "full"])
def test_ragged_batch_with_and_without_images_equals_alone(arch, decoder):
    dm = tiny_diffusion(arch, block_size=4)
    prompts = [PROMPT, "Hello, how are you?", "Count: one two three four five six seven eight"]
    images = [[red_square()], [], [red_square((60, 90), color="blue")]]
    kw = dict(decoder=decoder, block_size=4, steps=2, max_new_tokens=11)
    for fast in ("off", "on"):
        batched = dm.generate(prompts, images=images, fast=fast, **kw)
        for i, p in enumerate(prompts):
            alone = dm.generate(p, images=images[i] or None, fast="off", **kw)
            assert batched.token_ids[i] == alone.token_ids[0], (fast, i)


@pytest.mark.parametrize("arch", FAMILIES)
def test_cache_equals_no_cache_block_size_4(arch):
    """B = 4, S = 2: the image sits in prefilled blocks and (through the prompt's leftover) in decoded ones."""
    dm = tiny_diffusion(arch, block_size=4)
    images = [[red_square()], [red_square(color="blue")]]
    prompts = [PROMPT, "Describe it."]
    kw = dict(decoder="block", block_size=4, steps=2, max_new_tokens=13)
    assert dm.generate(prompts, images=images, use_cache=True, **kw).token_ids == \
        dm.generate(prompts, images=images, use_cache=False, **kw).token_ids


@pytest.mark.parametrize("arch", FAMILIES)
def test_image_in_the_decoded_leftover_block(arch):
    """An image that ends in the prompt's last, partial block is decoded with the first block: its rows (features,
    deepstack residuals; no bidirectional group, as the prefill never held it) enter that block's steps. The static
    forward's step == the plain one's there, beside a prompt whose image lies in the prefill; tokens agree with the
    plain path and with no cache."""
    from diffusionvl.core.config import DecodeConfig
    from diffusionvl.decoding import _layout
    from diffusionvl.decoding.plain import open_plain
    from diffusionvl.decoding.static import clear_sessions, open_static

    dm = tiny_diffusion(arch, block_size=4)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"}]}]
    convs = [to_conversation(msgs, [red_square()]), to_conversation(PROMPT, [red_square(color="blue")])]
    encoded = dm.adapter.encode(convs)
    ids = encoded.input_ids[0]
    last_image = max(i for i, t in enumerate(ids) if t == dm.adapter.image_token_id)
    bsz = next(b for b in range(4, 33) if (len(ids) // b) * b <= last_image)
    cfg = DecodeConfig(block_size=bsz, steps=bsz // 2, max_new_tokens=9).resolved(bsz)
    clear_sessions(dm)
    with torch.no_grad():
        layout = _layout(dm, encoded, cfg)
        kw = dict(use_cache=True, attention_block=bsz)
        with open_plain(dm, layout, encoded.vision, cfg, **kw) as plain, \
                open_static(dm, layout, encoded.vision, cfg, mode="eager", **kw) as quick:
            torch.testing.assert_close(quick.prefill(layout.prefill), plain.prefill(layout.prefill))
            wins = [(fwd, fwd.window(bsz)) for fwd in (plain, quick)]
            for fwd, win in wins:
                fwd.aim(win, layout.prefill)
            torch.testing.assert_close(wins[1][0].hidden(wins[1][1]), wins[0][0].hidden(wins[0][1]))
    images = [[red_square()], [red_square(color="blue")]]
    kw = dict(decoder="block", block_size=bsz, steps=bsz // 2, max_new_tokens=9)
    ref = dm.generate([msgs, PROMPT], images=images, fast="off", **kw).token_ids
    assert dm.generate([msgs, PROMPT], images=images, fast="on", **kw).token_ids == ref
    assert dm.generate([msgs, PROMPT], images=images, use_cache=False, **kw).token_ids == ref


def _sample(dm):
    """One image + question + answer sample, cut to whole blocks, answer tokens labelled."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name a colour."}]},
            {"role": "assistant", "content": "Red, like a ripe tomato in summer, and the sky is blue."}]
    conv = to_conversation(msgs, [red_square()])
    prompt_len = len(dm.adapter.tokenize([dm.adapter.render(to_conversation(msgs[:1], conv.images), True)],
                                         [conv.images]).input_ids[0])
    enc = dm.adapter.tokenize([dm.adapter.render(conv, False)], [conv.images])
    ids = enc.input_ids[0]
    ids = ids[: (len(ids) // dm.config.block_size) * dm.config.block_size]
    x0 = torch.tensor([ids])
    labels = x0.clone()
    labels[:, :prompt_len] = -100
    return {"input_ids": x0, "labels": labels, "attention_mask": torch.ones_like(x0), **enc.vision}, prompt_len


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("prediction", ["shift", "same"])
def test_training_forward_equals_per_block_forward(arch, prediction):
    """The x_t half of [x_t ; x0] for every block holding answer tokens == a plain forward of [clean blocks < k ;
    noisy block k] under the inference mask, images (and their layer residuals) where that sequence holds them,
    image groups open both ways in the prompt's complete blocks (the decoders' prefill, slots.slot_groups)."""
    from diffusionvl.decoding.slots import slot_mask
    bsz = 4
    dm = tiny_diffusion(arch, block_size=bsz, prediction=prediction).eval()
    batch, prompt_len = _sample(dm)
    prep = dm.prepare_batch(batch)
    x0, labels = prep["x0"], prep["labels"]
    rates = torch.full((1, x0.shape[1] // bsz), 0.6)
    x_t, masked, _ = objective.noise_tokens(x0, labels, rates, bsz, dm.mask_token_id, torch.Generator().manual_seed(3))
    assert masked.any()
    feats = dm.adapter.image_features(prep["vision"])
    text_cfg = dm.adapter.text_config
    checked = 0
    with torch.no_grad():
        train_logits = dm.bd3_prediction_logits(x_t, prep)  # [1, L, V]
        for k in range(prompt_len // bsz, x0.shape[1] // bsz):  # the blocks with answer tokens
            s, e = k * bsz, (k + 1) * bsz
            ids = torch.cat([x0[:, :s], x_t[:, s:e]], dim=1)  # clean blocks < k ; noisy block k
            emb = dm.adapter.embed(ids, features=feats)
            groups = dm.adapter.image_groups(ids)
            if groups is not None:
                groups[:, (prompt_len // bsz) * bsz:] = 0  # what the prefill of this prompt holds
            mask = slot_mask(text_cfg, emb.dtype, torch.arange(e), e, torch.zeros(1, dtype=torch.long), bsz, groups)
            hidden = dm.adapter.run_decoder(emb, mask, prep["positions"][:, :, :e],
                                            residuals=dm.adapter.layer_residuals(ids, feats))
            rows = slice(s - 1, e - 1) if prediction == "shift" else slice(s, e)
            torch.testing.assert_close(train_logits[:, s:e], dm.adapter.head(hidden[:, rows]), rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked >= 2


def test_gemma3_training_mask_opens_image_groups():
    """The AR loss's forward is transformers' own (bidirectional images); the BD3 mask opens an image both ways in
    the clean half only, and only in blocks before the answer's first block."""
    dm = tiny_diffusion("gemma3_vl", block_size=4).eval()
    batch, prompt_len = _sample(dm)
    prep = dm.prepare_batch(batch)
    groups = dm.adapter.image_groups(prep["x0"])
    opened = masks.open_groups(groups, prep["labels"], 4)
    assert groups.any() and torch.equal(opened, groups * (torch.arange(groups.shape[1]) < (prompt_len // 4) * 4))
    pairs = masks.group_pairs(opened, None, clean_half=True)[0, 0]  # [2L, 2L]
    length = groups.shape[1]
    assert not pairs[:length].any() and not pairs[:, :length].any() and pairs[length:, length:].any()
    idx = torch.arange(2 * length)
    for window in (None, 3):  # the FlexAttention form of the same pairs
        flex = masks.bd3_group_mod(opened, window)(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
        assert torch.equal(flex, masks.group_pairs(opened, window, clean_half=True)[0, 0])
    with torch.no_grad():
        ours = dm.ar_loss(batch).loss
        labels = batch["labels"].clone()
        labels[:, 0] = -100
        inputs = {"input_ids": batch["input_ids"], "pixel_values": batch["pixel_values"],
                  "token_type_ids": (batch["input_ids"] == dm.adapter.image_token_id).long()}
        logits = dm.hf_model(**inputs).logits[0, :-1]
        ref = torch.nn.functional.cross_entropy(logits, labels[0, 1:], ignore_index=-100)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES[:2])
def test_layer_residuals_reach_the_decoder(arch):
    """Deepstack is not a no-op here: dropping the residuals changes the image prompt's hidden states."""
    dm = tiny_diffusion(arch, block_size=4)
    enc = dm.adapter.encode([to_conversation(PROMPT, [red_square()])])
    ids = torch.tensor(enc.input_ids)
    feats = dm.adapter.image_features(enc.vision)
    residuals = dm.adapter.layer_residuals(ids, feats)
    assert residuals is not None and residuals.abs().sum() > 0
    emb = dm.adapter.embed(ids, features=feats)
    pos = dm.positions_for(ids, torch.ones_like(ids, dtype=torch.bool), enc.vision)
    mask = attention.build(lambda w: masks.causal_dense_mask(torch.ones_like(ids, dtype=torch.bool), w),
                           dm.adapter.text_config, dm.adapter.text_config, emb.dtype)
    with torch.no_grad():
        with_res = dm.adapter.run_decoder(emb, mask, pos, residuals=residuals)
        without = dm.adapter.run_decoder(emb, mask, pos)
    assert not torch.allclose(with_res, without)


@pytest.mark.parametrize("arch", FAMILIES)
def test_convert_save_load_round_trip(tmp_path, arch):
    import diffusionvl

    model, proc = tiny_ar(arch)
    model.save_pretrained(tmp_path / "ar")
    proc.save_pretrained(tmp_path / "ar")
    loaded = diffusionvl.load(diffusionvl.convert(tmp_path / "ar", tmp_path / "dvl", block_size=4), device="cpu")
    fresh = wrap(*tiny_ar(arch), block_size=4)
    assert loaded.hf_model.config.model_type == MODEL_TYPES.get(arch, arch) and loaded.config.block_size == 4
    ref = fresh.hf_model.state_dict()
    for name, tensor in loaded.hf_model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)
    kw = dict(images=[red_square()], max_new_tokens=8)
    assert loaded.generate(PROMPT, **kw).token_ids == fresh.generate(PROMPT, **kw).token_ids


@pytest.mark.parametrize("arch", FAMILIES[:1])
def test_serve_answers_an_image_request(arch):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from diffusionvl.jobs.serve import ServeConfig, create_app

    dm = tiny_diffusion(arch, block_size=4)
    buf = io.BytesIO()
    red_square().save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": PROMPT}]}]}
    with TestClient(create_app(dm, ServeConfig(), model_name="m")) as client:
        r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    expected = dm.generate(PROMPT, images=[red_square()], max_new_tokens=8).texts[0]
    assert r.json()["choices"][0]["message"]["content"] == expected


def test_unsupported_architecture_error_lists_the_families():
    from diffusionvl.backbone.adapters import adapter_class
    from diffusionvl.core.errors import DiffusionVLError

    with pytest.raises(DiffusionVLError) as err:
        adapter_class("bert")
    for family in FAMILIES:
        assert MODEL_TYPES.get(family, family) in str(err.value)
