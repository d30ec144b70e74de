"""The finetuning loop, on accelerate (DDP, FSDP, DeepSpeed ZeRO come from `accelerate launch`, never from here).

Contract (`train(TrainConfig) -> summary dict`, `Trainer(cfg).fit()`):
- Loads a converted model, switches its language model to the training attention backend (FlexAttention
  BlockMask on CUDA, SDPA elsewhere: `attention.training_backend`; `--attention` forces one), applies freezing /
  per-part learning rates or LoRA, and trains `TrainModule` (forward = `DiffusionVLModel.training_loss`) with
  AdamW, a warmup + cosine/linear/constant schedule, gradient accumulation (`accelerator.accumulate`), clipping.
- Data: `read_records` -> `SFTDataset` -> `GlobalBatchSampler` -> `Collator`. Every optimizer step consumes one
  global batch; the masking noise of each sample is keyed by (seed, step, its position in the global batch)
  (train/noise.py), so the loss of a step does not depend on how the global batch is split over processes and
  micro-steps, and a resumed run reproduces the uninterrupted one.
- The step itself does no host sync of its own: losses and counters accumulate on the device and are reduced
  across processes every `log_every` steps (the model's loss gathers its masked rows with `nonzero`).
- `packing` packs each multi-question record into one row of isolated segments (train/packing.py); `loss_norm`
  says how token losses are averaged (per sample, per packed segment, or per token).
- Every eval logs the eval loss, the eval loss with the images rolled across the batch and their difference (image
  dependence), and, with `grounding_data`, accuracy per question type on held-out questions (train/grounding.py).
  With `min_image_dependence`, a run whose image dependence is still below it after `grounding_patience_s`
  seconds stops with one line (the model is not looking at the picture) instead of training on.
- A stage can end before its planned steps, with its final model saved as usual: `target_accuracy` (every type of
  the grounding questions at or above it) or `plateau_s` (no type's best accuracy has risen by `plateau_delta` for
  that many seconds). The reason is `summary["stopped"]`. The plateau clock restarts on --resume.
- Logs go to OUTPUT/log.jsonl (+ TensorBoard), checkpoints to OUTPUT/checkpoint-STEP (checkpoint.py), the final
  model to OUTPUT/final, the run's summary to OUTPUT/summary.json. `resume` restores model, optimizer, scheduler,
  RNG (accelerate state) and the data position (epoch, step in epoch).
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from diffusionvl.core import atomic, attention
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.jobs.train import checkpoint as ckpt
from diffusionvl.jobs.train import noise
from diffusionvl.jobs.train.collator import Collator
from diffusionvl.jobs.train.config import TrainConfig
from diffusionvl.jobs.train.data import SFTDataset, read_records, split_records
from diffusionvl.jobs.train.encode import SampleEncoder
from diffusionvl.jobs.train.grounding import GroundingProbe, roll_images
from diffusionvl.jobs.train.packing import PackingEncoder
from diffusionvl.jobs.train.parts import apply_lora, configure_trainable, param_groups, trainable_counts
from diffusionvl.jobs.train.sampler import EvalSampler, GlobalBatchSampler
from diffusionvl.jobs.train.tracking import Tracker

Tensor = torch.Tensor
EVAL_STEP = 0x7FFFFFFF  # noise key of every eval pass: the same masks each time (comparable eval losses)
MAX_REPORTED = 5


class TrainModule(nn.Module):
    """What accelerate wraps: forward(batch, rates, draw) -> (mean loss, per-sample losses [N])."""

    def __init__(self, model: nn.Module, objective: str = "bd3", norm: str = "sample"):
        super().__init__()
        self.model = model
        self.objective = objective
        self.norm = norm

    @property
    def _no_split_modules(self) -> list[str] | None:  # FSDP auto-wrap: the backbone's transformer blocks
        return getattr(self.model.hf_model, "_no_split_modules", None)

    def forward(self, batch: dict[str, Any], rates: Tensor, draw: Tensor) -> tuple[Tensor, Tensor]:
        if self.objective == "ar":
            out = self.model.ar_loss(batch, norm=self.norm)
        else:
            out = self.model.training_loss(batch, rates=rates, draw=draw, norm=self.norm)
        return out.loss, out.per_sample


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps done in `epoch`


# ---- set-up helpers -------------------------------------------------------------------------------------------
def _model_has_vision(path: str) -> bool:
    from diffusionvl.backbone.adapters import adapter_class
    from diffusionvl.model.compat import hustvl

    config_file = Path(path, "config.json")
    check(config_file.is_file(), f"model not found: {path} (give a folder made by `diffusionvl convert`)")
    if hustvl.detect(path) is not None:  # the paper's released layouts are all VLMs; `load` reads them directly
        return True
    return adapter_class(json.loads(config_file.read_text()).get("model_type", "")).has_vision


def make_accelerator(cfg: TrainConfig, find_unused: bool) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, is_tensorboard_available

    AcceleratorState._reset_state()  # a second run in one process (tests, notebooks) starts clean
    GradientState._reset_state()
    precision = None if cfg.bf16 is None else ("bf16" if cfg.bf16 else "no")
    if precision is None and not os.environ.get("ACCELERATE_MIXED_PRECISION"):
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    check(not (cfg.tensorboard and not is_tensorboard_available()),
          "tensorboard is not installed: pip install tensorboard, or drop --tensorboard")
    tensorboard = cfg.tensorboard if cfg.tensorboard is not None else is_tensorboard_available()
    # without CUDA, processes started by torchrun would otherwise each train alone: make them CPU + gloo
    cpu = cfg.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    return Accelerator(cpu=cpu, gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision,
                       log_with=["tensorboard"] if tensorboard else None, project_dir=cfg.output,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
                       step_scheduler_with_optimizer=False)


def choose_attention(requested: str, device: torch.device) -> str:
    impl = attention.training_backend(device) if requested == "auto" else requested
    check(impl != "flex_attention" or device.type == "cuda",
          "flex_attention training needs a CUDA device (FlexAttention has no backward on CPU); use --attention sdpa")
    return impl


def set_attention(model: Any, impl: str) -> None:
    """Switch the language model (only) to `impl` via transformers' set_attn_implementation."""
    if attention.attn_implementation(model.adapter.text_config) == impl:
        return
    hf = model.hf_model
    hf.set_attn_implementation({"text_config": impl} if "text_config" in getattr(hf.config, "sub_configs", {})
                               else impl)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (loading / writing shards) inside: they would break the training bar."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def enable_checkpointing(hf_model: Any) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant; transformers 5.x names both ways)."""
    kwargs = {"use_reentrant": False}
    if hasattr(hf_model, "activation_checkpointing_enable"):
        hf_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def make_scheduler(cfg: TrainConfig, optimizer: Any, total: int) -> Any:
    from transformers import get_scheduler

    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total)
    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=min(warmup, total), num_training_steps=total)


