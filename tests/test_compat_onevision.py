"""DiffusionVL-Qwen2.5 (LLaVA-OneVision-style `diffusionvl_qwen`) checkpoints, on tiny weights in their layout.

The tiny checkpoint is written the way their trainer saves `DiffusionVLQwenForCausalLM`: Qwen2 fields + LLaVA keys
at the top of config.json, `model.*` / `lm_head.weight` for the LM, `model.vision_tower.vision_tower.vision_model.*`
for a SigLIP tower whose last layer is already gone, `model.mm_projector.{0,2}.*`, `model.image_newline`, the mask
row without a token name. Token counts are checked against an independent count from the anyres rules; feature
order with a traceable stub tower; logits against the same parts composed by hand.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

import diffusionvl
from conftest import tiny_ar
from diffusionvl.backbone.compose import compose
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.model.compat import generate as cgen
from diffusionvl.model.compat import generate_compat, hustvl

MASK_ROW = 420  # tiny vocabulary: 384 named tokens, 448 embedding rows; 420 has no name, like 151671 in Qwen's
TILE, PATCH, SIDE = 16, 4, 4  # tiny SigLIP: 16 px tiles of 4 x 4 patches (so400m: 384 px, 27 x 27)
PINPOINTS = [[i * TILE, j * TILE] for i in range(1, 4) for j in range(1, 4)]  # their "(1x1),...,(3x3)", saved
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the image?"}]}]
SIZES = [(40, 20), (20, 50), (48, 48), (16, 16), (100, 30), (17, 90), (300, 200), (33, 47)]


@pytest.fixture(autouse=True)
def _tiny_mask_row(monkeypatch):
    monkeypatch.setattr(hustvl, "MASK_ROW", MASK_ROW)


def picture(size=(40, 20), color="red"):
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle([2, 2, size[0] // 2, size[1] // 2], fill=color)
    return img


def source_parts(tied: bool = False):
    """Tiny Qwen2 LM (+ tokenizer), SigLIP tower with 2 stored layers, mlp2x_gelu projector, newline vector."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    base, tok = tiny_ar("qwen2")
    torch.manual_seed(1)
    lm = Qwen2ForCausalLM(Qwen2Config(**{**base.config.to_dict(), "tie_word_embeddings": tied})).eval()
    with torch.no_grad():
        lm.get_input_embeddings().weight[MASK_ROW] = torch.linspace(-1.0, 1.0, 64)
    lm.generation_config = base.generation_config
    tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                                 num_attention_heads=16, image_size=TILE, patch_size=PATCH,
                                                 vision_use_head=False)).eval()
    projector = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64))
    return lm, tok, tower, projector, torch.randn(64) / 8


def their_config(lm, aspect: str, merge: str, bd3lm: bool) -> dict:
    """config.json as their LlavaQwen-style config class saves it (transformers 4.5x field names)."""
    text = lm.config.to_dict()
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["rope_theta"], rope_scaling=None, torch_dtype=text.pop("dtype", None) or "float32")
    cfg = {**text, "model_type": "diffusionvl_qwen" if bd3lm else "llava_qwen",
           "architectures": ["DiffusionVLQwenForCausalLM" if bd3lm else "LlavaQwenForCausalLM"],
           "mm_vision_tower": "/ckpt/siglip2-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
           "mm_hidden_size": 32, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
           "mm_patch_merge_type": merge, "image_aspect_ratio": aspect, "image_grid_pinpoints": PINPOINTS,
           "image_crop_resolution": None, "image_split_resolution": None, "mm_newline_position": "grid",
           "mm_spatial_pool_stride": 2, "mm_spatial_pool_mode": "bilinear", "add_faster_video": False,
           "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "use_mm_proj": True,
           "mm_tunable_parts": "mm_vision_tower,mm_mlp_adapter,mm_language_model", "tokenizer_model_max_length": 8192,
           "tokenizer_padding_side": "right", "vision_tower_pretrained": None}
    if bd3lm:
        cfg.update(enable_bd3lm=True, bd3lm_block_size=8, bd3lm_block_aligned_eos=True, bd3lm_antithetic_sampling=True,
                   bd3lm_sampling_eps_min=1e-3, bd3lm_sampling_eps_max=1.0)
    return cfg


