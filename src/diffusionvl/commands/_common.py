"""Helpers shared by subcommands: loading the model a command runs on, and printing decoding stats."""

from __future__ import annotations

import argparse
from typing import Any

from diffusionvl.core.errors import DiffusionVLError

DEFAULT_NAMES = ("default", "default:ar")  # --model names of the embedded model and of its AR parent


def add_model_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--model", required=required, default=None,
                        help="diffusion model folder (default: the embedded default model; `default:ar` = its "
                             "autoregressive parent, decoded with --decoder ar)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on GPU, fp32 on CPU)")


def load_model(args: argparse.Namespace) -> Any:
    """The model named by --model, or the embedded default when none is given."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a CLI answer should not start with weight-loading bars
    if args.model is None or args.model in DEFAULT_NAMES:
        try:
            from diffusionvl.recipes.default import load_default
        except ImportError:
            raise DiffusionVLError("no --model given and this installation has no embedded default model") from None
        return load_default(device=args.device, dtype=args.dtype, parent=args.model == "default:ar")
    from diffusionvl.model.conversion import load

    return load(args.model, device=args.device, dtype=args.dtype)


def stats_line(stats: dict[str, Any]) -> str:
    head = f"[{stats['decoder']}"
    if stats["decoder"] != "ar":
        head += f" B={stats['block_size']} S={stats['steps']} {stats['policy']}"
    return (f"{head}] {stats['tokens']} tokens, {stats['forwards']} forwards, "
            f"{stats['tokens_per_forward']:.2f} tokens/forward, {stats['seconds']:.2f} s, "
            f"{stats['tokens_per_second']:.1f} tokens/s")
