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

Resuming (`resume(...)`) trusts nothing on disk: `damage(path)` names the first file of a checkpoint that cannot be
resumed from and why (trainer_state.json unreadable, or a step, epoch or batch that is not a non-negative integer;
accelerate_state/ missing; an empty state file; a safetensors file whose header does not read; RNG states that do
not unpickle); a step outside [0, the run's total steps] is refused; `--resume auto` skips a damaged newest
checkpoint, saying so, and takes the newest sound one; an explicit damaged checkpoint, or state that still fails to
load, is one `DiffusionVLError` naming the file: never a silent fresh start or a jump past the run's end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
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


STATE_FIELDS = ("step", "epoch", "step_in_epoch", "global_batch")


def read_state(path: Path) -> dict[str, Any]:
    """trainer_state.json of checkpoint `path`, its counters checked to be non-negative integers."""
    file = path / STATE_FILE
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeError, ValueError) as exc:
        raise DiffusionVLError(f"{file} is unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None
    check(isinstance(saved, dict), f"{file} is not a JSON object")
    for name in STATE_FIELDS:
        value = saved.get(name)
        check(type(value) is int and value >= 0, f"{file}: {name!r} must be a non-negative integer, got {value!r}")
    return saved


def damage(path: Path, process_index: int = 0) -> str | None:
    """Why checkpoint `path` cannot be resumed from (naming the file), or None (module docstring)."""
    try:
        read_state(path)
    except DiffusionVLError as exc:
        return str(exc)
    state = path / ACCELERATE_DIR
    if not state.is_dir():
        return f"{state} is missing (the optimizer, scheduler and RNG states)"
    for file in sorted(state.iterdir()):
        if file.is_file() and file.stat().st_size == 0:
            return f"{file} is empty (0 bytes)"
    for file in sorted(path.glob("*.safetensors")) + sorted(state.glob("*.safetensors")):
        problem = _safetensors_damage(file)
        if problem:
            return f"{file} is damaged ({problem})"
    return _rng_damage(state / f"random_states_{process_index}.pkl")


def _safetensors_damage(file: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            handle.keys()
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: the header does not read
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else 'unreadable'}"
    return None


def _rng_damage(file: Path) -> str | None:
    """accelerate ignores RNG states that fail to load (a resumed run would silently draw other numbers)."""
    from accelerate.utils import load

    if not file.is_file():
        return f"{file} is missing (the RNG states)"
    try:
        states = load(file)
    except Exception as exc:  # noqa: BLE001 - whatever unpickling random bytes raises
        return f"{file} is damaged ({type(exc).__name__})"
    keys = ("random_state", "numpy_random_seed", "torch_manual_seed")
    return None if isinstance(states, dict) and all(k in states for k in keys) else f"{file} holds no RNG states"


def resolve_resume(resume: str | None, output: str | os.PathLike[str], process_index: int = 0) -> Path | None:
    """'auto' -> the newest sound checkpoint in `output` (damaged newer ones are skipped with a message on stderr;
    None if there is none); a path -> that checkpoint, refused in one line when damaged."""
    if not resume:
        return None
    if resume == "auto":
        for _, path in reversed(checkpoints(output)):
            problem = damage(path, process_index)
            if problem is None:
                return path
            print(f"warning: --resume auto skips {path.name}: {problem}", file=sys.stderr, flush=True)
        return None
    path = Path(resume)
    check((path / STATE_FILE).is_file(), f"cannot resume from {path}: not a checkpoint folder (no {STATE_FILE})")
    problem = damage(path, process_index)
    check(problem is None, f"cannot resume from {path}: {problem}")
    return path


def resume(accelerator: Any, resume_arg: str | None, output: str | os.PathLike[str], total_steps: int,
           global_batch: int) -> tuple[Path, dict[str, Any]] | None:
    """Restore the checkpoint `resume_arg` names into `accelerator` (model, optimizer, scheduler, RNG states) and
    return (its folder, its trainer state), or None when there is nothing to resume (module docstring)."""
    path = resolve_resume(resume_arg, output, accelerator.process_index)
    if path is None:
        return None
    saved = read_state(path)
    check(saved["step"] <= total_steps, f"cannot resume from {path}: {path / STATE_FILE} says step {saved['step']}, "
                                        f"outside 0..{total_steps} (this run's total steps)")
    check(saved["global_batch"] == global_batch,
          f"cannot resume {path}: it was trained with a global batch of {saved['global_batch']}, this run has "
          f"{global_batch} (batch_size x processes x grad_accum)")
    try:
        accelerator.load_state(str(path / ACCELERATE_DIR))
    except Exception as exc:  # noqa: BLE001 - torch / safetensors / pickle errors of a damaged state file
        reason = str(exc).splitlines()[0][:160] if str(exc) else "unreadable"
        raise DiffusionVLError(f"cannot resume from {path}: {path / ACCELERATE_DIR} failed to load "
                               f"({type(exc).__name__}: {reason})") from None
    return path, saved


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
    from diffusionvl.model.modeling import MODEL_MARKER, save_atomic

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
    trained = adapter / MODEL_MARKER  # the run's own diffusion settings: a BD3 run's merge is no fresh conversion
    if trained.is_file():
        model.config.bd3_trained = bool(json.loads(trained.read_text()).get("bd3_trained", True))
    return save_atomic(model, output)
