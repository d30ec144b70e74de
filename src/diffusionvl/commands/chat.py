"""`diffusionvl chat`: an interactive multi-turn chat in the terminal, answers streamed block by block.

Contract: reads user turns from standard input until EOF or `/exit`; `/image PATH` attaches an image to the next turn,
`/reset` clears the history, `/stats` toggles the per-answer stats line. With `--template`, every answer has the
template's form. Bad input (missing image, too-long history, a line longer than the model's context could hold, text
holding a control token such as <|im_end|>) prints a one-line error and the session continues.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from diffusionvl.commands._common import (add_model_arguments, add_template_argument, check_template, check_user_text,
                                          load_model, read_bounded, stats_line)
from diffusionvl.core.config import DecodeConfig, add_dataclass_arguments, dataclass_from_args
from diffusionvl.core.errors import DiffusionVLError

HELP = "commands: /image PATH (attach to next turn), /reset, /stats, /exit"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--system", default=None, help="optional system message")
    add_template_argument(parser)
    add_dataclass_arguments(parser, DecodeConfig)


def _answer(model: Any, history: list[dict[str, Any]], images: list[Any], cfg: DecodeConfig,
            template: str | None = None) -> tuple[str, dict]:
    from diffusionvl.backbone.prompts import to_conversation

    conv = to_conversation(history, images or None)
    text, stats = "", {}
    for event in model.stream_events(conv, config=cfg, template=template):
        if event.final:
            stats = event.output.stats
            text = event.output.texts[0]
        elif event.new_texts[0]:
            sys.stdout.write(event.new_texts[0])
            sys.stdout.flush()
    sys.stdout.write("\n")
    return text, stats


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(DecodeConfig, args).validate()
    check_template(args.template)
    model = load_model(args)
    check_user_text(model, [("--system", args.system)])
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict[str, Any]] = list(system)
    images: list[Any] = []
    pending: list[Any] = []
    show_stats = True
    print(HELP, file=sys.stderr)
    while True:
        try:
            raw = read_bounded(sys.stdin, model, "the line", line=True)
        except DiffusionVLError as exc:
            print(f"error: {exc}", file=sys.stderr)
            continue
        if not raw:
            break
        line = raw.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history, images, pending = list(system), [], []
            continue
        if line == "/stats":
            show_stats = not show_stats
            continue
        if line.startswith("/image"):
            from diffusionvl.core.media import load_image

            if not model.adapter.has_vision:
                print("error: this model takes no images (text-only model)", file=sys.stderr)
                continue
            try:
                pending.append(load_image(line[len("/image"):].strip()))
            except DiffusionVLError as exc:
                print(f"error: {exc}", file=sys.stderr)
            continue
        content: Any = [{"type": "image"} for _ in pending] + [{"type": "text", "text": line}]
        turn = {"role": "user", "content": content}
        try:
            check_user_text(model, [("the line", line)])
            text, stats = _answer(model, history + [turn], images + pending, cfg, args.template)
        except DiffusionVLError as exc:  # the turn is not kept; nor are its images, which may be the cause
            print(f"error: {exc}" + ("; the attached image(s) were dropped" if pending else ""), file=sys.stderr)
            pending = []
            continue
        history += [turn, {"role": "assistant", "content": text}]
        images, pending = images + pending, []
        if show_stats:
            print(stats_line(stats), file=sys.stderr)
    return 0
