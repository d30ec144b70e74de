"""Modality shift (diffusionvl.backbone.compose): a tiny AR LM + a vision encoder + a projector is an AR VLM that trains,
saves/loads, and that the engine converts and decodes like any other VLM. Tiny random parts, CPU, fp32."""

from __future__ import annotations

import copy
import functools
import json
import sys
import types

import pytest
import torch
from torch import nn

import diffusionvl
from conftest import red_square, tiny_ar
from diffusionvl.backbone.compose import ComposedProcessor, ComposedVLM, compose
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.backbone.vision import efficientnet
from diffusionvl.backbone.vision.encoders import ImageTransform, preprocess_images
from diffusionvl.cli import main as cli_main
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train.parts import PARTS, parameters_by_part, set_trainable
from diffusionvl.model.wrapping import wrap

VISIONS = ("efficientnet", "siglip", "clip")
QUESTION = "What is in the picture? Answer in one short sentence."


def tiny_vision(kind: str, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "efficientnet":
        return efficientnet.EfficientNetLite0()
    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                 patch_size=8)
    config = tf.SiglipVisionConfig(**sizes) if kind == "siglip" else tf.CLIPVisionConfig(**sizes)
    return tf.AutoModel.from_config(config).eval()


@functools.lru_cache(maxsize=None)
def _composed(arch: str, vision: str, pool: int | None):
    lm, tok = tiny_ar(arch)
    return compose(lm, tok, tiny_vision(vision), pool=pool)


def composed(arch: str = "llama", vision: str = "efficientnet", pool: int | None = 2):
    model, proc = _composed(arch, vision, pool)
    return copy.deepcopy(model), copy.deepcopy(proc)


def image(colour: str = "red", size=(84, 70)):
    """A `colour` picture with a white square: different colours give clearly different visual tokens."""
    from PIL import ImageDraw

    img = red_square(size, "white")
    ImageDraw.Draw(img).rectangle([0, 0, size[0], size[1]], fill=colour)
    ImageDraw.Draw(img).rectangle([10, 10, 40, 40], fill="white")
    return img


def ar_batch(model, proc, colours=("red", "blue")):
    """Chat-rendered image QA samples, right padded; labels on the answer only."""
    texts, lengths = [], []
    for c in colours:
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                {"role": "assistant", "content": f"It is {c}."}]
        texts.append(proc.apply_chat_template(msgs))
    enc = proc(text=texts, images=[image(c) for c in colours])
    answer = [len(proc.tokenizer(f"It is {c}.<|im_end|>\n", add_special_tokens=False)["input_ids"]) for c in colours]
    labels = torch.full_like(enc["input_ids"], -100)
    for i, n in enumerate(enc["attention_mask"].sum(1).tolist()):
        labels[i, n - answer[i]: n] = enc["input_ids"][i, n - answer[i]: n]
    return {**enc, "labels": labels}


# ---- parts: preprocessing, processor, chat template ---------------------------------------------------------------
def test_preprocess_matches_efficientnet_preprocess():
    t = ImageTransform(efficientnet.INPUT_SIZE, efficientnet.MEAN, efficientnet.STD, efficientnet.CROP_PCT)
    imgs = [image(), image("blue", (50, 90))]
    torch.testing.assert_close(preprocess_images(imgs, t), efficientnet.preprocess(imgs), rtol=0, atol=0)


@pytest.mark.parametrize("vision,pool,tokens", [("efficientnet", None, 49), ("efficientnet", 2, 4),
                                                ("siglip", None, 16), ("clip", None, 16), ("clip", 2, 4)])
def test_processor_expands_each_image_to_its_token_count(vision, pool, tokens):
    model, proc = composed("llama", vision, pool)
    assert model.config.num_image_tokens == proc.num_image_tokens == tokens
    texts = ["<image> and <image>: which is red?", "Just text.", "One <image>."]
    out = proc(text=texts, images=[image(), image("blue"), image("green")])
    per_row = (out["input_ids"] == proc.image_token_id).sum(1).tolist()
    assert per_row == [2 * tokens, 0, tokens]
    size = model.config.image_size
    assert tuple(out["pixel_values"].shape) == (3, 3, size, size)
    feats = model.image_features(out["pixel_values"])
    assert tuple(feats.shape) == (3, tokens, model.config.text_config.hidden_size)
    with pytest.raises(DiffusionVLError, match="placeholder"):
        proc(text=texts, images=[image()])


