"""DiffusionVL reference checkpoints and `generate` call (diffusionvl.model.compat), on tiny Qwen2.5-VL weights.

The tiny checkpoints are written the way the reference code writes them (file names, key prefixes, config keys,
a mask row with no token name); each test proves an equivalence with the same weights loaded natively, or a
one-line failure for a broken layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import diffusionvl
from conftest import red_square, tiny_ar
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.core.sampling import POLICIES
from diffusionvl.model.compat import generate as cgen
from diffusionvl.model.compat import generate_compat, hustvl, load_checkpoint
from diffusionvl.model.wrapping import wrap

MASK_ROW = 420  # tiny vocabulary: 384 named tokens, 448 embedding rows; 420 has no name, like 151671 in Qwen's
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape is in the image?"}]}]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is ~100x faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _tiny_mask_row(monkeypatch):
    monkeypatch.setattr(hustvl, "MASK_ROW", MASK_ROW)


def source_model(tied: bool = False):
    """Tiny Qwen2.5-VL AR weights with a recognizable (trained-looking) mask row."""
    model, proc = tiny_ar("qwen2_5_vl")
    with torch.no_grad():
        model.get_input_embeddings().weight[MASK_ROW] = torch.linspace(-1.0, 1.0, model.config.text_config.hidden_size)
        if tied:
            model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    return model, proc


def reference_config(model, block_size: int, trained: bool) -> dict:
    """config.json as their DiffusionVLQwenVLConfig saves it (transformers 4.5x names: rope_scaling, torch_dtype)."""
    text = model.config.text_config.to_dict()
    rope = text.pop("rope_parameters")
    text.update(rope_theta=rope["rope_theta"], rope_scaling={"type": "default", "rope_type": "default",
                                                            "mrope_section": rope["mrope_section"]})
    text.update(model_type="qwen2_5_vl_text", torch_dtype=text.pop("dtype", "float32"))
    vision = {k: v for k, v in model.config.vision_config.to_dict().items() if k not in ("rope_parameters", "dtype")}
    ids = {k: getattr(model.config, k) for k in hustvl.VISION_TOKENS}
    # their config class copies the text fields to the top level; the prepared (converted) one copies the default
    # text config's values there, so only text_config is right: wrong sizes here prove text_config wins
    top = dict(text, hidden_size=8192, num_hidden_layers=80, layer_types=["full_attention"] * 80) if not trained \
        else dict(text)
    cfg = {**top, **ids, "model_type": "diffusionvl_qwenvl", "architectures": ["DiffusionVLQwenVLForCausalLM"],
           "text_config": text, "vision_config": vision, "enable_bd3lm": trained, "bd3lm_block_size": block_size}
    if trained:
        cfg.update(mm_vision_tower="/ckpt/Qwen2.5-VL-7B-Instruct-Reformat", mm_projector_type="qwen_merger",
                   mm_hidden_size=vision["hidden_size"], mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                   mm_patch_merge_type="flat", image_aspect_ratio="pad", use_mm_proj=True, mm_use_im_start_end=False,
                   mm_use_im_patch_token=False, tokenizer_model_max_length=8192, tokenizer_padding_side="right",
                   bd3lm_antithetic_sampling=True, bd3lm_sampling_eps_min=1e-3, bd3lm_sampling_eps_max=1.0,
                   bd3lm_block_aligned_eos=True, min_pixels=56 * 56, max_pixels=112 * 112)
    return cfg


def write_reference(folder: Path, layout: str = "prepared", tied: bool = False, dtype=torch.float32):
    """Write the tiny weights as their conversion script ('prepared') or their trainer ('trained', sharded) does."""
    model, proc = source_model(tied)
    folder.mkdir(parents=True)
    proc.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    sd = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    prefix = "model.language_model."
    lm = {"model." + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not tied:
        lm["lm_head.weight"] = sd["lm_head.weight"]
    tower = {k[len("model.visual."):]: v for k, v in sd.items()
             if k.startswith("model.visual.") and not k.startswith("model.visual.merger.")}
    merger = {k[len("model.visual.merger."):]: v for k, v in sd.items() if k.startswith("model.visual.merger.")}
    cfg = reference_config(model, 4 if layout == "prepared" else 8, trained=layout == "trained")
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if layout == "prepared":
        (folder / "vision_config.json").write_text(json.dumps(cfg["vision_config"]))
        save_file(lm, folder / "model.safetensors")
        save_file(tower, folder / "vision_tower.safetensors")
        save_file(merger, folder / "projector.safetensors")
    else:
        full = {**lm, **{"model.vision_tower.vision_tower." + k: v for k, v in tower.items()},
                **{"model.mm_projector.merger." + k: v for k, v in merger.items()}}
        keys = sorted(full)
        shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        for name, part in shards.items():
            save_file({k: full[k] for k in part}, folder / name)
        index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return model, proc


def write_llava_qwen(folder: Path) -> None:
    folder.mkdir(parents=True)
    cfg = {"model_type": "diffusionvl_qwen", "architectures": ["DiffusionVLQwenForCausalLM"], "hidden_size": 64,
           "mm_vision_tower": "/ckpt/siglip2-so400m-patch14-384", "mm_projector_type": "mlp2x_gelu",
           "image_aspect_ratio": "anyres_max_4", "mm_patch_merge_type": "spatial_unpad", "bd3lm_block_size": 8}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({"model.mm_projector.0.weight": torch.zeros(2, 2)}, folder / "model.safetensors")


def image_batch(proc, n_images: int = 1):
    text = proc.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    return proc(text=[text], images=[red_square()] * n_images, return_tensors="pt")


def sequential(n: int) -> torch.Tensor:
    return torch.arange(n).view(1, 1, -1).expand(3, 1, n)


# ---- detection ---------------------------------------------------------------------------------------------------
def test_detect_each_layout_and_nothing_else(tmp_path):
    write_reference(tmp_path / "prepared", "prepared")
    write_reference(tmp_path / "trained", "trained", tied=True)
    write_llava_qwen(tmp_path / "llava")
    prepared, trained = hustvl.detect(tmp_path / "prepared"), hustvl.detect(tmp_path / "trained")
    assert prepared.kind == "qwenvl" and prepared.vision_file and prepared.projector_file and prepared.vision_config
    assert [f.name for f in prepared.model_files] == ["model.safetensors"]
    assert trained.kind == "qwenvl" and trained.vision_file is None and len(trained.model_files) == 2
    assert hustvl.detect(tmp_path / "llava").kind == "llava_qwen"
    model, proc = tiny_ar("qwen2_5_vl")
    model.save_pretrained(tmp_path / "hf")
    proc.save_pretrained(tmp_path / "hf")
    native = diffusionvl.convert(tmp_path / "hf", tmp_path / "native", block_size=4)
    assert hustvl.detect(tmp_path / "hf") is None and hustvl.detect(native) is None
    assert hustvl.detect(tmp_path / "absent") is None


def test_hub_id_resolves_to_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--hustvl--DiffusionVL-Qwen2.5VL-3B"
    write_reference(repo / "snapshots" / "0123abcd", "trained", tied=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert hustvl.detect("hustvl/DiffusionVL-Qwen2.5VL-3B").path == repo / "snapshots" / "0123abcd"
    assert diffusionvl.load("hustvl/DiffusionVL-Qwen2.5VL-3B", device="cpu").mask_token_id == MASK_ROW
    assert hustvl.detect("hustvl/not-downloaded") is None  # nothing is fetched


# ---- loading: same weights, same logits ----------------------------------------------------------------------
@pytest.mark.parametrize("layout,tied", [("prepared", False), ("trained", True)])
def test_load_gives_the_same_weights_and_logits(tmp_path, layout, tied):
    source, proc = write_reference(tmp_path / "ref", layout, tied)
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    assert model.config.block_size == (4 if layout == "prepared" else 8)
    assert (model.config.prediction, model.config.positions, model.config.mask_token) == ("same", "sequential",
                                                                                         "<|mask|>")
    loaded, expected = model.hf_model.state_dict(), source.state_dict()
    assert set(loaded) == set(expected) and all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert model.hf_model.config.tie_word_embeddings == tied
    batch = image_batch(proc)
    ids, pixels, grid = batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"]
    with torch.no_grad():
        ref = source(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits  # native, M-RoPE positions
        ours = model.hf_model(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
        assert torch.equal(ours, ref)
        # the engine path (adapter embed + decoder + head) with their 1-D positions == HF forward given them
        vision = {"pixel_values": pixels, "image_grid_thw": grid, "image_grid_thw_per_sample": [grid]}
        pos, delta = model.adapter.prompt_positions(ids[0].tolist(), vision, 0)
        assert delta == 0 and torch.equal(pos, sequential(ids.shape[1])[:, 0])
        engine = model.adapter.head(model.adapter.run_decoder(model.adapter.embed(ids, vision), None, pos[:, None]))
        ref_seq = source(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                         position_ids=sequential(ids.shape[1])).logits
        torch.testing.assert_close(engine, ref_seq, rtol=1e-5, atol=1e-5)
        # the only difference from the same weights wrapped natively is the positions option
        native = wrap(source, proc, block_size=4, prediction="same")
        model.hf_model.config.diffusionvl["positions"] = "model"
        assert torch.equal(model.adapter.prompt_positions(ids[0].tolist(), vision, 0)[0],
                           native.adapter.prompt_positions(ids[0].tolist(), vision, 0)[0])


def test_stored_dtype_is_kept_unless_asked(tmp_path):
    write_reference(tmp_path / "ref", "prepared", dtype=torch.bfloat16)
    kept = load_checkpoint(hustvl.detect(tmp_path / "ref"), "cpu", None)
    assert kept.dtype == torch.bfloat16 and kept.hf_model.model.visual.patch_embed.proj.weight.dtype == torch.bfloat16
    assert diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32").dtype == torch.float32


# ---- the mask token ----------------------------------------------------------------------------------------------
def test_mask_token_is_the_reference_row_by_name(tmp_path):
    source, proc = write_reference(tmp_path / "ref", "prepared")
    vocab_before = proc.tokenizer.get_vocab()
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    tok = model.tokenizer
    assert model.mask_token_id == MASK_ROW == tok.convert_tokens_to_ids("<|mask|>")
    assert tok("a<|mask|>b")["input_ids"][1] == MASK_ROW and tok.decode([MASK_ROW], skip_special_tokens=True) == ""
    assert {k: v for k, v in tok.get_vocab().items() if k != "<|mask|>"} == vocab_before  # no id moved
    weight = model.adapter.input_embeddings().weight
    assert torch.equal(weight[model.mask_token_id], source.get_input_embeddings().weight[MASK_ROW])
    seen = []
    hook = model.adapter.input_embeddings().register_forward_hook(lambda mod, args, out: seen.append(args[0].clone()))
    try:
        model.generate(QUESTION, images=[red_square()], max_new_tokens=8, steps=2)
    finally:
        hook.remove()
    embedded = torch.cat([x.flatten() for x in seen])
    assert (embedded == MASK_ROW).any()  # the masked positions were embedded with the reference's own row
    assert not ((embedded >= len(vocab_before)) & (embedded != MASK_ROW)).any()


def test_naming_the_mask_row_keeps_ids_of_tokens_outside_the_model_vocabulary(tmp_path):
    """Real Qwen tokenizers keep <|endoftext|>, <|im_end|>, ... only as added tokens above the BPE vocabulary;
    `tokenizers` renumbers those from the vocabulary's size on reload, so a new vocabulary entry must not shift
    them (it moved <|im_end|> by one before)."""
    from tokenizers import Tokenizer, models
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate("abcdefghij")}, merges=[]))
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.add_special_tokens({"additional_special_tokens": ["<|endoftext|>", "<|im_end|>"]})
    tok.add_tokens(["<image>"], special_tokens=True)
    before = tok.get_vocab()
    assert [before[k] for k in ("<|endoftext|>", "<|im_end|>", "<image>")] == [10, 11, 12]
    assert hustvl.name_row(tok, 20) == "<|mask|>"
    assert {k: v for k, v in tok.get_vocab().items() if k != "<|mask|>"} == before and tok.get_vocab()["<|mask|>"] == 20
    assert tok.encode("<|im_end|>a<|mask|><image>") == [11, 0, 20, 12]
    tok.save_pretrained(tmp_path / "tok")
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again.get_vocab() == tok.get_vocab() and again.encode("<|mask|><image>") == [20, 12]


# ---- convert ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["prepared", "trained"])
def test_convert_from_reference_layout_round_trips(tmp_path, layout):
    write_reference(tmp_path / "ref", layout, tied=layout == "trained")
    first = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    dst = diffusionvl.convert(tmp_path / "ref", tmp_path / "ours")
    assert hustvl.detect(dst) is None and json.loads((dst / "config.json").read_text())["model_type"] == "qwen2_5_vl"
    again = diffusionvl.load(dst, device="cpu", dtype="float32")
    assert again.config == first.config and again.mask_token_id == MASK_ROW
    a, b = first.hf_model.state_dict(), again.hf_model.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    opts = dict(max_new_tokens=12, steps=2, temperature=1.0, seed=3)
    assert (first.generate(QUESTION, images=[red_square()], **opts).token_ids
            == again.generate(QUESTION, images=[red_square()], **opts).token_ids)
    overridden = diffusionvl.load(diffusionvl.convert(tmp_path / "ref", tmp_path / "b2", block_size=2), device="cpu")
    assert overridden.config.block_size == 2 and overridden.config.prediction == "same"


def test_train_starts_from_the_reference_layout_directly(tmp_path):
    from diffusionvl.jobs.train import TrainConfig, train

    write_reference(tmp_path / "ref", "prepared")
    sample = {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour?"},
                                                     {"from": "gpt", "value": "red"}]}
    red_square().save(tmp_path / "red.png")
    (tmp_path / "data.json").write_text(json.dumps([sample] * 2))
    summary = train(TrainConfig(model=str(tmp_path / "ref"), data=str(tmp_path / "data.json"), max_steps=1,
                                image_folder=str(tmp_path), output=str(tmp_path / "out"), batch_size=2,
                                progress=False, tensorboard=False))
    assert summary["steps"] == 1 and summary["data"]["kept"] == 2
    trained = diffusionvl.load(summary["final_model"], device="cpu")
    assert trained.config.prediction == "same" and trained.mask_token_id == MASK_ROW


# ---- the reference generate signature --------------------------------------------------------------------------
@pytest.mark.parametrize("strategy,extra", [
    ("low_confidence_static", dict(temperature=0.0)),
    ("low_confidence_static", dict(temperature=1.0, seed=5)),
    ("low_confidence_dynamic", dict(temperature=1.0, seed=7, confidence_threshold=0.2)),
])
def test_generate_compat_equals_generate_with_mapped_options(tmp_path, strategy, extra):
    _, proc = write_reference(tmp_path / "ref", "trained")
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    batch = image_batch(proc)
    out = generate_compat(model, inputs=batch["input_ids"], images=batch["pixel_values"],
                                 image_grid_thws=batch["image_grid_thw"], gen_length=20, steps=4,
                         remasking_strategy=strategy, **extra)
    assert out.dtype == torch.long and out.shape == (1, 20)
    cfg = cgen.decode_config(20, 4, extra["temperature"], strategy, extra.get("confidence_threshold", 0.85),
                             model_block_size=model.config.block_size, seed=extra.get("seed"))
    assert cfg.policy == cgen.REMASKING[strategy] and cfg.max_new_tokens == 20 and cfg.steps == 4
    ours = model.generate(QUESTION, images=[red_square()], config=cfg).token_ids[0]
    assert out[0, : len(ours)].tolist() == ours
    assert (out[0, len(ours):] == model.eos_token_id).all()  # after the stop: EOS, like a block-aligned answer


def test_generate_compat_llava_placeholders_and_padded_batch(tmp_path):
    _, proc = write_reference(tmp_path / "ref", "trained")
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    batch = image_batch(proc)
    ids, image_id = batch["input_ids"][0], model.adapter.image_token_id
    opts = dict(images=batch["pixel_values"], image_grid_thws=batch["image_grid_thw"], gen_length=12, steps=2)
    expanded = generate_compat(model, inputs=batch["input_ids"], **opts)
    first = int((ids == image_id).nonzero()[0])
    llava = torch.cat([ids[:first], torch.tensor([cgen.LLAVA_IMAGE_INDEX]), ids[ids != image_id][first:]])
    assert torch.equal(generate_compat(model, llava[None], **opts), expanded)  # one -200 per image == expanded pad tokens
    text = proc.tokenizer("<|im_start|>user\nHi, how are you?<|im_end|>\n<|im_start|>assistant\n",
                          return_tensors="pt")["input_ids"][0]
    width = max(len(text), len(ids))
    padded = torch.full((2, width), proc.tokenizer.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    padded[0, width - len(ids):], mask[0, width - len(ids):] = ids, 1  # left padded, different lengths
    padded[1, width - len(text):], mask[1, width - len(text):] = text, 1
    both = generate_compat(model, padded, attention_mask=mask, **opts)  # positional ids, like their lmms-eval wrapper
    alone = generate_compat(model, inputs=text[None], gen_length=12, steps=2)
    assert torch.equal(both[0], expanded[0]) and torch.equal(both[1], alone[0])


def test_dynamic_threshold_is_exactly_the_reference_rule():
    """Their low_confidence_dynamic: if #(conf > tau) >= k take those, else the top-k; ours: top-k | conf >= tau'."""
    gen = torch.Generator().manual_seed(0)
    tau = 0.7
    conf = torch.rand(64, 8, generator=gen)
    conf[:, 0] = torch.tensor(tau, dtype=torch.float32)  # ties at the threshold
    is_mask = torch.rand(64, 8, generator=gen) < 0.7
    for k in (1, 2, 3):
        masked = torch.where(is_mask, conf, -torch.inf)
        high = masked > tau
        top = torch.zeros_like(is_mask)
        top.scatter_(1, masked.topk(k, dim=1).indices, True)
        top &= is_mask
        reference = torch.where((high.sum(1, keepdim=True) >= k), high, top)
        ours = POLICIES["threshold"](conf, is_mask, k, cgen.strictly_above(tau))
        assert torch.equal(ours, reference)


