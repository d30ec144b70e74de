"""Checkpoints on disk: layout, atomic export, finding the one to resume from, pruning, merging LoRA.

Contract: a periodic checkpoint is the folder `OUTPUT/checkpoint-STEP/` holding
    the model in Hugging Face format (config.json, safetensors, tokenizer/processor, diffusionvl.json: loadable with
    `diffusionvl.load`), or, for LoRA runs, the peft adapter (adapter_config.json + adapter_model.safetensors) with
    the processor and diffusionvl.json (merge it with `merge_lora`);
    accelerate_state/ (model, optimizer, scheduler, RNG states, as `Accelerator.save_state` writes them);
    trainer_state.json (step, epoch, position in the epoch, global batch), written last.
It is assembled in a hidden temporary sibling and renamed into place, so a checkpoint folder either is complete or
does not exist. The final model goes to `OUTPUT/final/` (LoRA: the adapter to `OUTPUT/final-adapter/`, the merged
model to `OUTPUT/final/`), also atomically.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from diffusionvl.core.atomic import write_folder
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.jobs.train.parts import quiet_peft

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
ACCELERATE_DIR = "accelerate_state"
BACKBONE_PREFIX = "model.hf_model."  # state-dict prefix of the backbone inside the trained module


def checkpoints(output: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output`, oldest first."""
    root = Path(output)
    found = []
    for child in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        match = re.fullmatch(rf"{PREFIX}(\d+)", child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_resume(resume: str | None, output: str | os.PathLike[str]) -> Path | None:
    """'auto' -> the latest checkpoint in `output` (None if there is none); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        found = checkpoints(output)
        return found[-1][1] if found else None
    path = Path(resume)
    check((path / STATE_FILE).is_file(), f"cannot resume from {path}: not a checkpoint folder (no {STATE_FILE})")
    return path


def backbone_state(state_dict: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The backbone's entries of the trained module's state dict, renamed to `prefix` + the backbone's own keys."""
    return {prefix + k[len(BACKBONE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(BACKBONE_PREFIX)}


def save_adapter(model: Any, peft_model: Any, path: Path, state_dict: dict[str, torch.Tensor] | None) -> Path:
    """LoRA adapter + processor + diffusion config, written atomically to `path`."""

    def write(tmp: Path) -> None:
        sd = backbone_state(state_dict, "base_model.model.") if state_dict is not None else None
        peft_model.save_pretrained(tmp, state_dict=sd)
        model.processor.save_pretrained(tmp)
        (tmp / "diffusionvl.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")

    return write_folder(path, write)


def export(model: Any, path: Path, state_dict: dict[str, torch.Tensor] | None, peft_model: Any = None) -> Path:
    """The trained model in its user-facing form (HF folder, or LoRA adapter folder) at `path`, atomically."""
    if peft_model is not None:
        return save_adapter(model, peft_model, path, state_dict)
    from diffusionvl.model.modeling import save_atomic

    return save_atomic(model, path, state_dict=backbone_state(state_dict) if state_dict is not None else None)


# what a run writes besides its checkpoints; and the temporary names its saves and prunes use
RUN_FILES = ("final", "final-adapter", "log.jsonl", "summary.json", "tensorboard")
_TEMP = re.compile(r"^\.+(checkpoint-\d+|final|final-adapter)(\.tmp)?(\.tmp-[0-9a-f]+)?(\.tmp)?$")


def remove_temporaries(output: str | os.PathLike[str]) -> list[str]:
    """Delete what an interrupted save of this trainer can leave in `output` (.checkpoint-N.tmp, the atomic
    writer's .NAME.tmp-XXXX siblings); returns their names. Only names the trainer writes are touched."""
    root = Path(output)
    gone = []
    for path in root.iterdir() if root.is_dir() else []:
        if _TEMP.match(path.name):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            gone.append(path.name)
    return gone


def check_output(output: str | os.PathLike[str], resume: str | None, overwrite: bool) -> list[Path]:
    """A new run goes into a missing or empty folder; a non-empty one needs `resume` (continue it) or `overwrite`
    (start over). Returns what an overwrite must remove first: the earlier run's own files, nothing else."""
    root = Path(output)
    check(not root.exists() or root.is_dir(), f"--output {root} exists and is not a folder; choose a folder")
    if resume is not None or not root.is_dir() or not any(root.iterdir()):
        return []
    check(overwrite, f"--output {root} is not empty (an earlier run?): pass --resume auto to continue it, "
                     "--overwrite true to start over in it, or choose another folder")
    return [path for _, path in checkpoints(root)] + [root / name for name in RUN_FILES if (root / name).exists()]


def prune(output: str | os.PathLike[str], keep: int) -> list[Path]:
    """Delete all but the newest `keep` checkpoints (keep = 0: delete none). Each is first renamed out of the
    checkpoint namespace (one atomic step), then deleted: an interrupt mid-delete leaves a hidden temporary for
    `remove_temporaries`, never a checkpoint-N with half its files."""
    found = checkpoints(output)
    doomed = [p for _, p in found[:-keep]] if keep > 0 else []
    for p in doomed:
        hidden = p.with_name(f".{p.name}.tmp")
        os.replace(p, hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    return doomed


def merge_lora(adapter: str | os.PathLike[str], output: str | os.PathLike[str], base: str | None = None,
               dtype: str | None = None) -> Path:
    """Base model + LoRA adapter folder -> a full diffusion model at `output` (atomically)."""
    from peft import PeftModel

    from diffusionvl.model.conversion import load
    from diffusionvl.model.modeling import save_atomic

    adapter = Path(adapter)
    cfg_file = adapter / "adapter_config.json"
    check(cfg_file.is_file(), f"{adapter} is not a LoRA adapter folder (no adapter_config.json)")
    base = base or json.loads(cfg_file.read_text()).get("base_model_name_or_path")
    check(bool(base) and Path(base).is_dir(), f"base model of {adapter} not found ({base}); pass it explicitly")
    model = load(base, device="cpu", dtype=dtype or "float32")
    try:
        with quiet_peft():
            merged = PeftModel.from_pretrained(model.hf_model, adapter).merge_and_unload()
    except (ValueError, RuntimeError, KeyError) as exc:
        raise DiffusionVLError(f"cannot merge {adapter} into {base}: {str(exc).splitlines()[0]}") from None
    model.hf_model = merged
    model.adapter.model = merged
    return save_atomic(model, output)
