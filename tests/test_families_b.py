"""The transformers VLM families InternVL, Idefics3, SmolVLM, LLaVA-OneVision and Mistral 3, on their tiny
random models (backbone/tiny_families.py) with their own processor classes (Mistral 3: PixtralProcessor's
torchvision-free stand-in where it cannot be imported, checked against it where it can) and an image in the prompt:
B=1/S=1 block decoding == transformers greedy `generate` on the same processor output (cache and fast path on and
off); a ragged batch (with and without images) == each sample alone; the 2L training forward == a brute-force
forward of [clean blocks < k ; noisy block k]; a training batch collated from samples with different tile counts
== each sample alone; convert -> save -> load; `serve` answers an image request."""

from __future__ import annotations

import pytest
import torch

from conftest import red_square, tiny_ar, tiny_diffusion
from diffusionvl.backbone.adapters import adapter_class
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.core import attention, masks, objective
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.model.wrapping import wrap

FAMILIES = ["internvl", "idefics3", "smolvlm", "llava_onevision", "mistral3"]
PROMPT = "What shape is in the image? Answer in one short sentence."
WIDE, TALL = red_square((112, 56)), red_square((40, 90), color="blue")  # several tiles / rows each


def _hf_greedy(model, dm, prompt, images, n):
    """transformers' greedy generate on the processor's own output for this prompt and images."""
    conv = to_conversation(prompt, images)
    text = dm.adapter.render(conv)
    inputs = dm.processor(text=[text], images=dm.adapter.processor_images([conv.images]), return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=dm.pad_token_id)[0, inputs["input_ids"].shape[1]:].tolist()
    stop = set(dm.stop_token_ids)
    return out[: next((i for i, t in enumerate(out) if t in stop), len(out))]


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("fast", ["off", "on"])
def test_b1_block_decoding_equals_hf_greedy_generate(arch, use_cache, fast):
    model, proc = tiny_ar(arch)
    dm = wrap(model, proc, block_size=1, prediction="shift")
    for images in ([WIDE], [TALL, WIDE]):
        ref = _hf_greedy(model, dm, PROMPT, images, 16)
        ours = dm.generate(PROMPT, images=images, decoder="block", block_size=1, steps=1, max_new_tokens=16,
                           use_cache=use_cache, fast=fast)
        assert ours.token_ids[0] == ref
        fast_path = fast == "on" and use_cache  # no-cache block decoding recomputes the prefix: plain only
        assert ours.stats["backend"] == ("fast/eager" if fast_path else "plain")


@pytest.mark.parametrize("arch", FAMILIES)
def test_image_changes_the_answer(arch):
    """The equivalences above mean something only if the image reaches the answer."""
    dm = tiny_diffusion(arch, block_size=1)
    answers = {tuple(dm.generate(PROMPT, images=[red_square((112, 56), color=c)], decoder="ar",
                                 max_new_tokens=12).token_ids[0]) for c in ("red", "blue", "green")}
    assert len(answers) > 1


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("decoder", ["block", "ar"])
def test_ragged_batch_equals_alone(arch, decoder):
    dm = tiny_diffusion(arch, block_size=4)
    prompts = [PROMPT, "Hello, how are you?", "Name the colour, please."]
    images = [[WIDE], [], [TALL]]
    kw = dict(decoder=decoder, block_size=4, steps=2, max_new_tokens=13)
    batched = dm.generate(prompts, images=images, **kw)
    for i, p in enumerate(prompts):
        alone = dm.generate(p, images=images[i] or None, **kw)
        assert batched.token_ids[i] == alone.token_ids[0], f"sample {i}"


