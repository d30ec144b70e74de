"""Assemble the report of `scripts/gpu_report.sh` from whatever parts finished.

Contract: `python scripts/gpu_report_assemble.py --dir DIR --bench P1 P2 ... --report FILE [--smoke]` reads
DIR/machine.md, the bench parts DIR/bench-P.json (in the order given, the order they ran) and
DIR/train_attention.json, and writes FILE (Markdown, atomically) and DIR/bench.png (one plot of every decoding row,
when matplotlib is installed). Rows of one (batch, prompt) cell from several parts are shown together, and every
ratio to transformers `generate` is recomputed against the `hf_ar` row of the same cell (measured by the first part
of that cell, on the same machine and model). A part that did not finish is named as such, never left out silently.
Needs only what `diffusionvl bench` needs (torch, transformers): no install, no server, no optional package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from diffusionvl.core.atomic import write_text
from diffusionvl.jobs.bench import add_ratios, markdown_table, write_plot


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def merge_bench(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of all parts grouped by (batch, prompt) cell, cells in order of first appearance, ratios redone."""
    cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for part in parts:
        for row in part["results"]:
            cells.setdefault((row["batch"], row["prompt"]), []).append(dict(row))
    rows = []
    for cell_rows in cells.values():
        add_ratios(cell_rows)
        rows.extend(cell_rows)
    return rows


def decoding_section(out: Path, names: list[str]) -> list[str]:
    """The decoding table, the backends, the agreement check and a line per part that did not finish."""
    found = {name: read_json(out / f"bench-{name}.json") for name in names}
    parts = [p for p in found.values() if p and p.get("results")]
    lines = ["## Decoding", ""]
    missing = [n for n, p in found.items() if not (p and p.get("results"))]
    if not parts:
        return lines + [f"No decoding part finished: see {out}/log.txt.", ""]
    meta = parts[0]["meta"]
    cfg = meta["config"]
    lines += [f"Model: {meta['model']} ({meta['parameters'] / 1e6:,.1f}M parameters), {meta['dtype']} on "
              f"{meta['device_name']}; {cfg['new_tokens']} new tokens per sample (stop tokens disabled), block "
              f"size {cfg['block_size']}, {cfg['steps']} steps per block, threshold {cfg['threshold']}.", ""]
    lines += [f"- part `{n}`: {', '.join(p['meta']['config']['decoders'])} at batch "
              f"{', '.join(map(str, p['meta']['config']['batch']))}; {p['meta']['config']['warmup']} warm-up and "
              f"{p['meta']['config']['repeats']} timed runs per case, the median shown"
              + (" (cut short: only the cells it finished)" if len(p["results"]) < _expected(p) else "")
              for n, p in found.items() if p and p.get("results")]
    lines += [f"- part `{n}`: did not finish (see log.txt)" for n in missing]
    rows = merge_bench(parts)
    lines += ["", "x HF: the ratio to transformers `generate` (`hf_ar`) of the same batch and prompt, measured by the "
              "first part of that cell on the same machine and model.", "", markdown_table({"results": rows}), ""]
    for a in meta.get("agreement", []):
        lines.append(f"- fast vs plain path, greedy {a['decoder']}: {a['exact_match_samples']}/{a['samples']} "
                     f"samples identical, {100 * a['identical_prefix_fraction']:.1f}% identical prefix "
                     f"({a['fast_backend']})")
    plot = write_plot({"meta": meta, "results": rows}, out / "bench.png")
    lines += [f"- plot: {plot}" if plot else "- plot: skipped (matplotlib is not installed)", ""]
    return lines


def _expected(part: dict[str, Any]) -> int:
    cfg = part["meta"]["config"]
    return len(cfg["batch"]) * len(cfg["prompt"]) * len(cfg["decoders"])


def training_section(out: Path) -> list[str]:
    """The training-step table of scripts/bench_train_attention.py, with FlexAttention's speed-up per length."""
    data = read_json(out / "train_attention.json")
    lines = ["## Training step: FlexAttention BlockMask vs dense-mask SDPA", ""]
    if not data or not data.get("results"):
        return lines + [f"Not finished: see {out}/log.txt.", ""]
    lines += [f"Shape {data['shape']}, block size {data['block_size']}, bf16 autocast {data['bf16']}, "
              f"{data['device']}, torch {data['torch']}; forward + backward + AdamW step, median.", "",
              "| backend | L | batch | step ms | tokens/s | peak GiB |", "|---|---|---|---|---|---|"]
    sdpa = {r["length"]: r for r in data["results"] if r["backend"] == "sdpa" and "error" not in r}
    for r in data["results"]:
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['length']} | {r['batch']} | {r['error']} | | |")
            continue
        peak = "-" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        lines.append(f"| {r['backend']} | {r['length']} | {r['batch']} | {r['step_ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {peak} |")
    lines.append("")
    for r in data["results"]:
        base = sdpa.get(r["length"])
        if r["backend"] != "sdpa" and "error" not in r and base:
            lines.append(f"- {r['backend']} at L={r['length']}: {base['step_ms'] / r['step_ms']:.2f}x the SDPA "
                         f"step speed")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, help="the folder of the parts (runs/gpu-report)")
    p.add_argument("--bench", nargs="+", required=True, help="bench part names, in the order they ran")
    p.add_argument("--report", required=True, help="the Markdown report to write")
    p.add_argument("--smoke", action="store_true", help="a smoke run: tiny shapes on the CPU")
    args = p.parse_args(argv)
    out = Path(args.dir)
    how = "`bash scripts/gpu_report.sh" + (" --smoke` (tiny shapes on the CPU: a check of the script, not a GPU "
                                           "figure)" if args.smoke else "`")
    machine = out / "machine.md"
    lines = ["# Performance on a GPU", "", f"Produced by {how}. What each figure means: docs/performance.md "
             "(\"The GPU report\"). All files: " + str(out) + "/.", "",
             machine.read_text(encoding="utf-8").strip() if machine.exists() else "- machine: not recorded", ""]
    lines += decoding_section(out, args.bench) + training_section(out)
    write_text(args.report, "\n".join(lines))
    print(f"wrote {args.report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
