"""Helpers shared by subcommands: loading the model a command runs on, reading a prompt from a stream within a
bound set by the model's context, checking user text for control tokens, the --template flag, and printing decoding
stats."""

from __future__ import annotations

import argparse
from typing import IO, Any

from diffusionvl.backbone.tokens import MAX_CHARS_PER_TOKEN, control_tokens, refuse_control_tokens
from diffusionvl.core.errors import DiffusionVLError, check

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


def text_bound(model: Any) -> int:
    """The most characters of prompt text the model's context could hold (tokens.MAX_CHARS_PER_TOKEN a token)."""
    return (model.max_positions or 1 << 20) * MAX_CHARS_PER_TOKEN


def read_bounded(stream: IO[str], model: Any, what: str, line: bool = False) -> str:
    """All of `stream` (or its next line), read only up to `text_bound(model)` characters: longer text is refused in
    one line, unread beyond the bound (memory and time stay bounded whatever arrives). A line that is too long is
    skipped to its end, so a session reading line by line can go on."""
    limit = text_bound(model)
    text = stream.readline(limit + 1) if line else stream.read(limit + 1)
    too_long = len(text) > limit
    rest = text
    while too_long and line and rest and not rest.endswith("\n"):
        rest = stream.readline(limit + 1)
    check(not too_long, f"{what} is longer than {limit} characters, more than the model's context of "
                        f"{model.max_positions} tokens can hold")
    return text


def check_user_text(model: Any, texts: list[tuple[str, str | None]]) -> None:
    """The server's rule for request text, on the CLI's: text holding a control token of the model is refused."""
    refuse_control_tokens(control_tokens(model), [(where, text) for where, text in texts if text])


TEMPLATE_HELP = ("answer template: literal text and <mask:N> slots (exactly N tokens each), e.g. 'There are <mask:1> "
                 "objects.'; the answer is the template with its slots filled (docs/templates.md)")


def add_template_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", default=None, metavar="TEXT", help=TEMPLATE_HELP)


def check_template(template: str | None) -> None:
    """A malformed template fails before the (slow) model load; the context is checked with the model."""
    if template is not None:
        from diffusionvl.decoding.template import parse

        parse(template)


def stats_line(stats: dict[str, Any]) -> str:
    head = f"[{stats['decoder']}"
    if stats["decoder"] != "ar":
        head += f" B={stats['block_size']} S={stats['steps']} {stats['policy']}"
    return (f"{head}] {stats['tokens']} tokens, {stats['forwards']} forwards, "
            f"{stats['tokens_per_forward']:.2f} tokens/forward, {stats['seconds']:.2f} s, "
            f"{stats['tokens_per_second']:.1f} tokens/s")
