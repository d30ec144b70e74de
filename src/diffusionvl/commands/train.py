"""`diffusionvl train --model DIR --data FILE [--image-folder DIR] --output DIR [--config FILE] [flags]`.

Contract: the flags are the fields of `TrainConfig` (so `--help` lists every knob with its documentation); a
YAML/JSON `--config` file gives values that flags override. Runs one finetuning job (multi-GPU / multi-node when
started by `accelerate launch`), then prints the summary as a table (and as JSON with --json; it is also written
to OUTPUT/summary.json). Two helper modes: `--merge-lora ADAPTER --output DIR` folds a LoRA checkpoint into a full
model, `--accelerate-config ddp|fsdp|zero3` prints the path of a packaged example accelerate config.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from diffusionvl.core.config import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusionvl.jobs.train.config import TrainConfig

    parser.add_argument("--config", default=None, help="YAML or JSON file with TrainConfig fields (flags override)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--merge-lora", metavar="ADAPTER", default=None,
                        help="merge this LoRA adapter checkpoint into its base model, write it to --output, exit")
    parser.add_argument("--accelerate-config", choices=["ddp", "fsdp", "zero3"], default=None,
                        help="print the path of a packaged example accelerate config and exit")
    add_dataclass_arguments(parser, TrainConfig)


def _table(summary: dict[str, Any]) -> str:
    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    data = summary["data"]
    rows = [("final model", summary["final_model"]), ("steps", summary["steps"]),
            ("global batch", f"{summary['global_batch']} ({summary['processes']} process(es))"),
            ("train loss (last log)", summary["train_loss"]), ("eval loss", summary["eval_loss"]),
            ("tokens/s", summary["tokens_per_s"]), ("seconds", summary["seconds"]),
            ("data", f"{data['kept']} of {data['total']} usable, skipped {sum(data['skipped'].values())}"),
            ("skipped while training", summary["skipped_in_training"]), ("truncated", summary["truncated"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from diffusionvl.core.errors import check
    from diffusionvl.jobs.train import accelerate_config
    from diffusionvl.jobs.train.config import TrainConfig

    if args.accelerate_config:
        print(accelerate_config(args.accelerate_config))
        return 0
    if args.merge_lora:
        from diffusionvl.jobs.train.checkpoint import merge_lora

        check(bool(args.output), "--merge-lora needs --output DIR for the merged model")
        print(f"wrote {merge_lora(args.merge_lora, args.output, base=args.model)}")
        return 0
    base = TrainConfig.from_file(args.config) if args.config else None
    cfg = dataclass_from_args(TrainConfig, args, base).validate()
    from diffusionvl.jobs.train.trainer import Trainer

    trainer = Trainer(cfg)
    summary = trainer.fit()
    if trainer.accelerator.is_main_process:
        print(json.dumps(summary, indent=2) if args.json else _table(summary))
    return 0
