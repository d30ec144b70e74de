"""Evaluation output: results.json (summary), samples.jsonl (one record per sample), results.md (tables).

Contract: `write_results(out_dir, summary, records)` writes the three files atomically (`diffusionvl.core.atomic`: plain
permissions, temporary file renamed into place), so an interrupted run never leaves a half-written result;
`check_out_dir(out_dir)` refuses, before any work, a folder that write_results could not write into (a file, a path
below a file, a folder without write permission).
`markdown(summary)` renders the summary as Markdown tables with quality next to speed (accuracy beside
tokens/forward and tokens/s; NELBO beside scoring throughput), plus the per-type breakdown (short-answer types) and,
when the task had describe samples, one line with their object-level F1, precision and recall.
Pure formatting apart from `write_results`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusionvl.core.atomic import write_json, write_text
from diffusionvl.core.errors import check


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _generation_tables(s: dict[str, Any]) -> list[str]:
    d, sp = s["decoding"], s["speed"]
    policy = d["policy"] + (f" (tau={d['threshold']:g})" if d["policy"] == "threshold" else "")
    lines = ["| task | samples | accuracy | contains | tokens/forward | tokens/s | decoder | B | S | policy "
             "| temperature | max new tokens |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| {s['task']} | {s['samples']} | {_pct(s['accuracy'])} | {_pct(s['contains'])} "
             f"| {sp['tokens_per_forward']:.2f} | {sp['tokens_per_second']:.1f} | {d['decoder']} | {d['block_size']} "
             f"| {d['steps']} | {policy} | {d['temperature']:g} | {d['max_new_tokens']} |", ""]
    lines += ["| type | samples | accuracy |", "|---|---|---|"]
    lines += [f"| {t} | {v['samples']} | {_pct(v['accuracy'])} |" for t, v in s["per_type"].items()]
    if s.get("description"):
        lines += ["", _description_line(s["description"], d["max_new_tokens"])]
    reasons = ", ".join(f"{k}: {v}" for k, v in sorted(s["finish_reasons"].items()))
    lines += ["", f"Finish reasons: {reasons}. Decoding: {sp['tokens']} tokens in {sp['forwards']} forwards, "
              f"{sp['decode_seconds']:.2f} s decoding, {sp['wall_seconds']:.2f} s wall, {s['processes']} process(es)."]
    return lines


def _description_line(desc: dict[str, Any], max_new_tokens: int) -> str:
    """The describe samples' object-level scores (they are not part of accuracy or the per-type table)."""
    return (f"Description (describe, {desc['samples']} samples, object-level, not in accuracy): F1 {_pct(desc['f1'])}, "
            f"precision {_pct(desc['precision'])}, recall {_pct(desc['recall'])}; {desc['truncated']} cut at "
            f"max new tokens ({max_new_tokens}).")


def _elbo_tables(s: dict[str, Any]) -> list[str]:
    sp = s["speed"]
    lines = ["| task | sequences | scored tokens | NELBO/token (nats) | perplexity bound | noise levels "
             "| scored tokens/s |", "|---|---|---|---|---|---|---|",
             f"| {s['task']} | {s['samples']} | {s['scored_tokens']} | {s['nelbo_per_token']:.4f} "
             f"| {s['perplexity_bound']:.2f} | {s['noise_levels']} | {sp['scored_tokens_per_second']:.1f} |", ""]
    lines += ["| type | sequences | tokens | NELBO/token |", "|---|---|---|---|"]
    lines += [f"| {t} | {v['samples']} | {v['tokens']} | {v['nelbo_per_token']:.4f} |"
              for t, v in s["per_type"].items()]
    return lines


def markdown(summary: dict[str, Any]) -> str:
    title = f"# diffusionvl eval: {summary['task']}"
    body = _elbo_tables(summary) if summary["kind"] == "elbo" else _generation_tables(summary)
    return "\n".join([title, "", *body, ""])


def check_out_dir(out_dir: str | os.PathLike[str]) -> None:
    """One line now, not after the whole evaluation, if the results could not be written to `out_dir`."""
    out = Path(out_dir)
    check(not out.exists() or out.is_dir(), f"--out {out} exists and is not a folder; choose a folder")
    existing = next(p for p in (out, *out.parents) if p.exists())
    check(existing.is_dir(), f"--out {out} cannot be created: {existing} is a file, not a folder")
    check(os.access(existing, os.W_OK), f"--out {out} cannot be written: no write permission in {existing}")


def write_results(out_dir: str | os.PathLike[str], summary: dict[str, Any],
                  records: list[dict[str, Any]]) -> dict[str, Path]:
    out = Path(out_dir)
    paths = {"json": out / "results.json", "markdown": out / "results.md", "samples": out / "samples.jsonl"}
    write_text(paths["samples"], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_json(paths["json"], summary)
    write_text(paths["markdown"], markdown(summary))
    return paths
