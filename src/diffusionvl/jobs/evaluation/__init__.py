"""Evaluation: accuracy and likelihood of a diffusion model, always reported next to its decoding speed.

Contract: `scoring.py` (pure answer scoring: exact match with variants, multiple-choice letters, ANLS, object-level
F1 of scene descriptions), `tasks.py` (task registry and loaders: `jsonl`, `synth-vqa`, `elbo`; data-parallel
sharding), `elbo.py` (NELBO of reference tokens under the BD3 objective at fixed noise levels), `runner.py`
(`EvalConfig`, batched evaluation with progress, gather, summary), `report.py` (atomic JSON / JSONL / Markdown
output). The CLI is `diffusionvl eval`; the lmms-eval adapter lives in `diffusionvl.jobs.integrations.lmms_eval`. See
docs/evaluation.md.
"""

from __future__ import annotations

from diffusionvl.jobs.evaluation.runner import EvalConfig, evaluate, load_samples
from diffusionvl.jobs.evaluation.tasks import TASKS, Sample, Task, register_task

__all__ = ["EvalConfig", "Sample", "TASKS", "Task", "evaluate", "load_samples", "register_task"]
