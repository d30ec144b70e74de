"""The embedded default model: a tiny pretrained diffusion VLM that runs right after `pip install`, offline, on CPU.

Contract: `default_folder()` (this package's `model/`, or $DIFFUSIONVL_DEFAULT_DIR) holds what
`diffusionvl recipe tiny-vlm --export-to DIR` wrote, in one of two formats, named by its manifest.json:
- "plain" (the recipe's tiny LM, trained in full): an ordinary diffusionvl model folder (config, fp16 weights,
  tokenizer, processor) that `diffusionvl.load(folder)` reads like any other, saved without the frozen vision
  tower (config `vision_weights="asset"`: the tower's weights come from the EfficientNet asset package), plus
  `parent.safetensors`, the translation's LoRA factors: the AR parent is the same folder with them subtracted
  (W -= alpha / r * B @ A).
- "adapters" (SmolLM2 + LoRA): only what training changed, in fp16: the LoRA factors of the AR stage and of the
  translation, and the projector; `load_default` rebuilds the recipe's starting point from the offline assets
  (`recipes.tiny_model.build_init`) and merges them in recipe order (W += alpha / r * B @ A).
`load_default(parent=True)` is the AR parent, marked `autoregressive_only`. Files are checked against the manifest's
checksums; a missing asset package raises a one-line error naming the pip command.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from diffusionvl.core.atomic import write_file, write_json
from diffusionvl.core.errors import DiffusionVLError, check

HERE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
PARENT_FILE = "parent.safetensors"
PEFT_PREFIX = "base_model.model."


def default_folder() -> Path:
    return Path(os.environ.get("DIFFUSIONVL_DEFAULT_DIR", HERE / "model"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_manifest(folder: Path | None = None) -> dict[str, Any]:
    folder = folder or default_folder()
    path = folder / MANIFEST
    check(path.is_file(), f"no embedded default model in {folder} (run `diffusionvl recipe tiny-vlm --export-to "
          f"{folder}` to build one)")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------- adapters
def compact_adapter(adapter_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """peft adapter folder -> (fp16 tensors keyed by target module path, {"scale": alpha / r})."""
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    out = {}
    for key, value in tensors.items():
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        out[name.replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")] = value.half()
    return out, {"scale": float(cfg["lora_alpha"]) / float(cfg["r"])}


@torch.no_grad()
def merge_compact(hf_model: Any, tensors: dict[str, torch.Tensor], scale: float) -> int:
    """Merge LoRA factors (`X.lora_A.weight`, `X.lora_B.weight`) and saved modules into `hf_model`; returns the
    number of weights changed. Every key must land somewhere (a strict, one-line error otherwise)."""
    params = dict(hf_model.named_parameters())
    changed = 0
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            base = key[: -len(".lora_A.weight")] + ".weight"
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            check(base in params and b is not None, f"adapter tensor {key} matches no weight of the model")
            w = params[base]
            w += (scale * (b.float() @ value.float())).to(w.dtype)
            changed += 1
        elif not key.endswith(".lora_B.weight"):
            check(key in params, f"adapter tensor {key} matches no weight of the model")
            params[key].copy_(value.to(params[key].dtype))
            changed += 1
    return changed


# ------------------------------------------------------------------------------------------------------ load
def load_default(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 folder: Path | None = None, parent: bool = False) -> Any:
    """The embedded default diffusion VLM (DiffusionVLModel); `parent=True` gives its AR parent instead (the AR
    instruction-tuned VLM before the translation, marked `autoregressive_only`: decode it with decoder="ar")."""
    from safetensors.torch import load_file

    from diffusionvl.core.devices import default_device, default_dtype
    from diffusionvl.recipes.tiny_model import build_init, config_from_dict

    folder = folder or default_folder()
    manifest = read_manifest(folder)
    if manifest.get("format") == "plain":
        return _load_plain(folder, manifest, device, dtype, parent)
    recipe = manifest["recipe"]
    model = build_init(config_from_dict(recipe), manifest.get("vision_standardize"))
    stages = manifest["adapters"][:-1] if parent else manifest["adapters"]  # the last one is the translation
    for stage in stages:
        merge_compact(model.hf_model, load_file(_checked(folder, stage)), stage["scale"])
    dev = default_device(device)
    model.hf_model.to(device=dev, dtype=default_dtype(dtype, dev)).eval()
    model.autoregressive_only = parent
    return model


def _checked(folder: Path, entry: dict[str, Any]) -> Path:
    path = folder / entry["file"]
    check(path.is_file(), f"embedded default model is incomplete: {path} is missing (reinstall diffusionvl)")
    if _sha256(path) != entry["sha256"]:
        raise DiffusionVLError(f"embedded default model file {path.name} is corrupt (checksum mismatch); "
                               "reinstall diffusionvl")
    return path


def _load_plain(folder: Path, manifest: dict[str, Any], device: Any, dtype: Any, parent: bool) -> Any:
    """The plain format: load() the folder; the parent subtracts the translation's LoRA factors."""
    from safetensors.torch import load_file

    from diffusionvl.model.conversion import load

    weights = manifest["weights"]
    _checked(folder, weights)
    model = load(folder, device="cpu", dtype="float32")
    if parent:
        entry = manifest["parent"]
        merge_compact(model.hf_model, load_file(_checked(folder, entry)), -entry["scale"])
    from diffusionvl.core.devices import default_device, default_dtype

    dev = default_device(device)
    model.hf_model.to(device=dev, dtype=default_dtype(dtype, dev)).eval()
    model.autoregressive_only = parent
    return model