def _training_batch(dm):
    """One image + question + answer sample cut to whole blocks, the answer labelled; and the processor's vision."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name a colour."}]},
            {"role": "assistant", "content": "Red, like a ripe tomato in summer, and the sky is blue."}]
    conv = to_conversation(msgs, [WIDE])
    question = to_conversation(msgs[:1], [WIDE])
    prompt_len = len(dm.adapter.tokenize([dm.adapter.render(question)], [question.images]).input_ids[0])
    enc = dm.adapter.tokenize([dm.adapter.render(conv, False)], [conv.images])
    bsz = dm.config.block_size
    ids = enc.input_ids[0][: (len(enc.input_ids[0]) // bsz) * bsz]
    x0 = torch.tensor([ids])
    labels = x0.clone()
    labels[:, :prompt_len] = -100
    return {"input_ids": x0, "labels": labels, "attention_mask": torch.ones_like(x0), **enc.vision}, enc.vision


@pytest.mark.parametrize("arch", FAMILIES)
@pytest.mark.parametrize("prediction", ["shift", "same"])
def test_training_forward_equals_per_block_forward(arch, prediction):
    bsz = 4
    dm = tiny_diffusion(arch, block_size=bsz, prediction=prediction).eval()
    batch, vision = _training_batch(dm)
    prep = dm.prepare_batch(batch)
    x0 = prep["x0"]
    rates = torch.full((1, x0.shape[1] // bsz), 0.6)
    x_t, masked, _ = objective.noise_tokens(x0, prep["labels"], rates, bsz, dm.mask_token_id,
                                            torch.Generator().manual_seed(3))
    assert masked.any()
    text_cfg = dm.adapter.text_config
    with torch.no_grad():
        train_logits = dm.bd3_prediction_logits(x_t, prep)  # [1, L, V]
        feats = dm.adapter.image_features(vision)  # the processor's full output, every key of it
        checked = 0
        for k in range(1, x0.shape[1] // bsz):
            s, e = k * bsz, (k + 1) * bsz
            if not masked[:, s:e].any():
                continue
            ids = torch.cat([x0[:, :s], x_t[:, s:e]], dim=1)  # clean blocks < k ; noisy block k
            emb = dm.adapter.embed(ids, features=feats)
            mask = attention.build(
                lambda w, e=e: masks.block_causal_dense_mask(torch.arange(e), e, torch.zeros(1, dtype=torch.long),
                                                             bsz, w), text_cfg, text_cfg, emb.dtype)
            hidden = dm.adapter.run_decoder(emb, mask, prep["positions"][:, :, :e])
            rows = slice(s - 1, e - 1) if prediction == "shift" else slice(s, e)
            torch.testing.assert_close(train_logits[:, s:e], dm.adapter.head(hidden[:, rows]), rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked >= 2


def _answer_sample(dm, images, answer):
    """One question + answer sample tokenized alone (as the trainer's encoder does): ids, labels on the answer,
    the processor's vision tensors."""
    parts = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What is in the picture?"}]
    msgs = [{"role": "user", "content": parts}, {"role": "assistant", "content": answer}]
    question = to_conversation(msgs[:1], images or None)
    prompt_len = len(dm.adapter.tokenize([dm.adapter.render(question)], [question.images]).input_ids[0])
    conv = to_conversation(msgs, images or None)
    enc = dm.adapter.tokenize([dm.adapter.render(conv, False)], [conv.images])
    ids = torch.tensor(enc.input_ids[0])
    labels = ids.clone()
    labels[:prompt_len] = -100
    return ids, labels, enc.vision


@pytest.mark.parametrize("arch", FAMILIES)
def test_collated_training_batch_equals_each_sample_alone(arch):
    """Samples whose images give different tile counts and sizes, and one without an image, batched by
    `collate_vision` (zero padding, as the processors batch): each sample's BD3 loss == its loss alone."""
    bsz = 4
    dm = tiny_diffusion(arch, block_size=bsz).eval()
    samples = [_answer_sample(dm, [WIDE], "A red square on white."), _answer_sample(dm, [], "Hello there, friend."),
               _answer_sample(dm, [red_square((30, 30), color="blue")], "A blue square on a white page, small.")]
    assert samples[0][2]["pixel_values"].shape != samples[2][2]["pixel_values"].shape  # tiles or sizes differ
    length = -(-max(len(s[0]) for s in samples) // bsz) * bsz
    ids = torch.full((3, length), dm.pad_token_id)
    labels = torch.full((3, length), -100)
    mask = torch.zeros(3, length, dtype=torch.long)
    for i, (x, y, _) in enumerate(samples):
        ids[i, : len(x)], labels[i, : len(x)], mask[i, : len(x)] = x, y, 1
    vision = dm.adapter.collate_vision([v for _, _, v in samples if v])
    g = torch.Generator().manual_seed(5)
    rates, draw = torch.rand(3, length // bsz, generator=g) * 0.9 + 0.1, torch.rand(3, length, generator=g)
    with torch.no_grad():
        batched = dm.training_loss({"input_ids": ids, "labels": labels, "attention_mask": mask, **vision},
                                   rates=rates, draw=draw).per_sample
        for i, (x, y, v) in enumerate(samples):
            n = -(-len(x) // bsz) * bsz
            alone = dm.training_loss({"input_ids": ids[i:i + 1, :n], "labels": labels[i:i + 1, :n],
                                      "attention_mask": mask[i:i + 1, :n], **v},
                                     rates=rates[i:i + 1, : n // bsz], draw=draw[i:i + 1, :n]).per_sample
            torch.testing.assert_close(batched[i], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_convert_save_load_round_trip(tmp_path, arch):
    import diffusionvl

    model, proc = tiny_ar(arch)
    src = tmp_path / "ar"
    model.save_pretrained(src)
    proc.save_pretrained(src)
    loaded = diffusionvl.load(diffusionvl.convert(src, tmp_path / "dvl", block_size=4), device="cpu")
    fresh = wrap(*tiny_ar(arch), block_size=4)
    assert type(loaded.processor).__name__ == type(proc).__name__  # the family's own processor class
    assert loaded.config.block_size == 4 and loaded.mask_token_id == fresh.mask_token_id
    ref = fresh.hf_model.state_dict()
    for name, tensor in loaded.hf_model.state_dict().items():
        torch.testing.assert_close(tensor, ref[name], rtol=0, atol=0, msg=name)
    kw = dict(images=[[WIDE], [TALL]], max_new_tokens=8)
    assert loaded.generate([PROMPT, PROMPT], **kw).token_ids == fresh.generate([PROMPT, PROMPT], **kw).token_ids


@pytest.mark.parametrize("arch", FAMILIES)
def test_convert_tiny_cli(tmp_path, arch, capsys):
    import diffusionvl
    from diffusionvl.cli import main

    assert main(["convert", "--tiny", arch, str(tmp_path / "m"), "--block-size", "4"]) == 0
    loaded = diffusionvl.load(tmp_path / "m", device="cpu")
    assert loaded.hf_model.config.model_type == arch and loaded.adapter.has_vision


@pytest.mark.parametrize("arch", FAMILIES)
def test_serve_answers_an_image_request(arch):
    import base64
    import io

    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from diffusionvl.jobs.serve import ServeConfig, create_app

    dm = tiny_diffusion(arch, block_size=4)
    buf = io.BytesIO()
    WIDE.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                              {"type": "text", "text": PROMPT}]}]
    with TestClient(create_app(dm, ServeConfig(), model_name="tiny")) as client:
        r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 8})
    assert r.status_code == 200, r.text
    ref = dm.generate([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                      images=[WIDE], max_new_tokens=8)
    assert r.json()["choices"][0]["message"]["content"] == ref.texts[0]


def test_unsupported_architecture_lists_the_families():
    with pytest.raises(DiffusionVLError) as err:
        adapter_class("no_such_vlm")
    for name in ("internvl", "idefics3", "smolvlm", "llava_onevision", "mistral3"):
        assert name in str(err.value)


def test_pixtral_stand_in_lays_images_out_as_pixtral_processor(tmp_path):
    """Where transformers' PixtralProcessor imports (torchvision present), the stand-in gives its exact output, and
    each loads the other's saved folder."""
    pytest.importorskip("torchvision", reason="transformers' PixtralProcessor imports torchvision")
    from transformers import PixtralProcessor

    from diffusionvl.backbone.processing import PixtralRowsProcessor, load_processor

    real = tiny_ar("mistral3")[1]
    assert isinstance(real, PixtralProcessor)
    stand_in = PixtralRowsProcessor(real.image_processor, real.tokenizer, patch_size=real.patch_size,
                                    spatial_merge_size=real.spatial_merge_size, chat_template=real.chat_template)
    texts = ["<s>[INST][IMG]What is it?[/INST]", "<s>[INST][IMG][IMG]Two?[/INST]"]
    images = [WIDE, TALL, red_square()]
    ours, theirs = stand_in(text=texts, images=images), real(text=texts, images=images, return_tensors="pt",
                                                             padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)
    stand_in.save_pretrained(tmp_path / "a")
    assert isinstance(load_processor(tmp_path / "a", True), PixtralProcessor)


@pytest.mark.parametrize("arch", FAMILIES)
def test_train_encoder_and_collator_take_image_samples(arch):
    """`diffusionvl train`'s own path: the encoder places the answer labels in the processor's ids (which add layout
    tokens around the image tokens: <img>, tile tags, [IMG_BREAK]), two samples with different image layouts collate
    into one batch, and each sample's loss in that batch equals its loss alone."""
    from diffusionvl.jobs.train.collator import Collator
    from diffusionvl.jobs.train.data import Record
    from diffusionvl.jobs.train.encode import SampleEncoder

    dm = tiny_diffusion(arch, block_size=4).eval()
    enc = SampleEncoder(dm, 4096, "truncate", "bd3")
    text = lambda t: [{"type": "text", "text": t}]  # noqa: E731
    samples = []
    for image, answer in ((WIDE, "A red square."), (TALL, "Blue.")):
        record = Record([{"role": "user", "content": [{"type": "image"}] + text("What is it?")},
                         {"role": "assistant", "content": text(answer)}], [image], arch)
        sample = enc(record)
        labelled = sample.labels[sample.labels != -100]
        assert answer in dm.tokenizer.decode(labelled)  # the answer's tokens are the labels
        assert torch.equal(sample.input_ids[sample.labels != -100], labelled)  # where the processor put them
        samples.append(sample)
    collate = Collator(dm.pad_token_id, 4, dm.adapter)
    items = [{"sample": s, "index": i, "position": i, "skipped": []} for i, s in enumerate(samples)]
    batch = collate(items)
    batch.pop("meta")
    g = torch.Generator().manual_seed(0)
    length = batch["input_ids"].shape[1]
    rates, draw = torch.rand(2, length // 4, generator=g) * 0.9 + 0.1, torch.rand(2, length, generator=g)
    with torch.no_grad():
        both = dm.training_loss(batch, rates=rates, draw=draw).per_sample
        for i, item in enumerate(items):
            alone = collate([dict(item, position=0)])
            alone.pop("meta")
            n = alone["input_ids"].shape[1]
            one = dm.training_loss(alone, rates=rates[i:i + 1, : n // 4], draw=draw[i:i + 1, :n]).per_sample
            torch.testing.assert_close(both[i], one[0], rtol=1e-4, atol=1e-4)