def write_onevision(folder: Path, aspect="anyres_max_4", merge="spatial_unpad", tied=False, bd3lm=True, shards=1,
                    dtype=torch.float32):
    parts = source_parts(tied)
    lm, tok, tower, projector, newline = parts
    folder.mkdir(parents=True)
    tok.save_pretrained(folder)
    lm.generation_config.save_pretrained(folder)
    state = {k: v for k, v in lm.state_dict().items() if not (tied and k == "lm_head.weight")}
    for k, v in tower.state_dict().items():
        state["model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model.")] = v
    state.update({f"model.mm_projector.{k}": v for k, v in projector.state_dict().items()})
    if merge == "spatial_unpad":
        state["model.image_newline"] = newline
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)] if shards > 1 else \
        ["model.safetensors"]
    for i, name in enumerate(names):
        save_file({k: state[k] for k in keys[i::len(names)]}, folder / name)
    if shards > 1:
        index = {"metadata": {}, "weight_map": {k: names[i % len(names)] for i, k in enumerate(keys)}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(their_config(lm, aspect, merge, bd3lm), indent=2))
    return parts


def by_hand(parts, aspect="anyres_max_4", merge="spatial_unpad"):
    """The same weights put together with diffusionvl.backbone.compose (no compat code)."""
    lm, tok, tower, projector, newline = parts
    model, proc = compose(lm, tok, vision=tower, projector="mlp2x_gelu", feature_layer=-1, image_aspect_ratio=aspect,
                          image_grid_pinpoints=PINPOINTS, patch_merge=merge)
    model.projector.load_state_dict(projector.state_dict())
    if merge == "spatial_unpad":
        model.image_newline.data.copy_(newline)
    return model.eval(), proc