def test_chat_template_puts_the_image_token_at_the_image_part_and_keeps_text_rendering():
    lm, tok = tiny_ar("llama")
    _, proc = composed()
    text_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                 {"role": "assistant", "content": "Hello."}]
    assert proc.apply_chat_template(text_msgs) == tok.apply_chat_template(text_msgs, tokenize=False)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Left "}, {"type": "image"},
                                         {"type": "text", "text": " right"}]}]
    flat = [{"role": "user", "content": "Left <image> right"}]
    assert proc.apply_chat_template(msgs, add_generation_prompt=True) == \
        tok.apply_chat_template(flat, tokenize=False, add_generation_prompt=True)
    assert proc.tokenizer.convert_tokens_to_ids("<image>") == proc.image_token_id
    assert proc.tokenizer.decode([proc.image_token_id], skip_special_tokens=True) == ""  # special: never in answers
    assert "<image>" not in tok.get_vocab()  # the caller's tokenizer is left alone


def test_composed_weights_are_the_parts_weights():
    lm, tok = tiny_ar("llama")
    enc = tiny_vision("siglip")
    model, _ = compose(lm, tok, enc)
    ours = model.language_model.state_dict()
    for name, tensor in lm.state_dict().items():
        rows = tensor.shape[0] if name.endswith(("embed_tokens.weight", "lm_head.weight")) else None
        torch.testing.assert_close(ours[name][:rows], tensor, rtol=0, atol=0, msg=name)
    for name, tensor in enc.state_dict().items():
        torch.testing.assert_close(model.vision_tower.encoder.state_dict()[name], tensor, rtol=0, atol=0)


def test_dual_encoder_keeps_its_vision_half():
    import transformers as tf

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    clip = tf.CLIPModel(tf.CLIPConfig(text_config=sizes, vision_config=dict(sizes, image_size=32, patch_size=8)))
    model, _ = compose(*tiny_ar("llama"), clip)
    assert model.config.vision["config"]["model_type"] == "clip_vision_model"
    own = model.vision_tower.encoder.state_dict()
    for name, tensor in clip.vision_model.state_dict().items():  # key prefixes differ across transformers versions
        torch.testing.assert_close(own.get(name, own.get(f"vision_model.{name}")), tensor, rtol=0, atol=0)


# ---- a normal AR VLM -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vision", VISIONS)
def test_ar_forward_loss_is_finite_and_one_step_lowers_it(vision):
    model, proc = composed("llama", vision)
    batch = ar_batch(model, proc)
    if vision == "efficientnet":
        set_trainable(model, "stage2_frozen_tower")  # depthwise-conv backward is slow on CPU; SigLIP/CLIP train all
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model(**batch).loss
    assert torch.isfinite(before)
    before.backward()
    assert model.projector[0].weight.grad.abs().sum() > 0  # the loss reaches the projector
    opt.step()
    with torch.no_grad():
        after = model(**batch).loss
    assert after < before


def test_ar_forward_loss_equals_engine_ar_loss():
    model, proc = composed("llama", "siglip")
    batch = ar_batch(model, proc)
    dm = wrap(model, proc, block_size=4)  # adds the mask token (one more output row for llama)
    out = dm.ar_loss(batch)  # mean over samples of each sample's token mean; HF: mean over all tokens
    counts = (batch["labels"][:, 1:] != -100).sum(dim=1).float()
    token_mean = (out.per_sample * counts).sum() / counts.sum()
    torch.testing.assert_close(token_mean, model(**batch).loss, rtol=1e-5, atol=1e-5)


def test_image_content_reaches_the_answer():
    model, proc = composed()
    with torch.no_grad():
        red, blue = (model(**proc(text=["<image> Colour?"], images=[image(c)])).logits[0, -1] for c in ("red", "blue"))
    assert (red - blue).abs().max() > 1e-3
    dm = wrap(model, proc, block_size=4)
    with_image = dm.generate(QUESTION, images=[image()], decoder="ar", max_new_tokens=10).token_ids
    assert with_image != dm.generate(QUESTION, decoder="ar", max_new_tokens=10).token_ids


