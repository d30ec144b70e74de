"""`diffusionvl generate`: answer one prompt (with images), streaming the text block by block.

Contract: prints the answer to stdout as blocks finish and a one-line stats summary to stderr; `--json` prints one
JSON object instead (text, token ids, the slots' fillings with --template, finish reason, stats). Decoding flags come
from `DecodeConfig`; `--template` fixes the answer's form (decoding/template.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from diffusionvl.commands._common import (add_model_arguments, add_template_argument, check_template, check_user_text,
                                          load_model, read_bounded, stats_line)
from diffusionvl.core.config import DecodeConfig, add_dataclass_arguments, dataclass_from_args
from diffusionvl.core.errors import DiffusionVLError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the question or instruction ('-' reads standard input)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_template_argument(parser)
    add_dataclass_arguments(parser, DecodeConfig)


def build_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    if not prompt.strip():
        raise DiffusionVLError("empty prompt: give a question with --prompt")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(DecodeConfig, args).validate()
    from diffusionvl.backbone.prompts import to_conversation
    from diffusionvl.core.media import load_image

    from_stdin = args.prompt == "-"
    if not from_stdin:
        build_messages(args.prompt, args.system)  # an empty prompt fails before the (slow) model load
    images = [load_image(path) for path in args.image]  # so do bad images
    check_template(args.template)
    model = load_model(args)
    prompt = read_bounded(sys.stdin, model, "the prompt on standard input") if from_stdin else args.prompt
    check_user_text(model, [("--prompt", prompt), ("--system", args.system)])
    conversation = to_conversation(build_messages(prompt, args.system), images or None)
    if args.json:
        out = model.generate(conversation, config=cfg, template=args.template)
        slots = {"slots": out.slots[0]} if out.slots else {}
        print(json.dumps({"text": out.texts[0], "token_ids": out.token_ids[0], **slots,
                          "finish_reason": out.finish_reasons[0], "stats": out.stats}, indent=2))
        return 0
    final = None
    for event in model.stream_events(conversation, config=cfg, template=args.template):
        if event.final:
            final = event.output
        elif event.new_texts[0]:
            sys.stdout.write(event.new_texts[0])
            sys.stdout.flush()
    sys.stdout.write("\n")
    print(stats_line(final.stats), file=sys.stderr)
    return 0
