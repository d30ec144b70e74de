"""TrainConfig: every knob of `diffusionvl train`, as one typed dataclass.

Contract: each field has a `help` (it becomes the `--flag` help of the CLI through `add_dataclass_arguments`); a
config can also be read from a YAML/JSON file (`TrainConfig.from_file`) whose keys are the field names, and flags
given on the command line override the file. `validate()` turns every bad value into one-line `DiffusionVLError`.
Sizes: `batch_size` is per process and per micro-step; the global batch of one optimizer step is
batch_size x processes x grad_accum.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from diffusionvl.core.config import load_config_file, option
from diffusionvl.core.errors import check

PARTS = ("vision", "projector", "language")


@dataclass
class TrainConfig:
    """Diffusion finetuning of a converted model on LLaVA / OpenAI-messages data."""

    # ---- what to train on, where to write --------------------------------------------------------------------
    model: str | None = option(None, "Diffusion model folder to finetune (made by `diffusionvl convert`).")
    data: str | None = option(None, "Training data: LLaVA JSON/JSONL or OpenAI-style `messages` JSONL.")
    image_folder: str | None = option(None, "Folder that relative image paths are read from (default: the data "
                                      "file's folder).")
    output: str | None = option(None, "Output folder: checkpoints, final model, log.jsonl, summary.json.")
    eval_data: str | None = option(None, "Held-out data file for the eval loss (same formats as --data).")
    eval_size: float = option(0.0, "Hold out this part of --data for the eval loss when --eval-data is not given: "
                              "a fraction if < 1, else a number of samples (0 = no eval).")
    resume: str | None = option(None, "Continue from a checkpoint folder, or 'auto' = the latest checkpoint in "
                                "--output (starts fresh when there is none).")
    overwrite: bool = option(False, "Start a new run in a non-empty --output: the earlier run's checkpoints, final "
                             "model, log and summary are removed first (other files are kept). Without it (or "
                             "--resume), a non-empty --output is refused.")
    objective: Literal["bd3", "ar"] = option(
        "bd3", "Training objective: 'bd3' = block diffusion (the translation); 'ar' = next-token cross entropy of the "
        "same backbone (AR instruction tuning, e.g. before translating a freshly composed VLM).")
    # ---- optimization ------------------------------------------------------------------------------------------
    lr: float = option(2e-5, "Peak learning rate (AdamW).")
    lr_vision: float | None = option(None, "Learning rate of the vision tower (default: --lr).")
    lr_projector: float | None = option(None, "Learning rate of the vision-to-language projector (default: --lr).")
    lr_language: float | None = option(None, "Learning rate of the language model (default: --lr).")
    freeze: list[str] = option(["vision"], "Parts kept frozen: any of vision, projector, language.")
    token_cache: str | None = option(None, "File that caches the frozen vision tower's tokens per image: computed "
                                     "once, reused every epoch and by later runs with the same tower.")
    weight_decay: float = option(0.0, "AdamW weight decay (not applied to biases and norm weights).")
    adam_beta1: float = option(0.9, "AdamW beta1 (decay of the gradient's running mean).")
    adam_beta2: float = option(0.999, "AdamW beta2 (decay of the squared gradient's running mean; 0.95 adapts "
                               "faster, as LMs trained from scratch usually use).")
    lr_scheduler: Literal["cosine", "linear", "constant"] = option("cosine", "Learning-rate schedule after warmup.")
    warmup_ratio: float = option(0.03, "Linear warmup over this fraction of the optimizer steps.")
    warmup_steps: int | None = option(None, "Linear warmup over this many optimizer steps (overrides "
                                      "--warmup-ratio).")
    epochs: int = option(1, "Passes over the training data (ignored when --max-steps is set).")
    max_steps: int | None = option(None, "Total optimizer steps (default: epochs x steps per epoch).")
    batch_size: int = option(1, "Samples per process per micro-step.")
    grad_accum: int = option(1, "Micro-steps accumulated per optimizer step.")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this value (0 = no clipping).")
    bf16: bool | None = option(None, "bf16 mixed precision (default: on where CUDA supports bf16, else off, or "
                               "what `accelerate launch --mixed_precision` says).")
    dtype: str = option("float32", "Dtype the weights are loaded and updated in (float32 = fp32 master weights).")
    gradient_checkpointing: bool = option(False, "Recompute activations in the backward pass (less memory).")
    attention: Literal["auto", "sdpa", "flex_attention", "eager"] = option(
        "auto", "Attention backend for training: auto = FlexAttention BlockMask on CUDA, SDPA elsewhere.")
    seed: int = option(0, "Seed of data order, masking noise and initialization of new weights.")
    cpu: bool = option(False, "Train on CPU even when a GPU is there (processes started by torchrun without CUDA "
                       "use CPU + gloo automatically).")
    # ---- data ----------------------------------------------------------------------------------------------
    max_length: int = option(2048, "Longest training sequence in tokens (prompt + image tokens + answer + EOS "
                             "padding), rounded down to a multiple of the block size.")
    overlong: Literal["truncate", "skip"] = option(
        "truncate", "Samples longer than --max-length: 'truncate' cuts them (never inside an image) and trains on "
        "what is left of the answer; 'skip' drops them. Both are counted and reported.")
    packing: bool = option(False, "Pack each multi-question sample into one row of isolated segments: every "
                           "question attends only to itself and to the shared image prefix (paid once), positions "
                           "restart after the prefix, so no question reads another's answer (train/packing.py).")
    loss_norm: Literal["sample", "segment", "token"] = option(
        "sample", "How token losses are averaged: 'sample' = each row's mean, then the batch mean; 'segment' = each "
        "packed question's mean, then the mean over questions; 'token' = the mean over the batch's loss tokens.")
    shuffle: bool = option(True, "Shuffle the training data every epoch (seeded).")
    num_workers: int = option(2, "DataLoader worker processes that load images and tokenize (0 = in the main "
                              "process).")
    # ---- LoRA ----------------------------------------------------------------------------------------------
    lora: bool = option(False, "Train LoRA adapters (peft) on the language model instead of its full weights.")
    lora_r: int = option(16, "LoRA rank.")
    lora_alpha: float = option(32.0, "LoRA alpha (scale = alpha / r).")
    lora_dropout: float = option(0.05, "Dropout on the LoRA input.")
    lora_targets: list[str] = option([], "Module names to adapt (default: every linear layer of the language model "
                                     "except the output head).")
    lora_modules_to_save: list[str] = option([], "Extra modules trained in full and saved with the adapter "
                                             "(e.g. embed_tokens lm_head).")
    lora_merge: bool = option(True, "Also write the base model with the adapter merged in as the final model.")
    # ---- logging and checkpoints ---------------------------------------------------------------------------
    log_every: int = option(10, "Log loss, tokens/s and learning rate every N optimizer steps.")
    eval_every: int = option(0, "Compute the eval loss every N optimizer steps (0 = only at the end).")
    eval_batch_size: int | None = option(None, "Samples per process per eval forward (default: --batch-size).")
    grounding_data: str | None = option(None, "Held-out questions (an eval JSONL: image, question, answers, type) "
                                        "answered at every eval: accuracy per question type goes to the log.")
    grounding_samples: int = option(64, "How many --grounding-data questions each eval answers.")
    min_image_dependence: float = option(0.0, "Stop when, after --grounding-patience-s seconds, the eval loss with "
                                         "the images rolled across the batch exceeds the loss with the right images "
                                         "by less than this (the model ignores the picture; 0 = never stop).")
    grounding_patience_s: float = option(600.0, "Seconds of training before --min-image-dependence is enforced.")
    target_accuracy: float = option(0.0, "Stop (and save the final model) at the first eval where every question "
                                    "type of --grounding-data reaches this accuracy (0 = never).")
    plateau_s: float = option(0.0, "Stop when no question type of --grounding-data has improved its best accuracy "
                              "by --plateau-delta for this many seconds of training (0 = never).")
    plateau_delta: float = option(0.02, "Smallest gain in a type's held-out accuracy that counts as progress "
                                  "(--plateau-s).")
    save_every: int = option(500, "Write a resumable checkpoint every N optimizer steps (and at the end; "
                             "0 = only the final model).")
    keep_checkpoints: int = option(2, "Keep only the newest N periodic checkpoints (0 = keep all).")
    tensorboard: bool | None = option(None, "Also log to TensorBoard (default: when tensorboard is installed).")
    progress: bool = option(True, "Show a progress bar with loss, tokens/s and ETA.")

    # ---------------------------------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "TrainConfig":
        return load_config_file(path, cls)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def part_lr(self, part: str) -> float:
        value = {"vision": self.lr_vision, "projector": self.lr_projector, "language": self.lr_language}[part]
        return self.lr if value is None else value

    def validate(self) -> "TrainConfig":
        for name in ("model", "data", "output"):
            check(bool(getattr(self, name)), f"missing --{name}: give the {name} to train "
                  f"({TrainConfig.__dataclass_fields__[name].metadata['help']})")
        check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        check(0 <= self.seed < 2 ** 32, f"seed must be in 0..{2 ** 32 - 1} (numpy's range), got {self.seed}")
        for part in PARTS:
            check(self.part_lr(part) >= 0, f"lr_{part} must be >= 0, got {self.part_lr(part)}")
        bad = sorted(set(self.freeze) - set(PARTS))
        check(not bad, f"unknown part(s) in freeze: {', '.join(bad)} (choose from {', '.join(PARTS)})")
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "lora_r"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        for name in ("eval_every", "save_every", "keep_checkpoints", "num_workers"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 0, f"{name} must be an integer >= 0, got {value!r}")
        check(self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        check(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size must be >= 1")
        check(self.max_length >= 1, f"max_length must be >= 1, got {self.max_length}")
        check(0.0 <= self.warmup_ratio < 1.0, f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        check(self.warmup_steps is None or self.warmup_steps >= 0, "warmup_steps must be >= 0")
        check(self.eval_size >= 0, f"eval_size must be >= 0, got {self.eval_size}")
        check(self.weight_decay >= 0 and self.max_grad_norm >= 0, "weight_decay and max_grad_norm must be >= 0")
        check(0.0 <= self.lora_dropout < 1.0, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        check(self.lr_scheduler in ("cosine", "linear", "constant"), f"unknown lr_scheduler {self.lr_scheduler!r}")
        check(self.objective in ("bd3", "ar"), f"objective must be bd3 or ar, got {self.objective!r}")
        check(self.loss_norm in ("sample", "segment", "token"),
              f"loss_norm must be sample, segment or token, got {self.loss_norm!r}")
        check(0.0 <= self.adam_beta1 < 1.0 and 0.0 <= self.adam_beta2 < 1.0,
              f"adam_beta1 and adam_beta2 must be in [0, 1), got {self.adam_beta1}, {self.adam_beta2}")
        check(0.0 <= self.target_accuracy <= 1.0, f"target_accuracy must be in [0, 1], got {self.target_accuracy}")
        check(self.plateau_s >= 0 and self.plateau_delta >= 0, "plateau_s and plateau_delta must be >= 0")
        check(not (self.target_accuracy or self.plateau_s) or self.grounding_data,
              "--target-accuracy and --plateau-s watch --grounding-data: give it too")
        check(not (self.target_accuracy or self.plateau_s) or (self.eval_every > 0 and (self.eval_data or
                                                                                        self.eval_size > 0)),
              "--target-accuracy and --plateau-s are decided at evals: give --eval-every N and --eval-data (or "
              "--eval-size)")
        check(self.grounding_samples >= 1, f"grounding_samples must be >= 1, got {self.grounding_samples}")
        check(self.min_image_dependence >= 0 and self.grounding_patience_s >= 0,
              "min_image_dependence and grounding_patience_s must be >= 0")
        check(self.overlong in ("truncate", "skip"), f"overlong must be truncate or skip, got {self.overlong!r}")
        check(self.attention in ("auto", "sdpa", "flex_attention", "eager"),
              f"attention must be auto, sdpa, flex_attention or eager, got {self.attention!r}")
        return self
