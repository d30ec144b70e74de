"""`diffusionvl recipe tiny-vlm`: run the tiny-VLM recipe end to end (resumable), printing the results table.

Contract: flags come from `TinyVLMConfig`; each finished stage is kept in `--out` and skipped on a rerun.
"""

from __future__ import annotations

import argparse

from diffusionvl.core.config import add_dataclass_arguments, dataclass_from_args

RECIPES = ("tiny-vlm",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusionvl.recipes.tiny_model import TinyVLMConfig

    parser.add_argument("name", choices=RECIPES, help="which recipe to run")
    add_dataclass_arguments(parser, TinyVLMConfig)


def run(args: argparse.Namespace) -> int:
    from diffusionvl.recipes.tiny_model import TinyVLMConfig
    from diffusionvl.recipes.tiny_vlm import run_recipe

    cfg = dataclass_from_args(TinyVLMConfig, args).validate()
    result = run_recipe(cfg)
    print(f"results: {result['results']['markdown']}")
    return 0
