"""`diffusionvl compose`: build a LLaVA-style AR VLM from a text LM and a vision encoder (the modality shift).

Contract: `diffusionvl compose --output DIR [--lm smollm2|PATH] [--vision efficientnet_lite0|PATH|timm:NAME]
[--projector mlp2x_gelu|linear] [--pool K] [...]` composes the model (flags from `ComposeOptions`) and writes an
AR VLM folder atomically (config, safetensors with the vision tower, tokenizer with the image token and an
image-aware chat template, processor_config.json). `diffusionvl convert DIR DST` then converts it to block
diffusion. Prints the parameter counts per part (table, or JSON with `--json`); errors are one line.
"""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusionvl.core.config import add_dataclass_arguments
    from diffusionvl.jobs.composition import ComposeOptions

    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="folder to write the AR VLM to")
    add_dataclass_arguments(parser, ComposeOptions)
    parser.add_argument("--json", action="store_true", help="print a JSON summary")


def run(args: argparse.Namespace) -> int:
    from diffusionvl.core.config import dataclass_from_args
    from diffusionvl.jobs.composition import ComposeOptions, compose_to_disk

    options = dataclass_from_args(ComposeOptions, args)
    path, summary = compose_to_disk(options, args.output)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    counts = summary["parameters"]
    print(f"wrote {path}  ({options.lm} + {summary['vision']}, projector {options.projector}, "
          f"{summary['num_image_tokens']} tokens per image as {options.image_token})")
    for part in ("vision", "projector", "language", "total"):
        print(f"  {part:<15} {counts[part]:>14,} parameters")
    print(f"next: diffusionvl convert {path} DST")
    return 0
