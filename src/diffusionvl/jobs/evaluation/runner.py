"""Running an evaluation task: batched generation (or NELBO scoring) with progress, data-parallel shards, a summary.

Contract: `evaluate(model, samples, task, cfg, decode, rank, world, gather)` evaluates this process's shard
(`samples[rank::world]`), gathers every process's per-sample records and stats with `gather(obj) -> [obj of each
process]` (identity for one process; `accelerate.utils.gather_object` under `accelerate launch`), and returns
`(summary, records)` with records in task order. Generation tasks report accuracy (mean per-sample score of the
task's metric over the short-answer samples, None when there are none), a lenient `contains` rate for exact-match
samples, accuracy per sample type, finish reasons, and decoding stats next to them: tokens per forward (see
`tokens_per_forward`) and tokens/s. Samples with the `describe` metric are kept out of accuracy and per_type:
their record has precision / recall / f1 / predicted / objects / matched (and score = f1), and the summary's
`description` block (None without describe samples) has their mean precision / recall / F1 and how many were cut
at max_new_tokens. `max_new_tokens` is the caller's DecodeConfig (default 128; the CLI picks 16 for synth-vqa,
which cuts most descriptions). The `elbo` task reports NELBO per token and the perplexity bound (overall and per
type) with scoring throughput. Images are read batch by batch, so memory does not grow with the task size.
With a template (a sample's own, else `EvalConfig.template`) the answer follows it (decoding/template.py) and the
record's prediction is the text its slots were filled with (joined by spaces); the whole answer and each slot's text
are kept beside it.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from diffusionvl.core.config import DecodeConfig, option
from diffusionvl.core.errors import check
from diffusionvl.decoding.template import parse as parse_template
from diffusionvl.jobs.evaluation.scoring import DESCRIBE, SCORERS, contains_match, score_description
from diffusionvl.jobs.evaluation.tasks import Sample, Task, build_prompt, get_task, merge_shards, shard

Gather = Callable[[Any], list[Any]]


@dataclass
class EvalConfig:
    """What to evaluate and how to report it (decoding settings come from DecodeConfig)."""

    task: str = option("synth-vqa", "Task: jsonl, synth-vqa or elbo (see docs/evaluation.md).")
    data: str | None = option(None, "Task data: a JSONL file, or for synth-vqa the folder of `diffusionvl data`.")
    image_folder: str | None = option(None, "Folder that relative image paths start from (default: the data's).")
    limit: int | None = option(None, "Evaluate only the first N samples.")
    batch_size: int = option(8, "Samples decoded (or scored) together.")
    out: str | None = option(None, "Output folder for results.json, results.md, samples.jsonl "
                             "(default: eval_results/<task>).")
    metric: str | None = option(None, "Override the scoring metric: exact, choice or anls (default: per task/line).")
    prompt_suffix: str | None = option(
        None, "Text appended to every question (default: the task's instruction, e.g. 'Answer the question using "
        "a single word or phrase.' for jsonl; none for synth-vqa). Use '' for none.")
    system: str | None = option(None, "Optional system message for generation tasks.")
    template: str | None = option(
        None, "Answer template for generation tasks: literal text and <mask:N> slots (docs/templates.md); the text "
        "the slots were filled with, joined by spaces, is what is scored.")
    noise_levels: int = option(8, "elbo: number of noise levels t (midpoint rule over (0, 1)).")
    elbo_seed: int = option(0, "elbo: seed of the masking draws.")

    def validate(self) -> "EvalConfig":
        task = get_task(self.task)
        if self.template is not None:
            check(task.kind == "generate", f"--template is for generation tasks; the {self.task} task scores given "
                                           "answers")
            parse_template(self.template)  # a malformed template fails before the model loads
        check(self.limit is None or self.limit >= 1, f"limit must be >= 1, got {self.limit}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.noise_levels >= 1, f"noise_levels must be >= 1, got {self.noise_levels}")
        check(self.metric is None or self.metric in SCORERS,
              f"metric must be one of {', '.join(SCORERS)}, got {self.metric!r}")
        return self


def load_samples(cfg: EvalConfig) -> tuple[Task, list[Sample]]:
    task = get_task(cfg.task)
    samples = task.load(cfg.data, cfg.image_folder, cfg.metric)
    return task, samples[: cfg.limit] if cfg.limit else samples


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _images(chunk: list[Sample]) -> list[Any]:
    from diffusionvl.core.media import load_image

    return [load_image(s.image) if s.image else None for s in chunk]


def _progress(total: int, enabled: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="sample", dynamic_ncols=True)


def score_sample(sample: Sample, prediction: str) -> dict[str, Any]:
    """The scoring fields of one record: "score" under the sample's metric, plus "contains" for exact match, or
    for DESCRIBE the object-level precision / recall / f1 / predicted / objects / matched with score = f1."""
    if sample.metric == DESCRIBE:
        check(sample.scene is not None, f"sample {sample.id}: the describe metric needs the sample's scene")
        scores = score_description(prediction, sample.scene)
        return {"score": scores["f1"], **scores}
    out = {"score": SCORERS[sample.metric](prediction, sample.answers, sample.choices)}
    if sample.metric == "exact":
        out["contains"] = contains_match(prediction, sample.answers)
    return out


def sample_forwards(stats: dict[str, Any], n: int) -> list[int]:
    """The model forwards each of a batch's `n` samples took (prefill included): the decoding stats'
    `forwards_per_sample` when they have it, else the batch's `forwards` for every sample (older decoders, fakes).
    """
    per_sample = stats.get("forwards_per_sample")
    if per_sample is None:
        return [int(stats["forwards"])] * n
    check(len(per_sample) == n, f"forwards_per_sample has {len(per_sample)} entries for a batch of {n}")
    return [int(f) for f in per_sample]


def tokens_per_forward(token_ids: list[list[int]], finish_reasons: list[str], forwards: list[int]) -> list[float]:
    """Per sample: tokens generated up to and including its first stop token / the forwards that sample took.

    `token_ids` exclude the stop token (the decoding contract); finish reason "stop" says one was generated.
    The summary's tokens_per_forward is the mean of these over samples.
    """
    return [(len(ids) + (reason == "stop")) / max(f, 1) for ids, reason, f in zip(token_ids, finish_reasons, forwards)]


def run_generate(model: Any, samples: list[Sample], suffix: str, cfg: EvalConfig, decode: DecodeConfig,
                 progress: bool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from diffusionvl.backbone.prompts import to_conversation

    records: list[dict[str, Any]] = []
    stats = Counter()
    bar = _progress(len(samples), progress, f"eval {cfg.task}")
    for chunk in _batches(samples, cfg.batch_size):
        system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        convs = [to_conversation(system + [{"role": "user", "content": build_prompt(s, suffix)}],
                                 [im] if im is not None else None) for s, im in zip(chunk, _images(chunk))]
        templates = [s.template if s.template is not None else cfg.template for s in chunk]
        out = model.generate(convs, config=decode, **({"template": templates} if any(templates) else {}))
        tpf = tokens_per_forward(out.token_ids, out.finish_reasons, sample_forwards(out.stats, len(chunk)))
        slots = out.slots or [None] * len(chunk)
        for s, text, ids, reason, rate, fill in zip(chunk, out.texts, out.token_ids, out.finish_reasons, tpf, slots):
            scored = text if fill is None else " ".join(x.strip() for x in fill)
            extra = {} if fill is None else {"answer": text, "slots": fill}
            records.append({**s.to_dict(), "prediction": scored, **extra, **score_sample(s, scored),
                            "tokens": len(ids), "tokens_per_forward": rate, "finish_reason": reason})
        st = out.stats
        stats.update({"tokens": st["tokens"], "forwards": st["forwards"], "seconds": st["seconds"], "batches": 1})
        bar.update(len(chunk))
        acc = _accuracy(records)
        bar.set_postfix(acc="-" if acc is None else f"{acc:.3f}", tpf=f"{_mean_tpf(records):.2f}")
    bar.close()
    return records, dict(stats)


def run_elbo(model: Any, samples: list[Sample], cfg: EvalConfig, rank: int,
             progress: bool) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from diffusionvl.jobs.evaluation.elbo import encode_scored, nelbo, noise_levels

    levels = noise_levels(cfg.noise_levels)
    generator = torch.Generator(device=model.device).manual_seed(cfg.elbo_seed + rank)
    texts = [s for s in samples if s.text is not None]
    answers = [s for s in samples if s.text is None]
    records: list[dict[str, Any]] = []
    stats = Counter()
    bar = _progress(len(samples), progress, "eval elbo")
    for chunk in [*_batches(texts, cfg.batch_size), *_batches(answers, cfg.batch_size)]:
        t0 = time.perf_counter()
        batch = encode_scored(model, chunk, include_end=True, images=_images(chunk))
        totals, counts = nelbo(model, batch, levels, generator)
        stats.update({"seconds": time.perf_counter() - t0, "forwards": len(levels), "batches": 1})
        for s, total, count in zip(chunk, totals.tolist(), counts.tolist()):
            records.append({**s.to_dict(), "nelbo": total, "tokens": count,
                            "nelbo_per_token": total / count if count else float("nan")})
        stats["tokens"] += int(counts.sum())
        bar.update(len(chunk))
        bar.set_postfix(nelbo=f"{sum(r['nelbo'] for r in records) / max(stats['tokens'], 1):.3f}")
    bar.close()
    return records, dict(stats)


def evaluate(model: Any, samples: list[Sample], task: Task, cfg: EvalConfig, decode: DecodeConfig, rank: int = 0,
             world: int = 1, gather: Gather | None = None,
             progress: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate this process's shard, gather all shards, summarize (module docstring)."""
    gather = gather or (lambda obj: [obj])
    decode = decode.resolved(model.config.block_size)
    mine = shard(samples, rank, world)
    t0 = time.perf_counter()
    if task.kind == "elbo":
        records, stats = run_elbo(model, mine, cfg, rank, progress)
    else:
        suffix = task.prompt_suffix if cfg.prompt_suffix is None else cfg.prompt_suffix
        records, stats = run_generate(model, mine, suffix, cfg, decode, progress)
    stats["wall_seconds"] = time.perf_counter() - t0
    merged = merge_shards(gather(records))
    all_stats = gather(stats)
    check(len(merged) == len(samples), f"gathered {len(merged)} results for {len(samples)} samples")
    return summarize(task, merged, all_stats, cfg, decode, world), merged


