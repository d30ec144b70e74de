"""The tiny-VLM recipe's training record: what each stage showed the model and how its grounding grew.

Contract (all read from a recipe folder `out`, nothing recomputed):
- `curriculum(cfg, out)`: one row per finished training stage with its images, epochs as trained and question
  presentations per type and of binding questions (its data's question counts x epochs trained; the binding stage
  adds its replayed recognition images; the translation's subset is counted from its file).
- `grounding_points(out)`: every eval a stage logged (train/grounding.py) as {stage, step, minutes, ...} with
  minutes counted from the first stage's start (each stage's wall time added to the next).
- `plot_grounding(points, path)`: image dependence and accuracy per question type against minutes of training,
  stage boundaries marked (a PNG; None without matplotlib). `curriculum_markdown(rows)`: the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusionvl.core.atomic import write_file

STAGES = ("stage1", "recognition", "stage2", "refresh", "translate", "direct")
REPLAY = "replay-"  # id prefix of a record one stage replays from another stage's data


def is_replay(record: dict[str, Any]) -> bool:
    return str(record.get("id", "")).startswith(REPLAY)
SHOWN_TYPES = ("shape", "colour", "count", "position", "exist", "relation", "describe")


def _json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def curriculum(cfg: Any, out: Path) -> list[dict[str, Any]]:
    """What each finished stage showed the model. Epochs are counted as trained (steps x global batch / records of
    its data file: a stage that reached its target early shows fewer than planned); the binding stage replays
    recognition images and the refresh stage main images, each counted with its own data's question mix."""
    rows = []
    for stage, folder, file in (("recognition", "data-recognition", "train.json"), ("stage2", "data", "stage2.json"),
                                ("refresh", "data-recognition", "refresh.json")):
        summary, trained = _json(out / folder / "summary.json"), _json(out / stage / "summary.json")
        records = _json(out / folder / file)
        if summary is None or trained is None or not records:
            continue
        epochs = trained["steps"] * trained["global_batch"] / len(records)
        replayed = sum(map(is_replay, records))
        parts = [(summary, len(records) - replayed)]
        other = _json(out / ("data-recognition" if folder == "data" else "data") / "summary.json")
        if replayed and other is not None:  # replayed images: counted with their own data's question mix
            parts.append((other, replayed))
        per_type: dict[str, int] = {}
        binding = 0
        for part, n in parts:
            share = n / max(part["images"]["train"], 1)
            for t, k in part["questions"]["train"].items():
                if k:
                    per_type[t] = per_type.get(t, 0) + round(k * share * epochs)
            binding += round(part.get("binding", {}).get("train", 0) * share * epochs)
        rows.append({"stage": stage, "images": len(records), "epochs": round(epochs, 2), "presentations": per_type,
                     "binding": binding, "total": sum(per_type.values())})
    records = _json(out / "data" / "translate.json")
    trained = _json(out / "translate" / "summary.json")
    if records and trained is not None:
        questions = sum(len(r["conversations"]) // 2 for r in records)
        epochs = trained["steps"] * trained["global_batch"] / len(records)
        rows.append({"stage": "translate", "images": len(records), "epochs": round(epochs, 2), "presentations": {},
                     "binding": None, "total": round(questions * epochs)})
    return rows


def curriculum_markdown(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    types = [t for t in SHOWN_TYPES if any(t in r["presentations"] for r in rows)]
    lines = ["", "What each stage showed the model (question presentations = questions in its data x epochs):", "",
             "| stage | images | epochs | " + " | ".join(types) + " | binding (shape/colour, 2+ objects) | all questions |",
             "|---|---|---|" + "---|" * len(types) + "---|---|"]
    for r in rows:
        cells = " | ".join(f"{r['presentations'].get(t, 0):,}" if r["presentations"] else "-" for t in types)
        bind = "-" if r.get("binding") is None else f"{r['binding']:,}"
        lines.append(f"| {r['stage']} | {r['images']:,} | {r['epochs']} | {cells} | {bind} | {r['total']:,} |")
    return lines


def grounding_points(out: Path) -> list[dict[str, Any]]:
    """Eval entries of every stage's log in training order. A resumed stage's clock restarts: its time is added to
    what the stage had run before the interruption, and evals the resumed run repeats replace the earlier ones."""
    points: list[dict[str, Any]] = []
    offset = 0.0
    for stage in STAGES:
        log = out / stage / "log.jsonl"
        if not log.is_file():
            continue
        base = last = 0.0
        by_step: dict[int, dict[str, Any]] = {}
        for line in log.read_text().splitlines():
            entry = json.loads(line)
            if entry.get("event") == "resume":
                base = last
            elif "elapsed_s" in entry:
                last = base + entry["elapsed_s"]
                if "eval_loss" in entry:
                    by_step[entry["step"]] = {"stage": stage, **entry, "minutes": (offset + last) / 60}
        points += [by_step[k] for k in sorted(by_step)]
        offset += last
    return points


def plot_grounding(points: list[dict[str, Any]], path: Path, title: str = "tiny-VLM") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not points:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    minutes = [p["minutes"] for p in points]
    left.plot(minutes, [p.get("image_dependence", float("nan")) for p in points], "o-", ms=3)
    left.set_ylabel("eval loss, rolled images - right images")
    left.set_title(f"{title}: image dependence")
    for t in SHOWN_TYPES:
        key = f"accuracy/{t}"
        if any(key in p for p in points):
            right.plot(minutes, [100 * p.get(key, float("nan")) for p in points], "o-", ms=3, label=t)
    right.set_ylabel("accuracy on held-out validation questions (%)")
    right.set_title(f"{title}: accuracy per question type")
    right.legend(fontsize=8, ncol=2)
    for ax in (left, right):
        ax.set_xlabel("minutes of training (2 CPU threads)")
        ax.grid(alpha=0.3)
        starts = {}
        for p in points:
            starts.setdefault(p["stage"], p["minutes"])
        for stage, start in starts.items():
            ax.axvline(start, color="grey", lw=0.8, ls="--")
            ax.annotate(stage, (start, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top")
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return path
