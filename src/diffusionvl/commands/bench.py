"""`diffusionvl bench`: measure decoding speed of every decoder in one run (see diffusionvl/jobs/bench.py).

Contract: flags come from `BenchConfig`; prints a table to stdout and writes `--output` (JSON, atomic) and a plot
next to it. Example (the issue's GPU target cell):
    diffusionvl bench --shape qwen2.5-7b --batch 1 --prompt 512 --new-tokens 256 --output perf/7b.json
"""

from __future__ import annotations

import argparse

from diffusionvl.core.config import add_dataclass_arguments, dataclass_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusionvl.jobs.bench import BenchConfig

    add_dataclass_arguments(parser, BenchConfig)
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from diffusionvl.jobs.bench import BenchConfig, markdown_table, render_table, run_bench

    cfg = dataclass_from_args(BenchConfig, args).validate()
    result = run_bench(cfg, progress=not args.quiet)
    Console(width=200).print(render_table(result))
    for a in result["meta"].get("agreement", []):
        print(f"fast vs plain, greedy {a['decoder']}: {a['exact_match_samples']}/{a['samples']} samples identical, "
              f"{100 * a['identical_prefix_fraction']:.1f}% identical prefix ({a['fast_backend']})")
    if args.markdown:
        print(markdown_table(result))
    print(f"wrote {cfg.output}" + (f" and {result['meta']['plot']}" if result["meta"].get("plot") else ""))
    return 0