def combine_stats(parts: list[dict[str, float]]) -> dict[str, float]:
    """Sum the counters of all processes; wall time is the slowest process's."""
    total = Counter()
    for part in parts:
        total.update({k: v for k, v in part.items() if k != "wall_seconds"})
    out = dict(total)
    out["wall_seconds"] = max((p.get("wall_seconds", 0.0) for p in parts), default=0.0)
    return out


def _by_type(records: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    return {t: {"samples": len(rs), key: sum(r[key] for r in rs) / len(rs)} for t, rs in _group(records).items()}


def summarize(task: Task, records: list[dict[str, Any]], parts: list[dict[str, float]], cfg: EvalConfig,
              decode: DecodeConfig, world: int) -> dict[str, Any]:
    stats = combine_stats(parts)
    head = {"task": task.name, "kind": task.kind, "samples": len(records), "processes": world,
            "data": cfg.data, "limit": cfg.limit, "batch_size": cfg.batch_size}
    if task.kind == "elbo":
        tokens = sum(r["tokens"] for r in records)
        per_token = sum(r["nelbo"] for r in records) / max(tokens, 1)
        per_type = {}
        for t, rs in _group(records).items():
            n = sum(r["tokens"] for r in rs)
            per_type[t] = {"samples": len(rs), "tokens": n, "nelbo_per_token": sum(r["nelbo"] for r in rs) / max(n, 1)}
        return {**head, "scored_tokens": tokens, "nelbo_per_token": per_token,
                "perplexity_bound": math.exp(min(per_token, 700.0)), "noise_levels": cfg.noise_levels,
                "elbo_seed": cfg.elbo_seed, "per_type": per_type,
                "speed": {"scored_tokens_per_second": tokens / max(stats.get("seconds", 0.0), 1e-9),
                          "forwards": stats.get("forwards", 0), "seconds": stats.get("seconds", 0.0),
                          "wall_seconds": stats["wall_seconds"]}}
    exact = [r["contains"] for r in records if "contains" in r]
    seconds = stats.get("seconds", 0.0)
    speed = {"tokens": stats.get("tokens", 0), "forwards": stats.get("forwards", 0),
             "tokens_per_forward": _mean_tpf(records),
             "tokens_per_second": stats.get("tokens", 0) / seconds if seconds > 0 else 0.0,
             "decode_seconds": seconds, "wall_seconds": stats["wall_seconds"],
             "samples_per_second": len(records) / max(stats["wall_seconds"], 1e-9)}
    short = [r for r in records if r["metric"] != DESCRIBE]
    return {**head, "accuracy": _accuracy(records),
            "contains": sum(exact) / len(exact) if exact else None,
            "metrics": dict(Counter(r["metric"] for r in records)),
            "per_type": {t: {"samples": v["samples"], "accuracy": v["score"]}
                         for t, v in _by_type(short, "score").items()},
            "description": describe_summary(records),
            "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
            "decoding": dataclasses.asdict(decode), "speed": speed}


def _accuracy(records: list[dict[str, Any]]) -> float | None:
    """Mean score of the short-answer (non-describe) records; None when there are none."""
    scores = [r["score"] for r in records if r["metric"] != DESCRIBE]
    return sum(scores) / len(scores) if scores else None


def _mean_tpf(records: list[dict[str, Any]]) -> float:
    """The summary's tokens_per_forward: the per-sample values (`tokens_per_forward`) averaged over samples."""
    return sum(r["tokens_per_forward"] for r in records) / max(len(records), 1)


def describe_summary(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """{"samples", "precision", "recall", "f1", "truncated"} over the describe records (means; "truncated" counts
    those cut at max_new_tokens), or None when there are none."""
    from diffusionvl.data.describe import mean_f1

    rows = [r for r in records if r["metric"] == DESCRIBE]
    if not rows:
        return None
    return {"samples": len(rows), **mean_f1(rows), "truncated": sum(r["finish_reason"] == "length" for r in rows)}


def _group(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[r["type"]].append(r)
    return dict(sorted(groups.items()))