def attach_token_cache(model: Any, path: str | None) -> Any:
    """Give a frozen composed-VLM vision tower its token cache (vision/cache.py); None when there is nothing to
    cache (no path, no composed tower, or a tower being trained)."""
    from diffusionvl.backbone.vision.cache import TokenCache, tower_fingerprint
    from diffusionvl.backbone.vision.encoders import VisionTower

    tower = getattr(model.hf_model, "vision_tower", None)
    if not path or not isinstance(tower, VisionTower) or any(p.requires_grad for p in tower.parameters()):
        return None
    tower.token_cache = TokenCache(path, tower_fingerprint(tower))
    return tower.token_cache


# ---- the trainer ----------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig):
        from accelerate.utils import set_seed

        self.cfg = cfg.validate()
        self.output = Path(cfg.output)
        earlier_run = ckpt.check_output(self.output, cfg.resume, cfg.overwrite)  # every rank, before any writes
        has_vision = _model_has_vision(cfg.model)
        find_unused = has_vision and not cfg.lora and not {"vision", "projector"} <= set(cfg.freeze)
        self.accelerator = make_accelerator(cfg, find_unused)
        if self.accelerator.is_main_process:
            for path in earlier_run:  # --overwrite: the earlier run's own files only
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.output.mkdir(parents=True, exist_ok=True)
        self.accelerator.wait_for_everyone()
        set_seed(cfg.seed)
        self._load_model()
        self._build_data()
        self._build_optimizer()
        self.state = TrainState()
        self.resumed_from = self._resume()
        self.tracker = Tracker(self.accelerator, self.output, self.total_steps, self.state.step, cfg.progress)
        self.bad: dict[int, str] = {}
        self.truncated: set[int] = set()
        self.last: dict[str, Any] = {}
        self.stopped: str | None = None  # why the stage ended before its planned steps (target, plateau)
        self._best: dict[str, float] = {}  # best held-out accuracy per question type (plateau_s)
        self._improved_at = 0.0

    def _load_model(self) -> None:
        from accelerate.utils import DistributedType

        from diffusionvl.model.conversion import load

        acc, cfg = self.accelerator, self.cfg
        # FSDP shards a CPU copy; under DeepSpeed ZeRO-3 init the weights are already partitioned on the GPU
        device = "cpu" if acc.distributed_type == DistributedType.FSDP else acc.device
        with quiet_transformers():
            model = load(cfg.model, device=device, dtype=cfg.dtype)
        self.attention = choose_attention(cfg.attention, acc.device)
        set_attention(model, self.attention)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model.hf_model)
        self.peft_model = apply_lora(model, cfg) if cfg.lora else None
        self.trainable = trainable_counts(model) if cfg.lora else configure_trainable(model, cfg)
        self.token_cache = attach_token_cache(model, cfg.token_cache)
        self.model = model.train()

    def _build_data(self) -> None:
        from torch.utils.data import DataLoader

        acc, cfg, model = self.accelerator, self.cfg, self.model
        has_vision = model.adapter.has_vision
        records, self.report = read_records(cfg.data, cfg.image_folder, has_vision)
        check(bool(records), f"no usable training samples in {cfg.data}: {self.report.summary()}"
              + (f"; first: {self.report.examples[0]}" if self.report.examples else ""))
        self.eval_report = None
        if cfg.eval_data:
            held, self.eval_report = read_records(cfg.eval_data, cfg.image_folder, has_vision)
            check(bool(held), f"no usable eval samples in {cfg.eval_data} ({self.eval_report.summary()})")
        else:
            records, held = split_records(records, cfg.eval_size, cfg.seed)
        encoder: Any = SampleEncoder(model, cfg.max_length, cfg.overlong, cfg.objective)
        if cfg.packing:
            encoder = PackingEncoder(encoder)
        self.grounding = GroundingProbe(cfg.grounding_data, cfg.grounding_samples) if cfg.grounding_data else None
        collator = Collator(model.pad_token_id, model.config.block_size, model.adapter)
        self.sampler = GlobalBatchSampler(len(records), cfg.batch_size, acc.num_processes, acc.process_index,
                                          cfg.grad_accum, cfg.seed, cfg.shuffle)
        common = dict(collate_fn=collator, num_workers=cfg.num_workers, pin_memory=acc.device.type == "cuda",
                      worker_init_fn=_worker_ignores_ctrl_c if cfg.num_workers else None)
        self.loader = DataLoader(SFTDataset(records, encoder), batch_sampler=self.sampler,
                                 persistent_workers=cfg.num_workers > 0, **common)  # one worker set for all epochs
        self.n_eval = len(held)
        self.eval_loader = None
        if held:
            bs = cfg.eval_batch_size or cfg.batch_size
            self.eval_group = bs * acc.num_processes
            sampler = EvalSampler(len(held), bs, acc.num_processes, acc.process_index)
            self.eval_loader = DataLoader(SFTDataset(held, encoder, "eval"), batch_sampler=sampler, **common)

    def _build_optimizer(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        self.total_steps = cfg.max_steps or cfg.epochs * self.sampler.steps_per_epoch
        optimizer = torch.optim.AdamW(param_groups(self.model, cfg), lr=cfg.lr,
                                      betas=(cfg.adam_beta1, cfg.adam_beta2))
        self.scheduler = make_scheduler(cfg, optimizer, self.total_steps)
        ds = acc.state.deepspeed_plugin
        if ds is not None:  # DeepSpeed needs the micro-batch and accumulation it cannot see (no prepared loader)
            ds.deepspeed_config.update({"train_micro_batch_size_per_gpu": cfg.batch_size,
                                        "gradient_accumulation_steps": cfg.grad_accum,
                                        "gradient_clipping": cfg.max_grad_norm})
        self.module, self.optimizer = acc.prepare(TrainModule(self.model, cfg.objective, cfg.loss_norm), optimizer)
        acc.register_for_checkpointing(self.scheduler)

    def _resume(self) -> Path | None:
        found = ckpt.resume(self.accelerator, self.cfg.resume, self.output, self.total_steps,
                            self.sampler.global_batch)  # checked file by file: one line naming a damaged one
        if found is None:
            return None
        path, saved = found
        self.state = TrainState(saved["step"], saved["epoch"], saved["step_in_epoch"])
        return path

    # ---- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        ctrl_c = _CtrlC.install()
        try:
            self._start()
            while self.state.step < self.total_steps and self.stopped is None:
                self.sampler.set_position(self.state.epoch, self.state.step_in_epoch)
                for batch in self.loader:
                    self._micro_step(batch)
                    if self.accelerator.sync_gradients and self._after_step():
                        break
                else:
                    self.state.epoch += 1
                    self.state.step_in_epoch = 0
        except BaseException as exc:
            self.tracker.close()  # a run that stops on an error (NaN loss, Ctrl-C) keeps its log, closed
            if self.accelerator.is_main_process:  # a save cut anywhere, even before its own cleanup could run
                ckpt.remove_temporaries(self.output)
            if ctrl_c.seen and not isinstance(exc, KeyboardInterrupt):
                raise KeyboardInterrupt from None  # e.g. "DataLoader worker exited": a worker died of the same Ctrl-C
            raise
        finally:
            ctrl_c.uninstall()
        return self._finish()

    def _start(self) -> None:
        cfg, acc = self.cfg, self.accelerator
        if acc.trackers == [] and acc.log_with:
            scalars = {k: v for k, v in cfg.to_dict().items() if isinstance(v, (int, float, str, bool))}
            acc.init_trackers("tensorboard", config=scalars)
        self.tracker.say(f"data: {self.report.summary()}")
        for line in self.report.examples:
            self.tracker.say(f"  skipped {line}")
        if self.eval_report is not None:
            self.tracker.say(f"eval data: {self.eval_report.summary()}")
        self.tracker.say(f"training {self.total_steps} steps x global batch {self.sampler.global_batch} "
                         f"({acc.num_processes} process(es), {acc.distributed_type.value}, attention "
                         f"{self.attention}, trainable {sum(self.trainable.values()):,} parameters)"
                         + (f"; resumed from {self.resumed_from} at step {self.state.step}" if self.resumed_from
                            else ""))
        self.tracker.log({"event": "resume" if self.resumed_from else "start", "step": self.state.step,
                          "config": cfg.to_dict(), "data": self.report.to_dict(), "trainable": self.trainable,
                          "processes": acc.num_processes, "global_batch": self.sampler.global_batch})
        self._window = self._new_window()
        self._t0 = time.perf_counter()
        self._grad_norm: Any = None
        if self.eval_loader is not None and cfg.eval_every and self.state.step == 0:
            self._log_eval()  # the baseline the eval curve starts from

    def _new_window(self) -> dict[str, Any]:
        return {"loss": torch.zeros((), device=self.accelerator.device), "micro": 0, "tokens": 0, "samples": 0,
                "segments": 0, "time": time.perf_counter()}

    def _noise(self, batch: dict[str, Any], step: int, group: int) -> tuple[Tensor, Tensor]:
        dcfg = self.model.config
        n, length = batch["input_ids"].shape
        if self.cfg.objective == "ar":  # next-token cross entropy masks nothing: no draws to make
            empty = batch["position"].new_zeros(0, dtype=torch.float32)
            return empty, empty
        rates = noise.block_rates(self.cfg.seed, step, batch["position"], group, length // dcfg.block_size,
                                  dcfg.noise_eps, dcfg.antithetic)
        return rates, noise.mask_draws(self.cfg.seed, step, batch["position"], length)

    def _micro_step(self, batch: dict[str, Any]) -> None:
        acc, cfg = self.accelerator, self.cfg
        meta = batch.pop("meta")
        batch = to_device(batch, acc.device)
        rates, draw = self._noise(batch, self.state.step, self.sampler.global_batch)
        with acc.accumulate(self.module):
            loss, _ = self.module(batch, rates, draw)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm > 0:
                self._grad_norm = acc.clip_grad_norm_(self.module.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        w = self._window
        w["loss"] += loss.detach().float()
        w["micro"] += 1
        w["tokens"] += meta["tokens"]
        w["samples"] += len(meta["indices"])
        w["segments"] += meta.get("segments", len(meta["indices"]))
        self._track(meta)

    def _track(self, meta: dict[str, Any]) -> None:
        for index, reason in meta["skipped"]:
            if index not in self.bad:
                self.bad[index] = reason
                if len(self.bad) <= MAX_REPORTED:
                    self.tracker.say(f"skipped sample {reason}", everywhere=True)
        self.truncated.update(meta["truncated"])

    def _after_step(self) -> bool:
        """Bookkeeping after an optimizer step; True when training is done."""
        cfg, state = self.cfg, self.state
        self.scheduler.step()
        state.step += 1
        state.step_in_epoch += 1
        done = state.step >= self.total_steps
        self.tracker.progress(1)
        if state.step % cfg.log_every == 0 or done:
            self._log_window()
        if self.eval_loader is not None and cfg.eval_every and state.step % cfg.eval_every == 0 and not done:
            self._log_eval()
            done = self.stopped is not None
        if cfg.save_every and state.step % cfg.save_every == 0 and not done:
            self.save_checkpoint()
        return done

    def _log_window(self) -> None:
        acc, w = self.accelerator, self._window
        counts = torch.tensor([w["micro"], w["tokens"], w["samples"], len(self.bad), len(self.truncated),
                               w["segments"]],
                              dtype=torch.float64, device=acc.device)
        loss_sum = acc.reduce(w["loss"].reshape(1).to(torch.float64), "sum")
        totals = acc.reduce(counts, "sum").tolist()
        seconds = max(time.perf_counter() - w["time"], 1e-9)
        entry = {"step": self.state.step, "epoch": round(self.state.epoch + self.state.step_in_epoch
                                                         / self.sampler.steps_per_epoch, 4),
                 "loss": float(loss_sum) / max(totals[0], 1), "lr": max(self.scheduler.get_last_lr()),
                 "grad_norm": float(self._grad_norm) if self._grad_norm is not None else None,
                 "tokens_per_s": totals[1] / seconds, "samples_per_s": totals[2] / seconds,
                 "segments_per_s": totals[5] / seconds, "elapsed_s": time.perf_counter() - self._t0,
                 "skipped": int(totals[3]), "truncated": int(totals[4])}
        self.tracker.log(entry)
        self.tracker.progress(0, loss=f"{entry['loss']:.4f}", tok_s=f"{entry['tokens_per_s']:.0f}",
                              lr=f"{entry['lr']:.2e}")
        self.last.update(loss=entry["loss"], tokens_per_s=entry["tokens_per_s"])
        self._window = self._new_window()
        check(math.isfinite(entry["loss"]), f"the training loss became {entry['loss']} by step {self.state.step}: "
              "lower --lr, check the data and the model's inputs (the last checkpoint is kept)")

    # ---- eval -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean per-sample loss over the held-out set, with the same masks at every evaluation: `eval_loss`, and
        `eval_loss_rolled` (the same batches with their images rolled, train/grounding.py) where defined."""
        acc = self.accelerator
        self.module.eval()
        total = torch.zeros(4, dtype=torch.float64, device=acc.device)
        for batch in self.eval_loader:
            batch.pop("meta")
            batch = to_device(batch, acc.device)
            rates, draw = self._noise(batch, EVAL_STEP, self.eval_group)
            _, per_sample = self.module(batch, rates, draw)
            weight = (batch["position"] < self.n_eval).to(torch.float64)  # repeats that pad the last batch: 0
            rolled = roll_images(batch)
            rolled_sum = torch.zeros((), dtype=torch.float64, device=acc.device)
            if rolled is not None:
                rolled_sum = (self.module(rolled, rates, draw)[1].double() * weight).sum()
            total += torch.stack([(per_sample.double() * weight).sum(), weight.sum(), rolled_sum,
                                  weight.sum() * (rolled is not None)])
        self.module.train()
        total = acc.reduce(total, "sum").tolist()
        out = {"eval_loss": total[0] / total[1]}
        if total[3] > 0:
            out["eval_loss_rolled"] = total[2] / total[3]
            out["image_dependence"] = out["eval_loss_rolled"] - total[0] / total[1]
        return out

    def _log_eval(self, final: bool = False) -> float:
        entry = self.evaluate()
        if self.grounding is not None and self.accelerator.is_main_process:
            entry.update(self.grounding.probe(self.model, self.cfg.objective))
        entry["elapsed_s"] = time.perf_counter() - self._t0
        self.tracker.log({"step": self.state.step, **entry})
        shown = ", ".join(f"{k.replace('accuracy/', '')} {v:.3f}" for k, v in entry.items() if k != "elapsed_s")
        self.tracker.say(f"step {self.state.step}: {shown}")
        self.tracker.progress(0, eval_loss=f"{entry['eval_loss']:.4f}",
                              img_dep=f"{entry['image_dependence']:.3f}" if "image_dependence" in entry else None,
                              acc=f"{entry['accuracy']:.2f}" if "accuracy" in entry else None)
        self.last.update(entry)
        self._check_looking(entry)
        if not final:  # the end-of-run eval decides nothing: the run used its steps
            self._check_stage_done(entry)
        return entry["eval_loss"]

    def _check_stage_done(self, entry: dict[str, float]) -> None:
        """Set `self.stopped` when the grounding questions say the stage has done its work (TrainConfig
        target_accuracy, plateau_s); decided on the main process (which answers them), agreed by every process."""
        cfg, acc = self.cfg, self.accelerator
        if not (cfg.target_accuracy or cfg.plateau_s) or self.grounding is None:
            return
        reason = None
        if acc.is_main_process:
            types = {k.split("/", 1)[1]: v for k, v in entry.items() if k.startswith("accuracy/")}
            now = entry["elapsed_s"]
            for name, value in types.items():  # a type's first eval is its baseline, and counts as progress
                if name not in self._best or value >= self._best[name] + cfg.plateau_delta - 1e-9:
                    self._best[name], self._improved_at = value, now  # a slow climb counts once it adds up
            if cfg.target_accuracy and types and min(types.values()) >= cfg.target_accuracy:
                reason = f"every question type >= {cfg.target_accuracy:.0%} at step {self.state.step}"
            elif cfg.plateau_s and now - self._improved_at >= cfg.plateau_s:
                reason = (f"no question type gained {cfg.plateau_delta:.0%} in {cfg.plateau_s / 60:.0f} min "
                          f"(step {self.state.step})")
        flag = acc.reduce(torch.tensor([float(reason is not None)], device=acc.device), "sum")
        if float(flag) > 0:
            self.stopped = reason or "stopped by the main process"
            self.tracker.say(f"stage done: {self.stopped}")

    def _check_looking(self, entry: dict[str, float]) -> None:
        """Stop a run that still ignores its images after the patience time (TrainConfig.min_image_dependence)."""
        cfg = self.cfg
        dependence = entry.get("image_dependence")
        if not cfg.min_image_dependence or dependence is None or entry["elapsed_s"] < cfg.grounding_patience_s:
            return
        if dependence < cfg.min_image_dependence:
            raise DiffusionVLError(
                f"stopped at step {self.state.step}: after {entry['elapsed_s'] / 60:.0f} min the model still ignores "
                f"its images (eval loss with rolled images - with the right ones = {dependence:.4f} < "
                f"{cfg.min_image_dependence}); check the data for answers readable from the text, the vision tokens "
                "and the learning rate (the last checkpoint is kept)")

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """OUTPUT/checkpoint-STEP: exported model + accelerate state + trainer state, renamed into place."""
        with quiet_transformers():
            return self._save_checkpoint()

    def _save_checkpoint(self) -> Path:
        acc = self.accelerator
        final = self.output / f"{ckpt.PREFIX}{self.state.step}"
        tmp = self.output / f".{final.name}.tmp"  # every rank writes its accelerate state here, then one rename
        try:
            self._fill_checkpoint(tmp)
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed save leaves the previous checkpoints only
            raise
        if acc.is_main_process:
            atomic.replace_folder(tmp, final)
            ckpt.prune(self.output, self.cfg.keep_checkpoints)
            if self.token_cache is not None:
                self.token_cache.save()
            self.tracker.say(f"saved {final}")
        acc.wait_for_everyone()
        return final

    def _fill_checkpoint(self, tmp: Path) -> None:
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.module)  # collective under FSDP / ZeRO-3
        if acc.is_main_process:
            ckpt.export(self.model, tmp, state_dict, self.peft_model)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / ckpt.ACCELERATE_DIR))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic.write_json(tmp / ckpt.STATE_FILE, {**asdict(self.state), "global_batch": self.sampler.global_batch,
                                                      "base_model": str(Path(self.cfg.model).resolve())})

    def save_final(self) -> Path:
        with quiet_transformers():
            return self._save_final()

    def _save_final(self) -> Path:
        acc = self.accelerator
        state_dict = acc.get_state_dict(self.module)
        path = self.output / "final"
        if acc.is_main_process:
            if self.peft_model is None:
                ckpt.export(self.model, path, state_dict)
            else:
                adapter = ckpt.export(self.model, self.output / "final-adapter", state_dict, self.peft_model)
                path = ckpt.merge_lora(adapter, path, dtype=self.cfg.dtype) if self.cfg.lora_merge else adapter
        acc.wait_for_everyone()
        return path

    def _finish(self) -> dict[str, Any]:
        from accelerate.utils import gather_object

        acc = self.accelerator
        if self.eval_loader is not None and self.stopped is None:  # a stopped stage was evaluated at this step
            self._log_eval(final=True)
        elif self.stopped is not None and self._window["micro"]:
            self._log_window()  # the steps since the last logged window
        if self.cfg.save_every and not (self.output / f"{ckpt.PREFIX}{self.state.step}").exists():
            self.save_checkpoint()
        final = self.save_final()
        if self.token_cache is not None and acc.is_main_process:
            self.token_cache.save()
        bad = dict(kv for part in gather_object([list(self.bad.items())]) for kv in part)
        truncated = set(i for part in gather_object([sorted(self.truncated)]) for i in part)
        summary = {"output": str(self.output), "final_model": str(final), "steps": self.state.step,
                   "global_batch": self.sampler.global_batch, "processes": acc.num_processes,
                   "train_loss": self.last.get("loss"), "eval_loss": self.last.get("eval_loss"),
                   "tokens_per_s": self.last.get("tokens_per_s"), "seconds": time.perf_counter() - self._t0,
                   "trainable_parameters": self.trainable, "attention": self.attention, "data": self.report.to_dict(),
                   "skipped_in_training": len(bad), "skipped_examples": sorted(bad.values())[:MAX_REPORTED],
                   "truncated": len(truncated), "stopped": self.stopped,
                   "token_cache": self.token_cache.stats() if self.token_cache is not None else None}
        if acc.is_main_process:
            atomic.write_json(self.output / "summary.json", summary)
        self.tracker.log({"event": "end", "step": self.state.step, "summary": summary})
        self.tracker.close()
        acc.wait_for_everyone()  # no rank tears the process group down while another still talks through it
        self._release()
        acc.end_training()
        return summary

    def _release(self) -> None:
        """Drop everything that holds the process group before it is destroyed. DDP's reducer keeps its own reference
        to the group: destroyed later, at interpreter exit, gloo's threads can abort the process ('terminate called
        without an active exception', exit -6 after a successful run; reproduced with a bare DDP model too)."""
        self.module = self.optimizer = self.scheduler = self.loader = self.eval_loader = None
        self.accelerator.free_memory()
        gc.collect()


class _CtrlC:
    """Ctrl-C, handled by the main process only. It reaches every process of the group; a DataLoader worker that died
    of it made torch's SIGCHLD handler raise "worker exited unexpectedly" while the main process unwound its
    KeyboardInterrupt (a traceback, exit 1). Forked workers inherit this handler and ignore the signal (from the fork
    on, before any worker_init_fn); `seen` still turns any error that ends an interrupted run into the interrupt."""

    def __init__(self) -> None:
        self.seen, self.previous, self.pid = False, None, os.getpid()

    @classmethod
    def install(cls) -> "_CtrlC":
        watch = cls()
        if threading.current_thread() is threading.main_thread():
            watch.previous = signal.signal(signal.SIGINT, watch._handle)
        return watch

    def _handle(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a forked DataLoader worker inherits this handler: it leaves Ctrl-C to the main
            return
        self.seen = True
        raise KeyboardInterrupt

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


def _worker_ignores_ctrl_c(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group. A worker that died of it first made the main process fail with
    "DataLoader worker exited unexpectedly" (a traceback, exit 1) instead of stopping cleanly: workers leave the
    interrupt to the main process, which shuts them down. Batches go to the main process through named shared memory
    ("file_system"), not by passing file descriptors: that needs a server thread in each worker (multiprocessing's
    resource sharer), which printed a traceback when the worker was shut down in the middle of an accept."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.multiprocessing.set_sharing_strategy("file_system")


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run one finetuning job (module docstring); returns the summary also written to OUTPUT/summary.json."""
    return Trainer(cfg).fit()
