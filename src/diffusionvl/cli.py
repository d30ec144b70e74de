"""The `diffusionvl` command line: one subcommand per job.

Contract: each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`; modules
are imported only when their subcommand runs, so `diffusionvl --help` is instant. A `DiffusionVLError` (bad user
input) is printed as one `error: ...` line with exit status 2, never as a traceback. So are the failures that only
the user's files and system can cause, wherever they surface (`input_error`): an OS error on a path (too long, not a
directory, permission, disk full, a symlink loop), a file that is not UTF-8, malformed or too deeply nested JSON, a
broken chat template. `DIFFUSIONVL_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from diffusionvl.core.errors import DiffusionVLError

# subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("diffusionvl.commands.convert", "Translate an AR model (or a tiny random one) into a diffusion model."),
    "generate": ("diffusionvl.commands.generate", "Generate an answer for a prompt (and images), streamed."),
    "chat": ("diffusionvl.commands.chat", "Chat interactively with a model in the terminal."),
    "assets": ("diffusionvl.commands.assets",
               "Prepare and check the offline pretrained assets (SmolLM2, EfficientNet-Lite0)."),
    "data": ("diffusionvl.commands.data", "Generate the synthetic visual QA dataset (LLaVA JSON + eval JSONL)."),
    "serve": ("diffusionvl.commands.serve", "Serve a model over an OpenAI-compatible HTTP API (chat completions)."),
    "eval": ("diffusionvl.commands.eval", "Evaluate accuracy / ELBO on a task, with decoding speed next to quality."),
    "train": ("diffusionvl.commands.train", "Finetune a diffusion model on LLaVA / OpenAI-messages data (accelerate)."),
    "recipe": ("diffusionvl.commands.recipe", "Run an end-to-end recipe (tiny-vlm: AR VLM -> diffusion VLM, on CPU)."),
    "compose": ("diffusionvl.commands.compose",
                "Compose a text LM and a vision encoder into an AR VLM (modality shift)."),
    "bench": ("diffusionvl.commands.bench", "Measure decoding speed: HF generate vs our AR, block and full decoders."),
}


def build_parser() -> argparse.ArgumentParser:
    from diffusionvl.core.version import __version__

    parser = argparse.ArgumentParser(prog="diffusionvl", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffusionvl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def one_line(exc: BaseException) -> str:
    """The message of a DiffusionVLError; one raised in a DataLoader worker arrives wrapped with the worker's
    traceback ("Caught DiffusionVLError in DataLoader worker ... Original Traceback ..."): keep its last line."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def input_error(exc: BaseException) -> str | None:
    """One line for a failure caused by the user's files or system (module contract), else None (a bug: traceback)."""
    import json

    if isinstance(exc, OSError):
        where = f": {str(exc.filename)[:200]}" if exc.filename is not None else ""
        return f"{exc.strerror or exc}{where}"
    if isinstance(exc, UnicodeEncodeError):
        return f"this terminal cannot show the text ({str(exc)[:120]}); set PYTHONIOENCODING=utf-8"
    if isinstance(exc, UnicodeError):
        return f"a file or argument is not valid UTF-8 text ({str(exc)[:200]})"
    if isinstance(exc, RuntimeError) and str(exc).startswith("Symlink loop"):  # Path.resolve() before Python 3.13
        return f"a symlink loop: {str(exc).removeprefix('Symlink loop from ')[:200]} cannot be resolved"
    if isinstance(exc, RecursionError):
        return "input nested too deeply (a JSON value with thousands of levels of brackets?)"
    if isinstance(exc, json.JSONDecodeError):
        return f"malformed JSON: {exc}"
    template_error = getattr(sys.modules.get("jinja2"), "TemplateError", None)
    if template_error is not None and isinstance(exc, template_error):
        return f"the model's chat template failed: {str(exc)[:200]}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        parser = build_parser()
        if not argv:
            parser.print_help()
            return 0
        parser.parse_args(argv)  # prints usage / version / the unknown-command error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    parser = argparse.ArgumentParser(prog=f"diffusionvl {name}", description=help_text)
    try:
        module = importlib.import_module(module_name)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args) or 0)
    except DiffusionVLError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = input_error(exc)
        if message is None or os.environ.get("DIFFUSIONVL_DEBUG"):
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