def test_decode_option_mapping_and_errors():
    cfg = cgen.decode_config(gen_length=64, steps=32, temperature=0.5, remasking_strategy="low_confidence_dynamic",
                             confidence_threshold=0.9, top_k=5, top_p=0.8, model_block_size=8)
    assert (cfg.max_new_tokens, cfg.block_size, cfg.steps, cfg.policy) == (64, 8, 8, "threshold")  # steps capped
    assert cfg.threshold > 0.9 and torch.tensor(cfg.threshold) == torch.nextafter(torch.tensor(0.9), torch.tensor(2.0))
    assert (cfg.temperature, cfg.top_k, cfg.top_p) == (0.5, 5, 0.8)
    never = cgen.decode_config(remasking_strategy="low_confidence_dynamic", confidence_threshold=1.0,
                               model_block_size=4)
    assert never.policy == "static"  # `conf > 1` never holds: the reference falls back to top-k every step
    with pytest.raises(DiffusionVLError, match="remasking_strategy"):
        cgen.decode_config(remasking_strategy="random", model_block_size=4)
    with pytest.raises(DiffusionVLError, match="steps"):
        cgen.decode_config(steps=0, model_block_size=4)


def test_generate_compat_input_errors(tmp_path):
    _, proc = write_reference(tmp_path / "ref", "prepared")
    model = diffusionvl.load(tmp_path / "ref", device="cpu", dtype="float32")
    batch = image_batch(proc)
    with pytest.raises(DiffusionVLError, match="LongTensor"):
        generate_compat(model, "hello", gen_length=8)
    with pytest.raises(DiffusionVLError, match="image_grid_thws is required"):
        generate_compat(model, inputs=batch["input_ids"], images=batch["pixel_values"], gen_length=8)
    with pytest.raises(DiffusionVLError, match="2 images given"):
        generate_compat(model, inputs=batch["input_ids"], images=torch.cat([batch["pixel_values"]] * 2),
                               image_grid_thws=torch.cat([batch["image_grid_thw"]] * 2), gen_length=8)
    with pytest.raises(DiffusionVLError, match="unknown generation option"):
        generate_compat(model, inputs=batch["input_ids"], gen_length=8, bogus=1)
    with pytest.raises(DiffusionVLError, match="generate_compat"):  # generate always returns a GenerationOutput
        model.generate(inputs=batch["input_ids"], gen_length=8)