# ---- an independent count of visual tokens ----------------------------------------------------------------------
def expected_tokens(size, limit=4, merge="spatial_unpad"):
    """From the rules: best grid resolution (most image pixels kept, then least padding) -> tiles -> token grid ->
    cut the padding rows/columns -> shrink to about `limit` tiles -> one newline per row, after the base tile."""
    w, h = size

    def kept(res):
        s = min(res[0] / w, res[1] / h)
        return min(int(w * s) * int(h * s), w * h)

    best = max(PINPOINTS, key=lambda r: (kept(r), -(r[0] * r[1] - kept(r))))
    cols, rows = best[0] // TILE, best[1] // TILE
    if merge == "flat":
        return (1 + cols * rows) * SIDE ** 2
    gh, gw = rows * SIDE, cols * SIDE
    if w * gh > h * gw:  # the image is wider than its grid: it fills the width, padding rows are cut (exact ints)
        gh -= 2 * ((gh - h * gw // w) // 2)
    else:
        gw -= 2 * ((gw - w * gh // h) // 2)
    factor = math.sqrt(gh * gw / (limit * SIDE ** 2))
    if factor > 1.1:
        gh, gw = int(gh // factor), int(gw // factor)
    return SIDE ** 2 + gh * (gw + 1)


# ---- detection and loading -------------------------------------------------------------------------------------
def test_detect_the_layout(tmp_path):
    write_onevision(tmp_path / "one")
    write_onevision(tmp_path / "sharded", shards=2)
    one, sharded = hustvl.detect(tmp_path / "one"), hustvl.detect(tmp_path / "sharded")
    assert one.kind == sharded.kind == "llava_qwen"
    assert [f.name for f in one.model_files] == ["model.safetensors"] and len(sharded.model_files) == 2
    assert hustvl.detect(tmp_path / "absent") is None


@pytest.mark.parametrize("shards,tied", [(1, False), (2, True)])
def test_load_equals_the_model_composed_by_hand(tmp_path, shards, tied):
    parts = write_onevision(tmp_path / "ref", shards=shards, tied=tied)
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    cfg = model.config
    assert (cfg.block_size, cfg.prediction, cfg.positions, cfg.mask_token) == (8, "same", "sequential", "<|mask|>")
    assert model.mask_token_id == MASK_ROW and model.tokenizer.convert_ids_to_tokens(model.eos_token_id) == "<|im_end|>"
    hf = model.hf_model
    assert hf.config.model_type == "diffusionvl_llava" and hf.config.image_aspect_ratio == "anyres_max_4"
    assert hf.config.vision["config"]["num_hidden_layers"] == 2 and hf.config.feature_layer == -1
    assert hf.config.vision["config"]["image_size"] == TILE and hf.config.num_image_tokens == SIDE ** 2
    hand, proc = by_hand(parts)
    ours, theirs = hf.state_dict(), hand.state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert hf.config.image_token_id == proc.image_token_id == model.adapter.image_token_id
    text = model.processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert "<image>\nWhat shape" in text  # their data format: the image token, then a newline
    batch = model.processor(text=[text], images=[picture((40, 20))])
    assert torch.equal(batch["input_ids"], proc(text=[text], images=[picture((40, 20))])["input_ids"])
    with torch.no_grad():
        logits = hf(**batch).logits
        assert torch.equal(logits, hand(**batch).logits)
        vision = {k: batch[k] for k in ("pixel_values", "image_sizes", "image_tiles")}
        ids = batch["input_ids"]
        pos, delta = model.adapter.prompt_positions(ids[0].tolist(), vision, 0)
        assert delta == 0 and torch.equal(pos[0], torch.arange(ids.shape[1]))  # their positions: 0, 1, 2, ...
        engine = model.adapter.head(model.adapter.run_decoder(model.adapter.embed(ids, vision), None, pos[:, None]))
        torch.testing.assert_close(engine, logits, rtol=1e-5, atol=1e-5)


def test_mask_row_is_named_in_place_and_image_token_added_first(tmp_path):
    parts = write_onevision(tmp_path / "ref")
    vocab_before = parts[1].get_vocab()
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    vocab = model.tokenizer.get_vocab()
    assert vocab["<|mask|>"] == MASK_ROW and vocab["<image>"] == len(vocab_before)
    assert {k: v for k, v in vocab.items() if k not in ("<|mask|>", "<image>")} == vocab_before  # no id moved
    assert torch.equal(model.adapter.input_embeddings().weight[MASK_ROW], torch.linspace(-1.0, 1.0, 64))


# ---- token counts and feature order ----------------------------------------------------------------------------
@pytest.mark.parametrize("aspect,merge,limit", [("anyres_max_4", "spatial_unpad", 4), ("anyres_max_1",
                                                "spatial_unpad", 1), ("anyres_max_4", "flat", 4)])
def test_visual_tokens_per_image_equal_an_independent_count(tmp_path, aspect, merge, limit):
    write_onevision(tmp_path / "ref", aspect=aspect, merge=merge)
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    proc, hf = model.processor, model.hf_model
    text = proc.apply_chat_template(QUESTION, add_generation_prompt=True)
    for size in SIZES:
        out = proc(text=[text], images=[picture(size)])
        placeholders = int((out["input_ids"] == proc.image_token_id).sum())
        assert placeholders == expected_tokens(size, limit, merge), size
        with torch.no_grad():
            feats = hf.merged_image_features(out["pixel_values"], out["image_sizes"], out["image_tiles"])
        assert feats.shape == (placeholders, 64)
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    out = proc(text=[proc.apply_chat_template(two, add_generation_prompt=True)],
               images=[picture((40, 20)), picture((300, 200))])
    one_tile = SIDE ** 2 + (merge == "spatial_unpad")  # several images: each padded to one tile (+ one newline)
    assert out["image_tiles"].tolist() == [1, 1] and int((out["input_ids"] == proc.image_token_id).sum()) == 2 * one_tile


def _traceable(n_tiles: int) -> torch.Tensor:
    """Stub tower + projector output [n_tiles, side*side, 64]: token (tile i, row r, col c) = (i, r, c, 1, 0, ...)."""
    feats = torch.zeros(n_tiles, SIDE * SIDE, 64)
    i, r, c = torch.meshgrid(torch.arange(n_tiles), torch.arange(SIDE), torch.arange(SIDE), indexing="ij")
    feats[..., 0], feats[..., 1], feats[..., 2], feats[..., 3] = i.reshape(n_tiles, -1).float(), \
        r.reshape(n_tiles, -1).float(), c.reshape(n_tiles, -1).float(), 1.0
    return feats


@pytest.mark.parametrize("size,grid,kept_rows,kept_cols", [
    ((40, 20), (3, 2), (1, 7), (0, 12)),  # 48x32 grid, padding above and below: rows 1..6 of 8 kept
    ((20, 40), (2, 3), (0, 12), (1, 7)),  # the transpose
    ((32, 16), (2, 1), (0, 4), (0, 8)),  # exact fit, nothing cut
])
def test_feature_order_is_base_then_unpadded_rows_each_closed_by_the_newline(tmp_path, monkeypatch, size, grid,
                                                                             kept_rows, kept_cols):
    write_onevision(tmp_path / "ref")
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    hf, proc = model.hf_model, model.processor
    out = proc(text=["<image>"], images=[picture(size)])
    cols, rows = grid
    n_tiles = 1 + cols * rows
    assert out["image_tiles"].tolist() == [n_tiles]
    monkeypatch.setattr(hf, "image_features", lambda pixels: _traceable(pixels.shape[0]))
    feats = hf.merged_image_features(out["pixel_values"], out["image_sizes"], out["image_tiles"])
    newline = hf.image_newline.detach()
    expected = [torch.tensor([0.0, r, c, 1.0]) for r in range(SIDE) for c in range(SIDE)]  # the base tile
    for y in range(*kept_rows):  # a row of the stitched grid, left to right across the tiles
        for x in range(*kept_cols):
            expected.append(torch.tensor([1.0 + (y // SIDE) * cols + x // SIDE, y % SIDE, x % SIDE, 1.0]))
        expected.append(None)
    assert feats.shape[0] == len(expected)
    for row, want in zip(feats, expected):
        assert torch.equal(row, newline) if want is None else torch.equal(row[:4], want)


def test_tiles_are_their_preprocessing(tmp_path):
    """Base = the image squashed to one tile; tiles = crops of the image fitted (aspect kept, centred on black) into
    the best grid resolution; each normalized as transformers' resize/rescale/normalize do."""
    import numpy as np
    from transformers.image_transforms import normalize, rescale, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling

    write_onevision(tmp_path / "ref")
    proc = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32").processor
    image = picture((40, 20))
    out = proc(text=["<image>"], images=[image])
    canvas = Image.new("RGB", (48, 32))
    canvas.paste(image.resize((48, 24)), (0, 4))  # 40x20 -> 48x24 fits 48x32, 4 px of black above and below
    crops = [image.resize((TILE, TILE))] + [canvas.crop((x, y, x + TILE, y + TILE)) for y in (0, 16)
                                             for x in (0, 16, 32)]

    def siglip(img):
        arr = resize(np.asarray(img), (TILE, TILE), resample=PILImageResampling.BICUBIC,
                     data_format=ChannelDimension.FIRST)
        arr = normalize(rescale(arr, 1 / 255, data_format=ChannelDimension.FIRST), [0.5] * 3, [0.5] * 3,
                        data_format=ChannelDimension.FIRST)
        return torch.from_numpy(np.ascontiguousarray(arr))

    assert torch.equal(out["pixel_values"], torch.stack([siglip(c) for c in crops]))
    assert out["image_sizes"].tolist() == [[40, 20]]


# ---- decoding, conversion, the reference generate call ---------------------------------------------------------
def test_generate_with_images_and_convert_round_trip(tmp_path):
    write_onevision(tmp_path / "ref")
    first = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    opts = dict(max_new_tokens=12, steps=2, temperature=1.0, seed=3)
    out = first.generate(QUESTION, images=[picture((100, 30))], **opts)
    assert out.stats["tokens"] >= 1
    dst = diffusionvl.convert(tmp_path / "ref", tmp_path / "ours")
    assert hustvl.detect(dst) is None
    assert json.loads((dst / "config.json").read_text())["model_type"] == "diffusionvl_llava"
    again = diffusionvl.load(dst, device="cpu", dtype="float32")
    assert again.config == first.config and again.mask_token_id == MASK_ROW
    assert again.processor.layout == first.processor.layout
    assert again.processor.chat_template == first.processor.chat_template
    a, b = first.hf_model.state_dict(), again.hf_model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert again.generate(QUESTION, images=[picture((100, 30))], **opts).token_ids == out.token_ids
    two = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Same?"}]}]
    assert again.generate(two, images=[picture((40, 20)), picture((20, 40))], max_new_tokens=8, steps=2).texts


def test_generate_compat_llava_call_equals_generate(tmp_path):
    write_onevision(tmp_path / "ref")
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    proc = model.processor
    image = picture((100, 30))
    batch = proc(text=[proc.apply_chat_template(QUESTION, add_generation_prompt=True)], images=[image])
    ids, image_id = batch["input_ids"][0], proc.image_token_id
    first = int((ids == image_id).nonzero()[0])
    llava = torch.cat([ids[:first], torch.tensor([cgen.LLAVA_IMAGE_INDEX]), ids[ids != image_id][first:]])
    tiles = batch["pixel_values"].half()  # their lmms-eval wrapper: fp16 tiles, a list with one tensor per image
    out = generate_compat(model, llava[None], images=[tiles], image_sizes=[image.size], gen_length=16, steps=2,
                                 remasking_strategy="low_confidence_static", modalities=["image"], use_cache=False)
    assert out.dtype == torch.long and out.shape == (1, 16)
    cfg = cgen.decode_config(16, 2, model_block_size=model.config.block_size)
    ours = model.generate(QUESTION, images=[image], config=cfg).token_ids[0]
    assert out[0, : len(ours)].tolist() == ours and (out[0, len(ours):] == model.eos_token_id).all()
    expanded = generate_compat(model, inputs=batch["input_ids"], images=tiles[None], image_sizes=[image.size],
                                      gen_length=16, steps=2)  # [N, tiles, 3, S, S] + ids with the tokens expanded
    assert torch.equal(expanded, out)
    with pytest.raises(DiffusionVLError, match="image_sizes"):
        generate_compat(model, llava[None], images=[tiles], gen_length=4)


def test_training_loss_reaches_the_newline_and_the_tower(tmp_path):
    write_onevision(tmp_path / "ref")
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    proc = model.processor
    conv = QUESTION + [{"role": "assistant", "content": "A red square."}]
    batch = dict(proc(text=[proc.apply_chat_template(conv)], images=[picture((40, 20))]))
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][batch["input_ids"] == proc.image_token_id] = -100
    model.train()
    loss = model.training_loss(batch, generator=torch.Generator().manual_seed(0)).loss
    loss.backward()
    assert torch.isfinite(loss) and model.hf_model.image_newline.grad.abs().sum() > 0
    assert model.hf_model.vision_tower.encoder.embeddings.patch_embedding.weight.grad is not None
    from diffusionvl.jobs.train.parts import part_of

    assert part_of("image_newline") == "projector"


def test_ar_llava_onevision_layout_is_wrapped_like_an_ar_model(tmp_path):
    write_onevision(tmp_path / "ar", bd3lm=False)
    model = diffusionvl.load(tmp_path / "ar", device="cpu", dtype="float32")
    assert model.config.prediction == "shift" and model.mask_token_id != MASK_ROW
    assert model.generate(QUESTION, images=[picture()], max_new_tokens=4, steps=2).texts


# ---- broken layouts: one-line errors ---------------------------------------------------------------------------
def _error(path) -> str:
    with pytest.raises(DiffusionVLError) as info:
        diffusionvl.load(path, device="cpu")
    assert "\n" not in str(info.value)
    return str(info.value)


def _edit_weights(folder: Path, drop: str | None = None, add: str | None = None) -> None:
    from safetensors.torch import load_file

    state = load_file(folder / "model.safetensors")
    if drop:
        del state[drop]
    if add:
        state[add] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")


def test_broken_layouts_fail_with_one_line(tmp_path):
    write_onevision(tmp_path / "no_newline")
    _edit_weights(tmp_path / "no_newline", drop="model.image_newline")
    msg = _error(tmp_path / "no_newline")
    assert "missing 1 tensor(s) of the image newline" in msg and "model.image_newline" in msg

    write_onevision(tmp_path / "no_layer")
    _edit_weights(tmp_path / "no_layer", drop="model.vision_tower.vision_tower.vision_model.encoder.layers.1.mlp.fc2.bias")
    assert "of the vision tower" in _error(tmp_path / "no_layer")

    write_onevision(tmp_path / "extra")
    _edit_weights(tmp_path / "extra", add="model.vision_resampler.weight")
    assert "unexpected" in _error(tmp_path / "extra") and "model.vision_resampler.weight" in _error(tmp_path / "extra")

    write_onevision(tmp_path / "no_tower")
    from safetensors.torch import load_file
    state = {k: v for k, v in load_file(tmp_path / "no_tower" / "model.safetensors").items()
             if not k.startswith("model.vision_tower.")}
    save_file(state, tmp_path / "no_tower" / "model.safetensors")
    assert "missing the SigLIP vision tower" in _error(tmp_path / "no_tower")

    write_onevision(tmp_path / "highres")
    cfg = json.loads((tmp_path / "highres" / "config.json").read_text())
    cfg["image_aspect_ratio"] = "highres"
    (tmp_path / "highres" / "config.json").write_text(json.dumps(cfg))
    assert "image_aspect_ratio 'highres' is not supported" in _error(tmp_path / "highres")


def test_mask_row_outside_the_vocabulary_fails_with_one_line(tmp_path, monkeypatch):
    write_onevision(tmp_path / "ref")
    monkeypatch.setattr(hustvl, "MASK_ROW", 151671)  # the real row, in a 448-row tiny vocabulary
    assert "mask row 151671 is outside the vocabulary of 448" in _error(tmp_path / "ref")
