"""Which parameters train, at which learning rate: model parts, freezing, optimizer groups, LoRA.

Contract: every backbone parameter belongs to one part, "vision" (the vision tower), "projector" (vision features
-> language embeddings) or "language" (everything else: embeddings, decoder, head), decided by the first rule of
`PART_RULES` whose marker occurs in its dotted name (compositions add their own markers there). A part listed in
`freeze`, or whose learning rate is 0, gets requires_grad=False. `param_groups` gives AdamW one group per
(part, decay) with the part's learning rate; biases and other 1-D weights (norms) get no weight decay.
`apply_lora` injects peft LoRA adapters (default targets: every nn.Linear of the language part except the output
head) into the backbone in place and freezes everything else but `lora_modules_to_save`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Iterator

from torch import nn

from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.jobs.train.config import TrainConfig

# (part, markers in the dotted parameter name); first match wins, no match = "language"
PART_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("projector", (".visual.merger.", ".multi_modal_projector.", ".mm_projector.", ".vision_projector.")),
    ("projector", ("^projector.",)),  # diffusionvl_llava compositions (compose.py): a top-level `projector`
    ("projector", (".image_newline.",)),  # LLaVA-NeXT row separator (anyres): new, trained with the projector
    ("vision", (".visual.", ".vision_tower.", ".vision_model.", ".vision_encoder.")),
]


def part_of(name: str) -> str:
    """The part of a backbone parameter name (a marker starting with '^' must start the name)."""
    dotted = f".{name}."
    for part, markers in PART_RULES:
        if any(name.startswith(m[1:]) if m.startswith("^") else m in dotted for m in markers):
            return part
    return "language"


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))  # DeepSpeed ZeRO-3 partitions: the full size


def configure_trainable(model: Any, cfg: TrainConfig) -> dict[str, int]:
    """Freeze parts (full finetuning); returns trainable parameter counts per part."""
    counts: Counter = Counter()
    for name, p in model.hf_model.named_parameters():
        part = part_of(name)
        train = part not in cfg.freeze and cfg.part_lr(part) > 0
        p.requires_grad_(train)
        if train:
            counts[part] += _numel(p)
    if not counts:
        raise DiffusionVLError("nothing to train: every part of this model is frozen (see --freeze and the "
                               "per-part learning rates)")
    return dict(counts)


def param_groups(model: Any, cfg: TrainConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.hf_model.named_parameters():
        if p.requires_grad:
            groups.setdefault((part_of(name), p.ndim >= 2), []).append(p)
    return [{"params": params, "lr": cfg.part_lr(part), "weight_decay": cfg.weight_decay if decay else 0.0,
             "name": f"{part}{'' if decay else '/no_decay'}"} for (part, decay), params in sorted(groups.items())]


def default_lora_targets(model: Any) -> list[str]:
    """Full names of the language model's linear layers, output head excluded."""
    head = model.hf_model.get_output_embeddings()
    return [name for name, mod in model.hf_model.named_modules()
            if isinstance(mod, nn.Linear) and mod is not head and part_of(name) == "language"]


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model (transformers >= 5.2x
    warns with a FutureWarning): nothing a user of ours can act on, so it is silenced around peft calls only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model: Any, cfg: TrainConfig) -> Any:
    """Inject LoRA adapters into model.hf_model in place; returns the PeftModel (for saving the adapter)."""
    from peft import LoraConfig, get_peft_model

    targets = cfg.lora_targets or default_lora_targets(model)
    if not targets:
        raise DiffusionVLError("no linear layers to put LoRA adapters on; name them with --lora-targets")
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
                      target_modules=targets, modules_to_save=cfg.lora_modules_to_save or None)
    try:
        with quiet_peft():
            peft_model = get_peft_model(model.hf_model, lora)
    except ValueError as exc:
        raise DiffusionVLError(f"cannot apply LoRA: {str(exc).splitlines()[0]}") from None
    peft_model.peft_config["default"].base_model_name_or_path = str(Path(cfg.model).resolve())
    return peft_model


def trainable_counts(model: Any) -> dict[str, int]:
    counts: Counter = Counter()
    for name, p in model.hf_model.named_parameters():
        if p.requires_grad:
            counts[part_of(name)] += _numel(p)
    return dict(counts)


# ---- freezing whole parts (the LLaVA training stages) ---------------------------------------------------------------
PARTS = ("vision", "projector", "language")
# The two stages of the modality shift: 1 = align the projector (encoder and LM frozen), 2 = train everything.
# "stage2_frozen_tower" is stage 2 with the encoder kept frozen (LLaVA-1.5's choice; much cheaper on CPU, where the
# backward of EfficientNet's depthwise convolutions is slow).
STAGES: dict[str, tuple[str, ...]] = {"stage1": ("projector",), "stage2": PARTS,
                                      "stage2_frozen_tower": ("projector", "language")}


def _hf_model(model: Any) -> Any:
    """The transformers model inside a DiffusionVLModel / PEFT wrapper (or the model itself)."""
    model = getattr(model, "hf_model", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def parameters_by_part(model: Any) -> dict[str, list[nn.Parameter]]:
    """{"vision": [...], "projector": [...], "language": [...]}: every parameter exactly once (`part_of`).

    Works on composed VLMs, Qwen2-VL/Qwen2.5-VL (`model.visual` = tower, `visual.merger` = projector), HF LLaVA and
    text-only LMs (all `language`); accepts a DiffusionVLModel too. Shared (tied) parameters count once.
    """
    groups: dict[str, list[nn.Parameter]] = {part: [] for part in PARTS}
    for name, param in _hf_model(model).named_parameters():  # deduplicated: tied weights appear once
        groups[part_of(name)].append(param)
    return groups


def set_trainable(model: Any, parts: Iterable[str]) -> dict[str, int]:
    """Train only `parts` (names from PARTS, or a STAGES key); returns the trainable parameter count per part."""
    parts = STAGES[parts] if isinstance(parts, str) and parts in STAGES else tuple(parts)
    unknown = sorted(set(parts) - set(PARTS))
    check(not unknown, f"unknown model part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    counts = {}
    for part, params in parameters_by_part(model).items():
        for p in params:
            p.requires_grad_(part in parts)
        counts[part] = sum(p.numel() for p in params) if part in parts else 0
    return counts


def parameter_counts(model: Any) -> dict[str, int]:
    """Number of parameters per part (and "total")."""
    counts = {part: sum(p.numel() for p in params) for part, params in parameters_by_part(model).items()}
    return {**counts, "total": sum(counts.values())}