# ---- broken layouts: one-line errors -------------------------------------------------------------------------
def _error(path) -> str:
    with pytest.raises(DiffusionVLError) as info:
        diffusionvl.load(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_broken_layouts_fail_with_one_line(tmp_path):
    write_reference(tmp_path / "no_tower", "prepared")
    (tmp_path / "no_tower" / "vision_tower.safetensors").unlink()
    msg = _error(tmp_path / "no_tower")
    assert "missing" in msg and "vision tower" in msg and "vision_tower.safetensors" in msg

    write_reference(tmp_path / "no_key", "prepared")
    weights = tmp_path / "no_key" / "model.safetensors"
    from safetensors.torch import load_file
    state = load_file(weights)
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.image_newline"] = torch.zeros(64)
    save_file(state, weights)
    msg = _error(tmp_path / "no_key")
    assert "model.language_model.layers.1.mlp.up_proj.weight" in msg and "model.image_newline" in msg

    write_reference(tmp_path / "no_model", "prepared")
    (tmp_path / "no_model" / "model.safetensors").unlink()
    assert "no model.safetensors" in _error(tmp_path / "no_model")

    write_reference(tmp_path / "no_shard", "trained")
    (tmp_path / "no_shard" / "model-00002-of-00002.safetensors").unlink()
    assert "model-00002-of-00002.safetensors" in _error(tmp_path / "no_shard")

    write_reference(tmp_path / "corrupt", "prepared")
    (tmp_path / "corrupt" / "projector.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot read" in _error(tmp_path / "corrupt")

    write_reference(tmp_path / "misfit", "trained")
    cfg = json.loads((tmp_path / "misfit" / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (tmp_path / "misfit" / "config.json").write_text(json.dumps(cfg))
    assert "size mismatch" in _error(tmp_path / "misfit")

    write_llava_qwen(tmp_path / "llava")  # the layout loads now (test_compat_onevision.py); these weights are cut
    assert "missing the SigLIP vision tower" in _error(tmp_path / "llava")
