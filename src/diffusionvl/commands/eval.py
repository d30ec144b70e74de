"""`diffusionvl eval`: accuracy (or NELBO) of a model on a task, with decoding speed next to it.

Contract: `diffusionvl eval --model PATH --task TASK [--data ...] [--limit N] [decode flags]` checks `--out` and
validates the task data before loading the model, evaluates with a progress bar, prints the Markdown summary and writes
`results.json`, `results.md` and `samples.jsonl` atomically into `--out` (default `eval_results/<task>`).
Under `accelerate launch` every process evaluates every N-th sample on its own device and the main process
gathers and writes the results. Flags come from `EvalConfig` and `DecodeConfig`. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from diffusionvl.commands._common import add_model_arguments, load_model
from diffusionvl.core.config import DecodeConfig, add_dataclass_arguments, dataclass_from_args

# short answers need few tokens: the default budget per task when --max-new-tokens is not given (synth-vqa
# describe samples need about 48: pass --max-new-tokens; the report counts descriptions cut at the budget)
DEFAULT_MAX_NEW_TOKENS = {"synth-vqa": 16, "jsonl": 32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusionvl.jobs.evaluation.runner import EvalConfig

    add_model_arguments(parser)
    add_dataclass_arguments(parser, EvalConfig)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_dataclass_arguments(parser, DecodeConfig)


def _distributed(device: str | None) -> tuple[int, int, bool, str | None, object]:
    """(rank, world, is_main, device, gather) from accelerate's process state (one process without a launcher;
    several under `accelerate launch` / torchrun, on CPU with gloo when there is no GPU or --device cpu)."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())
    if state.num_processes == 1:
        return 0, 1, True, None, None
    return (state.process_index, state.num_processes, state.is_main_process, str(state.device),
            lambda obj: gather_object([obj]))


def run(args: argparse.Namespace) -> int:
    from diffusionvl.jobs.evaluation.report import check_out_dir, markdown, write_results
    from diffusionvl.jobs.evaluation.runner import EvalConfig, evaluate, load_samples

    cfg = dataclass_from_args(EvalConfig, args).validate()
    decode = dataclass_from_args(DecodeConfig, args).validate()
    out = cfg.out or os.path.join("eval_results", cfg.task)
    check_out_dir(out)  # before the evaluation, not after it
    if args.max_new_tokens is None and cfg.task in DEFAULT_MAX_NEW_TOKENS:
        decode = dataclasses.replace(decode, max_new_tokens=DEFAULT_MAX_NEW_TOKENS[cfg.task])
    task, samples = load_samples(cfg)  # bad data fails before the (slow) model load
    rank, world, is_main, device, gather = _distributed(args.device)
    if device is not None and args.device is None:
        args.device = device
    model = load_model(args)
    summary, records = evaluate(model, samples, task, cfg, decode, rank, world, gather,
                                progress=is_main and not args.no_progress)
    if is_main:
        summary["model"] = args.model
        paths = write_results(out, summary, records)
        print(markdown(summary))
        print(f"wrote {paths['json']}, {paths['markdown']}, {paths['samples']}")
    return 0