# ---- the engine on a composed model -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch,vision", [("llama", "efficientnet"), ("qwen2", "siglip"), ("llama", "clip"),
                                         ("gemma3", "siglip")])
def test_wrap_training_loss_and_every_decoder_with_an_image(arch, vision):
    model, proc = composed(arch, vision)
    if vision == "efficientnet":
        set_trainable(model, "stage2_frozen_tower")  # depthwise-conv backward is slow on CPU
    dm = wrap(model, proc, block_size=4)
    lm_config = tiny_ar(arch)[0].config
    assert dm.adapter.text_config is model.language_model.config  # layers, context, sliding window: the LM's
    assert dm.max_positions == lm_config.max_position_embeddings
    assert getattr(dm.adapter.text_config, "sliding_window", None) == getattr(lm_config, "sliding_window", None)
    batch = ar_batch(model, proc)
    out = dm.training_loss(batch)
    assert torch.isfinite(out.loss) and out.metrics["masked_tokens"] > 0
    out.loss.backward()
    assert model.projector[-1].weight.grad.abs().sum() > 0
    for decoder in ("block", "ar", "full"):
        steps = {} if decoder == "ar" else {"steps": 2}
        gen = dm.generate(QUESTION, images=[image()], decoder=decoder, max_new_tokens=7, **steps)
        assert len(gen.token_ids[0]) <= 7 and gen.stats["decoder"] == decoder


