"""`diffusionvl generate`: answer one prompt (with images), streaming the text block by block.

Contract: prints the answer to stdout as blocks finish and a one-line stats summary to stderr; `--json` prints one
JSON object instead (text, token ids, finish reason, stats). Decoding flags come from `DecodeConfig`.
"""

from __future__ import annotations

import argparse
import json
import sys

from diffusionvl.commands._common import add_model_arguments, load_model, stats_line
from diffusionvl.core.config import DecodeConfig, add_dataclass_arguments, dataclass_from_args
from diffusionvl.core.errors import DiffusionVLError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the question or instruction ('-' reads standard input)")
    parser.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    parser.add_argument("--system", default=None, help="optional system message")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_dataclass_arguments(parser, DecodeConfig)


def build_messages(prompt: str, system: str | None) -> list[dict[str, str]]:
    if prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise DiffusionVLError("empty prompt: give a question with --prompt")
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": prompt}]


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(DecodeConfig, args).validate()
    messages = build_messages(args.prompt, args.system)
    from diffusionvl.backbone.prompts import to_conversation

    conversation = to_conversation(messages, args.image or None)  # validates the images before loading the model
    model = load_model(args)
    if args.json:
        out = model.generate(conversation, config=cfg)
        print(json.dumps({"text": out.texts[0], "token_ids": out.token_ids[0],
                          "finish_reason": out.finish_reasons[0], "stats": out.stats}, indent=2))
        return 0
    final = None
    for event in model.stream_events(conversation, config=cfg):
        if event.final:
            final = event.output
        elif event.new_texts[0]:
            sys.stdout.write(event.new_texts[0])
            sys.stdout.flush()
    sys.stdout.write("\n")
    print(stats_line(final.stats), file=sys.stderr)
    return 0
