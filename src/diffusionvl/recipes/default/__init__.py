"""The embedded default model: a tiny pretrained diffusion VLM that runs right after `pip install`, offline, on CPU.

Contract: the package ships only what training changed, in fp16 (a few MB): the LoRA factors of the AR
instruction-tuning stage and of the translation to diffusion, and the projector. `load_default()` rebuilds the
exact starting point of the tiny-VLM recipe from the offline assets (SmolLM2-135M-Instruct + EfficientNet-Lite0 +
projector, mask token added; `recipes.tiny_model.build_init`), then merges the shipped adapters in recipe order
(W += alpha / r * B @ A; saved modules replace their weights). `export_default` writes those files from a finished
recipe run. A missing asset package raises a one-line error naming the pip command.
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
PEFT_PREFIX = "base_model.model."


def default_folder() -> Path:
    return Path(os.environ.get("DIFFUSIONVL_DEFAULT_DIR", HERE))


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
    recipe = manifest["recipe"]
    model = build_init(config_from_dict(recipe), manifest.get("vision_standardize"))
    stages = manifest["adapters"][:1] if parent else manifest["adapters"]
    for stage in stages:
        path = folder / stage["file"]
        check(path.is_file(), f"embedded default model is incomplete: {path} is missing (reinstall diffusionvl)")
        if _sha256(path) != stage["sha256"]:
            raise DiffusionVLError(f"embedded default model file {path.name} is corrupt (checksum mismatch); "
                                   "reinstall diffusionvl")
        merge_compact(model.hf_model, load_file(path), stage["scale"])
    dev = default_device(device)
    model.hf_model.to(device=dev, dtype=default_dtype(dtype, dev)).eval()
    model.autoregressive_only = parent
    return model


def export_default(paths: dict[str, Path], dst: Path, cfg: Any, results: dict[str, Any]) -> Path:
    """Write the compact default-model files from a finished recipe run (atomically, file by file); `results` (the
    recipe's results.json payload: tables, targets, stage timings) goes into the manifest."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    adapters = []
    for name, run in (("stage2", paths["ar_vlm"]), ("translate", paths["dvlm"])):
        tensors, meta = compact_adapter(run.parent / "final-adapter")
        file = dst / f"{name}.safetensors"
        contiguous = {k: v.contiguous() for k, v in tensors.items()}
        write_file(file, lambda tmp: save_file(contiguous, str(tmp), metadata={"format": "pt"}))
        adapters.append({"name": name, "file": file.name, "scale": meta["scale"], "sha256": _sha256(file),
                         "tensors": len(tensors), "bytes": file.stat().st_size})
    recipe = asdict(cfg)
    vision = json.loads((paths["ar_vlm"] / "config.json").read_text()).get("vision", {})
    manifest = {"description": "SmolLM2-135M-Instruct + EfficientNet-Lite0, AR-tuned then translated to "
                "block diffusion on synthetic visual QA by `diffusionvl recipe tiny-vlm`",
                "recipe": recipe, "adapters": adapters, "vision_standardize": vision.get("standardize"),
                "results": {k: results.get(k) for k in ("facts", "rows", "description", "stages", "targets")}}
    write_json(dst / MANIFEST, manifest)
    return dst