def export_plain(paths: dict[str, Path], dst: Path, cfg: Any, results: dict[str, Any]) -> Path:
    """The plain format (module docstring) from a finished recipe run whose translation trained LoRA adapters."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    from diffusionvl.model.conversion import load
    from diffusionvl.model.modeling import save_atomic

    model = load(paths["dvlm"], device="cpu", dtype="float32")
    model.hf_model.config.vision_weights = "asset"
    state, seen = {}, set()
    for key, value in model.hf_model.state_dict().items():
        if key.startswith("vision_tower.") or value.data_ptr() in seen:  # the tower: from its asset; tied: once
            continue
        seen.add(value.data_ptr())
        state[key] = value.detach().half().contiguous()
    save_atomic(model, dst, state_dict=state, overwrite=True)
    tensors, meta = compact_adapter(paths["dvlm"].parent / "final-adapter")
    contiguous = {k: v.contiguous() for k, v in tensors.items()}
    write_file(dst / PARENT_FILE, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"}))
    weights = dst / "model.safetensors"
    manifest = {"format": "plain",
                "description": f"a {cfg.lm_layers}-layer, {cfg.lm_width}-wide Llama-architecture LM with SmolLM2's "
                               "tokenizer and chat template, trained from scratch on synthetic scenes only + "
                               "EfficientNet-Lite0 (frozen, from its asset package) + projector; AR-tuned, then "
                               "translated to block diffusion by `diffusionvl recipe tiny-vlm`. It knows only "
                               "the synthetic scenes (shapes, colours, counts, positions).",
                "recipe": asdict(cfg), "weights": {"file": weights.name, "sha256": _sha256(weights),
                                                   "bytes": weights.stat().st_size},
                "parent": {"file": PARENT_FILE, "scale": meta["scale"], "sha256": _sha256(dst / PARENT_FILE),
                           "tensors": len(tensors), "bytes": (dst / PARENT_FILE).stat().st_size},
                "results": {k: results.get(k) for k in ("facts", "rows", "description", "stages", "targets",
                                                         "one_object", "floor", "curriculum")}}
    write_json(dst / MANIFEST, manifest)
    return dst


def export_default(paths: dict[str, Path], dst: Path, cfg: Any, results: dict[str, Any]) -> Path:
    """Write the compact default-model files from a finished recipe run (atomically, file by file); `results` (the
    recipe's results.json payload: tables, targets, stage timings) goes into the manifest."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    if getattr(cfg, "lm", "smollm2") == "tiny":
        return export_plain(paths, dst, cfg, results)
    adapters = []
    ar_stages = sorted((k for k in paths if k.startswith("ar_stage")), key=lambda k: int(k[len("ar_stage"):]))
    runs = [(paths[k].parent.name, paths[k]) for k in ar_stages] or [("stage2", paths["ar_vlm"])]
    for name, run in runs + [("translate", paths["dvlm"])]:  # each stage's LoRA trained on the previous merged
        tensors, meta = compact_adapter(run.parent / "final-adapter")
        file = dst / f"{name}.safetensors"
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        write_file(file, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"}))
        adapters.append({"name": name, "file": file.name, "scale": meta["scale"], "sha256": _sha256(file),
                         "tensors": len(tensors), "bytes": file.stat().st_size})
    recipe = asdict(cfg)
    vision = json.loads((paths["ar_vlm"] / "config.json").read_text()).get("vision", {})
    manifest = {"format": "adapters", "description": "SmolLM2-135M-Instruct + EfficientNet-Lite0, AR-tuned then translated to "
                "block diffusion on synthetic visual QA by `diffusionvl recipe tiny-vlm`",
                "recipe": recipe, "adapters": adapters, "vision_standardize": vision.get("standardize"),
                "results": {k: results.get(k) for k in ("facts", "rows", "description", "stages", "targets")}}
    write_json(dst / MANIFEST, manifest)
    return dst