def test_b1_block_decoding_equals_ar_decoder_and_hf_generate():
    model, proc = composed("llama", "siglip")
    dm = wrap(model, proc, block_size=1)
    conv = to_conversation(QUESTION, [image()])
    block = dm.generate(QUESTION, images=[image()], decoder="block", block_size=1, steps=1, max_new_tokens=16)
    ar = dm.generate(QUESTION, images=[image()], decoder="ar", max_new_tokens=16)
    assert block.token_ids == ar.token_ids
    enc = proc(text=[dm.adapter.render(conv)], images=conv.images)
    hf = model.generate(**enc, max_new_tokens=16, do_sample=False, eos_token_id=None,
                        pad_token_id=dm.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
    stop = set(dm.stop_token_ids)
    hf = hf[: next((i for i, t in enumerate(hf) if t in stop), len(hf))]
    assert ar.token_ids[0] == hf


@pytest.mark.parametrize("decoder", ["block", "ar"])
def test_batched_equals_alone_with_images(decoder):
    dm = wrap(*composed("llama", "clip"), block_size=4)
    prompts = [QUESTION, "Colour?", "Count: one two three four five six seven eight nine ten"]
    images = [[image()], [image("blue", (60, 60))], [image("green"), image("yellow")]]
    kw = dict(decoder=decoder, block_size=4, steps=2, max_new_tokens=11)
    batched = dm.generate(prompts, images=images, **kw)
    for i, p in enumerate(prompts):
        assert batched.token_ids[i] == dm.generate(p, images=images[i], **kw).token_ids[0], f"sample {i}"


def test_cache_equals_no_cache_with_images():
    dm = wrap(*composed("llama", "siglip"), block_size=4)
    kw = dict(decoder="block", block_size=4, steps=2, max_new_tokens=10)
    imgs = [[image()], [image("blue")]]
    assert dm.generate([QUESTION, "Colour?"], images=imgs, use_cache=True, **kw).token_ids == \
        dm.generate([QUESTION, "Colour?"], images=imgs, use_cache=False, **kw).token_ids


# ---- persistence -------------------------------------------------------------------------------------------------
def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name, tensor in sa.items():
        torch.testing.assert_close(sb[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("arch,vision", [("llama", "efficientnet"), ("qwen2", "clip")])
def test_ar_folder_round_trip_and_convert_load(tmp_path, arch, vision):
    from transformers import AutoModelForImageTextToText

    from diffusionvl.backbone.compose import register_auto_classes

    register_auto_classes()  # what the loaders do first (the test must not depend on an earlier test's load)
    model, proc = composed(arch, vision)
    model.save_pretrained(tmp_path / "ar")
    proc.save_pretrained(tmp_path / "ar")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "ar")
    assert isinstance(again, ComposedVLM)
    _assert_same_weights(model, again)
    if model.config.text_config.tie_word_embeddings:
        assert again.get_output_embeddings().weight is again.get_input_embeddings().weight
    batch = ar_batch(model, proc)
    torch.testing.assert_close(again(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)

    dst = diffusionvl.convert(tmp_path / "ar", tmp_path / "dvl", block_size=4)
    loaded = diffusionvl.load(dst, device="cpu")
    assert isinstance(loaded.processor, ComposedProcessor)
    fresh = wrap(model, proc, block_size=4)
    _assert_same_weights(fresh.hf_model, loaded.hf_model)
    kw = dict(max_new_tokens=9, steps=2)
    assert loaded.generate(QUESTION, images=[image()], **kw).token_ids == \
        fresh.generate(QUESTION, images=[image()], **kw).token_ids


def test_diffusion_save_load_round_trip(tmp_path):
    dm = wrap(*composed("llama", "siglip"), block_size=4)
    dm.save_pretrained(tmp_path / "dvl")
    loaded = diffusionvl.load(tmp_path / "dvl", device="cpu")
    assert loaded.config.block_size == 4 and loaded.mask_token_id == dm.mask_token_id
    assert loaded.adapter.image_token_id == dm.adapter.image_token_id
    _assert_same_weights(dm.hf_model, loaded.hf_model)
    assert loaded.generate(QUESTION, images=[image()], max_new_tokens=8).token_ids == \
        dm.generate(QUESTION, images=[image()], max_new_tokens=8).token_ids


# ---- training parts ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["composed", "qwen2_5_vl", "llama", "qwen2"])
def test_parameter_groups_cover_every_parameter_exactly_once(which):
    model = composed()[0] if which == "composed" else tiny_ar(which)[0]
    groups = parameters_by_part(wrap(model, tiny_ar("llama")[1]) if which == "llama" else model)
    assert tuple(groups) == PARTS
    ids = [id(p) for params in groups.values() for p in params]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    if which in ("composed", "qwen2_5_vl"):
        assert all(groups[part] for part in PARTS)
    else:
        assert not groups["vision"] and not groups["projector"]
    if which == "qwen2_5_vl":
        merger = {id(p) for p in model.model.visual.merger.parameters()}
        assert merger == {id(p) for p in groups["projector"]}


def test_stage1_trains_only_the_projector_and_a_frozen_tower_keeps_its_batchnorm_statistics():
    model, proc = composed()
    counts = set_trainable(model, "stage1")
    assert counts["projector"] > 0 and counts["vision"] == counts["language"] == 0
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"projector"}
    stats = model.vision_tower.encoder.bn1.running_mean.clone()
    model.train()
    model(**ar_batch(model, proc)).loss.backward()
    torch.testing.assert_close(model.vision_tower.encoder.bn1.running_mean, stats, rtol=0, atol=0)
    set_trainable(model, "stage2")
    assert all(p.requires_grad for p in model.parameters())
    model(**ar_batch(model, proc))
    assert not torch.equal(model.vision_tower.encoder.bn1.running_mean, stats)  # a trained tower does update them
    with pytest.raises(DiffusionVLError, match="unknown model part"):
        set_trainable(model, ["decoder"])


# ---- timm ----------------------------------------------------------------------------------------------------
class _FakeTimmCNN(nn.Module):
    """Just enough of a timm CNN: forward_features -> [N, C, h, w], pretrained_cfg, num_features, a head."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 24, 8, stride=8), nn.BatchNorm2d(24)
        self.num_features = 24
        self.head = nn.Linear(24, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = {"architecture": "fake_cnn", "input_size": (3, 48, 48), "mean": (0.4, 0.4, 0.4),
                               "std": (0.2, 0.2, 0.2), "crop_pct": 0.9}

    def forward_features(self, x):
        return self.bn(self.conv(x))  # [N, 24, 6, 6]


class _FakeTimmViT(_FakeTimmCNN):
    """A ViT-shaped fake: [N, 1 + 36, 24] with one prefix (CLS) token."""

    num_prefix_tokens = 1

    def forward_features(self, x):
        patches = super().forward_features(x).flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(1, keepdim=True), patches], dim=1)


@pytest.fixture
def fake_timm(monkeypatch):
    module = types.ModuleType("timm")
    built = []

    def create_model(name, pretrained=False, num_classes=1000, **kwargs):
        built.append((name, pretrained))
        return {"fake_cnn": _FakeTimmCNN, "fake_vit": _FakeTimmViT}[name](num_classes)

    module.create_model = create_model
    monkeypatch.setitem(sys.modules, "timm", module)
    return built


def test_timm_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError, as on a machine without it
    lm, tok = tiny_ar("llama")
    with pytest.raises(DiffusionVLError, match=r"pip install timm"):
        compose(lm, tok, "timm:resnet18")
    from diffusionvl.backbone.vision.encoders import build_tower

    with pytest.raises(DiffusionVLError, match=r"pip install timm"):
        build_tower({"kind": "timm", "name": "resnet18"})


@pytest.mark.parametrize("name,pool,tokens", [("fake_cnn", None, 36), ("fake_cnn", 2, 4), ("fake_vit", None, 36),
                                              ("fake_vit", 3, 9)])
def test_timm_backbone_by_name_round_trips(tmp_path, fake_timm, name, pool, tokens):
    lm, tok = tiny_ar("llama")
    model, proc = compose(lm, tok, f"timm:{name}", pool=pool)
    assert fake_timm[0] == (name, True)  # pretrained weights requested when composing
    assert model.config.vision == {"kind": "timm", "name": name} and model.config.num_image_tokens == tokens
    assert proc.transform == ImageTransform(48, (0.4, 0.4, 0.4), (0.2, 0.2, 0.2), 0.9)
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    from transformers import AutoModelForImageTextToText

    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert fake_timm[-1] == (name, False)  # rebuilt by name, weights from our safetensors
    _assert_same_weights(model, loaded)
    dm = diffusionvl.load(tmp_path, device="cpu", allow_unconverted=True)
    out = dm.generate(QUESTION, images=[image()], max_new_tokens=4)
    assert len(out.token_ids[0]) <= 4


# ---- errors and CLI -----------------------------------------------------------------------------------------------
def test_bad_arguments_are_one_line_errors():
    lm, tok = tiny_ar("llama")
    with pytest.raises(DiffusionVLError, match="unknown projector"):
        compose(lm, tok, tiny_vision("siglip"), projector="qformer")
    with pytest.raises(DiffusionVLError, match="pool"):
        compose(lm, tok, tiny_vision("siglip"), pool=0)
    with pytest.raises(DiffusionVLError, match="vision encoder not found"):
        compose(lm, tok, "/no/such/encoder")
    with pytest.raises(DiffusionVLError, match="unsupported vision encoder"):
        compose(lm, tok, nn.Linear(2, 2))


def test_cli_compose_then_convert_then_generate(tmp_path, capsys):
    lm, tok = tiny_ar("qwen2")
    lm.save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    tiny_vision("siglip").save_pretrained(tmp_path / "siglip")
    rc = cli_main(["compose", "--lm", str(tmp_path / "lm"), "--vision", str(tmp_path / "siglip"), "--pool", "2",
                   "--output", str(tmp_path / "vlm"), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_image_tokens"] == 4 and summary["parameters"]["projector"] > 0
    assert cli_main(["convert", str(tmp_path / "vlm"), str(tmp_path / "dvl"), "--block-size", "4"]) == 0
    out = diffusionvl.load(tmp_path / "dvl", device="cpu").generate(QUESTION, images=[image()], max_new_tokens=5)
    assert len(out.token_ids[0]) <= 5
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left behind


def test_cli_compose_missing_lm_is_one_line(tmp_path, capsys):
    rc = cli_main(["compose", "--lm", str(tmp_path / "nope"), "--vision", "efficientnet_lite0",
                   "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


# ---- the real default parts (skipped unless the offline assets are cached) -----------------------------------------
def _assets_ready() -> bool:
    from diffusionvl.backbone import assets

    return all(row["cached"] for row in assets.asset_status())


@pytest.mark.slow
@pytest.mark.skipif(not _assets_ready(), reason="SmolLM2 / EfficientNet-Lite0 assets not cached "
                    "(diffusionvl assets --prepare)")
def test_real_smollm2_with_pretrained_efficientnet_generates_with_an_image():
    from diffusionvl.backbone import assets

    lm, tok = assets.load_smollm2(progress=False)
    model, proc = compose(lm, tok, "efficientnet_lite0", pool=4)
    assert model.config.num_image_tokens == 16
    dm = wrap(model, proc, block_size=8)
    text = dm.generate("What is the capital of France?", decoder="ar", max_new_tokens=12).text
    assert "Paris" in text  # the LM is intact inside the composition
    out = dm.generate("Describe the image.", images=[red_square((224, 224))], decoder="ar", max_new_tokens=6)
    assert out.stats["tokens"] >= 1


def test_efficientnet_extra_stages_append_pooled_mid_level_channels(tmp_path):
    """extra_stages=[2]: tokens = [final 1280 | stage 2's 40 channels pooled to the same grid, rescaled to the final
    features' norm per position]; saved in the spec."""
    from diffusionvl.backbone.vision.encoders import build_tower

    lm, tok = tiny_ar("llama")
    torch.manual_seed(0)
    enc = efficientnet.EfficientNetLite0().eval()
    model, proc = compose(lm, tok, enc, pool=2, vision_options={"extra_stages": [2]})
    model.eval()
    assert model.config.vision["extra_stages"] == [2] and model.config.vision_hidden_size == 1280 + 40
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.vision_tower(pixels)  # [2, 4, 1320]
        x = torch.nn.functional.relu6(enc.bn1(enc.conv_stem(pixels)))
        mid = enc.blocks[2](enc.blocks[1](enc.blocks[0](x)))
        final = enc.forward_features(pixels)
    want_final = torch.nn.functional.adaptive_avg_pool2d(final, 2).flatten(2).transpose(1, 2)
    mid = torch.nn.functional.adaptive_avg_pool2d(mid, final.shape[-2:])
    mid = mid / mid.norm(dim=1, keepdim=True) * final.norm(dim=1, keepdim=True)  # same energy per position
    want_mid = torch.nn.functional.adaptive_avg_pool2d(mid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens, torch.cat([want_final, want_mid], -1))
    model.save_pretrained(tmp_path / "m")
    proc.save_pretrained(tmp_path / "m")
    again = ComposedVLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(again.vision_tower(pixels), tokens)
    with pytest.raises(DiffusionVLError, match="extra_stages .* out of range"):
        build_tower({"kind": "efficientnet_lite0", "extra_stages": [6]})


# ---- the projector's init ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu"])
def test_a_fresh_projector_starts_from_pytorchs_linear_init(kind):
    """compose's projector (every kind) starts from nn.Linear's default: weights and biases uniform in
    +-1/sqrt(fan_in), not N(0, initializer_range) with zero biases, which was measured to keep colour from being
    learned (docs/tiny-vlm.md). Its output is then far larger than the text embeddings' 0.02 spread."""
    lm, tok = tiny_ar("llama")
    torch.manual_seed(0)
    model, _ = compose(lm, tok, tiny_vision("siglip"), projector=kind)
    linears = [m for m in model.projector.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == (1 if kind == "linear" else 2)
    for layer in linears:
        bound = layer.in_features ** -0.5
        for p in (layer.weight.detach(), layer.bias.detach()):
            assert float(p.abs().max()) <= bound + 1e-7
            assert abs(float(p.std()) - bound / 3 ** 0.5) < 0.15 * bound / 3 ** 0.5  # uniform(-b, b): std b/sqrt(3)
        assert float(layer.bias.detach().abs().min()) > 0.0  # not zeroed
    torch.manual_seed(0)
    again, _ = compose(lm, tok, tiny_vision("siglip"), projector=kind)
    _assert_same_weights(model.projector, again.projector)  # deterministic under the global seed


def test_loading_a_saved_model_keeps_its_projector(tmp_path):
    dm = wrap(*composed("llama", "siglip"), block_size=4)
    with torch.no_grad():
        for p in dm.hf_model.projector.parameters():
            p.fill_(0.125)  # no init produces this
    dm.save_pretrained(tmp_path / "dvl")
    loaded = diffusionvl.load(tmp_path / "dvl", device="cpu")
    assert all(bool((p == 0.125).all()) for p in loaded.hf_model.projector.parameters())
