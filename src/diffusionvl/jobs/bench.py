"""`diffusionvl bench`: decoding speed of every decoder on one model, in one run, as a table, JSON and a plot.

Contract: `run_bench(cfg)` builds a random-init model of a known shape (`SHAPES`) or loads `cfg.model`, then for
every (batch, prompt length) cell and every case in `cfg.decoders` (registry `CASES`) runs `warmup` untimed and
`repeats` timed generations (round-robin over the cases) of exactly `new_tokens` tokens per sample from random
prompt ids, and reports medians:
tokens/s (all samples), forwards, tokens per forward (per sample), ms per forward, latency to the first block (the
first `block_size` new tokens), peak GPU memory, and ratios to transformers `generate` (tokens/s and per forward).
Stop tokens are disabled for the whole run (random weights emit them at random; every run must produce the same
number of tokens), which the output states. Timing: `time.perf_counter` around each generation with a CUDA
synchronize before and after. Results are written atomically as JSON after every cell (a run cut short keeps what
it measured), with a matplotlib plot next to it when matplotlib is installed.
Cases: hf_ar (transformers generate, greedy, DynamicCache), hf_static (generate with a static cache, which
transformers compiles on CUDA), ar / block_static / block_threshold / full (ours, `fast` as configured),
ar_plain / block_plain (ours forced onto the plain path, fast='off'), ar_fast / block_fast (forced onto the fast
path, fast='on'), reference (decoding/reference.py).
With `template`, our decoders give every sample that answer template (decoding/template.py), `new_tokens` becomes its
length + 1 (the closing token), and each of their rows reports `forwards_saved_by_template`: the forwards of the same
decoder, untimed, filling that many tokens freely, minus the templated run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from diffusionvl.core.atomic import write_file, write_json
from diffusionvl.core.config import DecodeConfig, option
from diffusionvl.core.devices import default_device
from diffusionvl.core.errors import DiffusionVLError, check

Tensor = torch.Tensor

# Random-init shapes: (transformers config class, fields). Only shapes matter for speed.
SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                       tie_word_embeddings=False, max_position_embeddings=32768)),
    "qwen2.5-1.5b": ("Qwen2Config", dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12,
                                         num_key_value_heads=2, intermediate_size=8960, vocab_size=151936,
                                         tie_word_embeddings=True, max_position_embeddings=32768)),
    "smollm2-135m": ("LlamaConfig", dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                                         num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                                         tie_word_embeddings=True, max_position_embeddings=8192)),
    "tiny": ("Qwen2Config", dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 intermediate_size=128, vocab_size=1024, tie_word_embeddings=True,
                                 max_position_embeddings=8192)),
}
DEFAULT_CASES = ["hf_ar", "ar", "block_static", "block_threshold", "reference", "full"]


@dataclass
class BenchConfig:
    """What `diffusionvl bench` measures."""

    shape: str = option("tiny", f"Random-init model shape: {', '.join(SHAPES)} (ignored with --model).")
    model: str | None = option(None, "Benchmark this model folder (diffusion or plain AR) instead of a random shape.")
    device: str | None = option(None, "cpu, cuda, cuda:1, ... (default: cuda if available).")
    dtype: str | None = option(None, "float32, bfloat16, float16 (default: bfloat16 on GPU, float32 on CPU).")
    batch: list[int] = option([1, 8], "Batch sizes to measure.")
    prompt: list[int] = option([512, 2048], "Prompt lengths (random token ids) to measure.")
    new_tokens: int = option(256, "New tokens per sample, exactly (stop tokens are disabled).")
    block_size: int = option(8, "Block size B of the block decoders.")
    steps: int = option(8, "Denoising steps per block S.")
    threshold: float = option(0.9, "Confidence threshold of block_threshold (and the reference's threshold mode).")
    decoders: list[str] = option(list(DEFAULT_CASES), "Cases to run, in order (see `CASES`; extra: hf_static, "
                                 "ar_plain, block_plain, ar_fast, block_fast).")
    fast: str = option("auto", "DecodeConfig.fast for our decoders: auto, on, off or compile.")
    warmup: int = option(1, "Untimed runs per case before timing (captures CUDA graphs, compiles).")
    repeats: int = option(3, "Timed runs per case; the median is reported.")
    seed: int = option(0, "Seed of the random weights and prompts.")
    threads: int | None = option(None, "CPU threads for torch (default: torch's choice; 1 steadies shared machines).")
    agreement: bool = option(True, "Also report how many greedy tokens our fast path shares with the plain path "
                             "(first batch size and prompt length; on CPU the fast side is fast='on').")
    output: str = option("bench.json", "JSON result file (written atomically after every cell).")
    plot: bool = option(True, "Also write a plot of tokens/s per decoder next to the JSON (needs matplotlib).")
    template: str | None = option(
        None, "Answer template (literal text and <mask:N> slots, docs/templates.md) for our decoders: every sample "
        "gets it, new_tokens becomes its length + 1, and each row reports the forwards its fixed tokens saved "
        "against the same decoder filling that many tokens freely.")

    def validate(self) -> "BenchConfig":
        check(self.model is not None or self.shape in SHAPES,
              f"unknown shape {self.shape!r}; choose one of {', '.join(SHAPES)} or pass --model")
        unknown = [d for d in self.decoders if d not in CASES]
        check(not unknown, f"unknown bench case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
        check(bool(self.batch) and all(b >= 1 for b in self.batch), "batch sizes must be >= 1")
        check(bool(self.prompt) and all(p >= 1 for p in self.prompt), "prompt lengths must be >= 1")
        check(self.new_tokens >= 1 and self.repeats >= 1 and self.warmup >= 0,
              "new_tokens and repeats must be >= 1, warmup >= 0")
        check(1 <= self.steps <= self.block_size, "steps must be in 1..block_size")
        check(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        check(0 <= self.seed < 2 ** 32, f"seed must be in 0..{2 ** 32 - 1}, got {self.seed}")
        check(self.fast in ("auto", "on", "off", "compile"),
              f"fast must be auto, on, off or compile, got {self.fast!r}")
        return self


# ---- model --------------------------------------------------------------------------------------------------------
def _device_dtype(cfg: BenchConfig) -> tuple[torch.device, torch.dtype]:
    dev = default_device(cfg.device)
    name = cfg.dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    dtype = getattr(torch, name, None)
    check(isinstance(dtype, torch.dtype), f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dev, dtype


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Any:
    """A random-init model of `shape` with the offline tiny tokenizer, wrapped as a diffusion model."""
    import transformers

    from diffusionvl.backbone.tiny import tiny_tokenizer
    from diffusionvl.model.wrapping import wrap

    cls_name, fields = SHAPES[shape]
    tok = tiny_tokenizer()
    config = getattr(transformers, cls_name)(**fields, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                             bos_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    with torch.device(device):  # initialize on the device: a 7B model is built in seconds on a GPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return wrap(model.eval(), tok, block_size=8)


def load_bench_model(cfg: BenchConfig) -> Any:
    dev, dtype = _device_dtype(cfg)
    if cfg.model is None:
        return build_model(cfg.shape, dev, dtype, cfg.seed)
    from diffusionvl.model.conversion import load

    return load(cfg.model, device=dev, dtype=dtype, allow_unconverted=True)


def random_prompts(model: Any, batch: int, length: int, seed: int) -> Tensor:
    """[batch, length] ids drawn from the tokenizer's ordinary tokens (no special, mask or stop ids)."""
    tok = model.tokenizer
    banned = set(tok.all_special_ids) | {model.mask_token_id, model.pad_token_id, *model.stop_token_ids}
    pool = torch.tensor([i for i in range(min(len(tok), model.vocab_size)) if i not in banned], dtype=torch.long)
    g = torch.Generator().manual_seed(seed * 1000003 + batch * 7919 + length)
    return pool[torch.randint(len(pool), (batch, length), generator=g)]


@contextlib.contextmanager
def stop_tokens_disabled(model: Any) -> Iterator[None]:
    """Every run generates exactly max_new_tokens: no stop token for our decoders nor for transformers."""
    saved = (model.stop_token_ids, model.hf_model.generation_config.eos_token_id)
    model.stop_token_ids = []
    model.hf_model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.stop_token_ids, model.hf_model.generation_config.eos_token_id = saved


# ---- cases --------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    tokens: int  # new tokens, all samples
    forwards: int
    seconds: float
    first_block_seconds: float | None
    backend: str
    forwards_free: int | None = None  # with --template: the same decoder's forwards for as many tokens, no template


@dataclass
class Ctx:
    model: Any
    cfg: BenchConfig
    device: torch.device
    template: list[int] | None = None  # --template's ids (decoding/template.py)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[Any, float]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    return out, time.perf_counter() - t0


def _hf_case(static: bool) -> Callable[[Ctx, Tensor], Run]:
    def case(ctx: Ctx, ids: Tensor) -> Run:
        hf, n = ctx.model.hf_model, ctx.cfg.new_tokens
        ids = ids.to(ctx.device)
        kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                      pad_token_id=ctx.model.pad_token_id)
        if static:
            kwargs["cache_implementation"] = "static"
        counter = [0]
        hook = hf.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
        try:
            with torch.inference_mode():
                _, first = timed(ctx.device, lambda: hf.generate(ids, max_new_tokens=ctx.cfg.block_size, **kwargs))
                counter[0] = 0
                out, seconds = timed(ctx.device, lambda: hf.generate(ids, max_new_tokens=n, **kwargs))
        finally:
            hook.remove()
        new = out.shape[1] - ids.shape[1]
        if new != n:
            raise DiffusionVLError(f"transformers generate produced {new} tokens instead of {n}")
        return Run(new * ids.shape[0], counter[0], seconds, first, "transformers" + ("/static" if static else ""))

    return case


def _decode_config(c: BenchConfig, decoder: str, policy: str, fast: str) -> DecodeConfig:
    block = decoder != "ar"  # AR: block size 1, one step
    return DecodeConfig(decoder=decoder, max_new_tokens=c.new_tokens, policy=policy, threshold=c.threshold, fast=fast,
                        block_size=c.block_size if block else None, steps=c.steps if block else None)


def _generate(ctx: Ctx, ids: Tensor, dcfg: DecodeConfig, template: list[int] | None = None) -> Any:
    """Our decoders on pre-tokenized prompts, through the public generation front end -> GenerationOutput."""
    from diffusionvl.backbone.adapters import Encoded
    from diffusionvl.decoding import run_encoded

    encoded = Encoded(input_ids=ids.tolist())
    final = None
    for final in run_encoded(ctx.model, encoded, dcfg, [template] * ids.shape[0] if template else None):
        pass
    return final.output


def _ours(decoder: str, policy: str = "static", fast: str | None = None) -> Callable[[Ctx, Tensor], Run]:
    def case(ctx: Ctx, ids: Tensor) -> Run:
        dcfg = _decode_config(ctx.cfg, decoder, policy, fast or ctx.cfg.fast)
        out, seconds = timed(ctx.device, lambda: _generate(ctx, ids, dcfg, ctx.template))
        st = out.stats
        free = _generate(ctx, ids, dcfg).stats["forwards"] if ctx.template else None  # untimed
        return Run(st["tokens"], st["forwards"], seconds, st["first_block_seconds"], st["backend"], free)

    return case


def _reference(policy: str = "static") -> Callable[[Ctx, Tensor], Run]:
    def case(ctx: Ctx, ids: Tensor) -> Run:
        from diffusionvl.decoding.reference import reference_generate

        c = ctx.cfg
        res, seconds = timed(ctx.device, lambda: reference_generate(
            ctx.model, ids, c.new_tokens, c.block_size, c.steps, policy, c.threshold, 0.0, ctx.model.stop_token_ids))
        return Run(res.ids.numel(), res.forwards, seconds, res.first_block_seconds, "reference (DynamicCache)")

    return case


CASES: dict[str, tuple[str, Callable[[Ctx, Tensor], Run]]] = {
    "hf_ar": ("transformers generate, greedy AR", _hf_case(static=False)),
    "hf_static": ("transformers generate, static cache (+ its compile on CUDA)", _hf_case(static=True)),
    "ar": ("ours, AR", _ours("ar")),
    "block_static": ("ours, block B/S static", _ours("block", "static")),
    "block_threshold": ("ours, block B/S threshold", _ours("block", "threshold")),
    "full": ("ours, full-sequence diffusion (no cache)", _ours("full", "static")),
    "ar_plain": ("ours, AR, plain path (fast='off')", _ours("ar", fast="off")),
    "block_plain": ("ours, block static, plain path (fast='off')", _ours("block", "static", fast="off")),
    "ar_fast": ("ours, AR, fast path (fast='on')", _ours("ar", fast="on")),
    "block_fast": ("ours, block static, fast path (fast='on')", _ours("block", "static", fast="on")),
    "reference": ("reference-style block loop (DynamicCache, commit forward, per-row top-k)", _reference()),
}


# ---- measuring ----------------------------------------------------------------------------------------------------
def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _timed_run(ctx: Ctx, name: str, ids: Tensor) -> tuple[Run, float | None]:
    _peak_reset(ctx.device)
    run = CASES[name][1](ctx, ids)
    return run, _peak_gib(ctx.device)


def measure_cell(ctx: Ctx, ids: Tensor, names: list[str], on_case: Callable[[str], None]) -> list[dict[str, Any]]:
    """Warm every case up, then time `repeats` rounds that visit the cases in turn (a load change on a shared
    machine then hits every case alike); one row of medians per case."""
    for name in names:
        for _ in range(ctx.cfg.warmup):
            CASES[name][1](ctx, ids)
        on_case(f"warm-up {name}")
    runs: dict[str, list[tuple[Run, float | None]]] = {name: [] for name in names}
    for _ in range(ctx.cfg.repeats):
        for name in names:
            runs[name].append(_timed_run(ctx, name, ids))
            on_case(name)
    return [_row(ctx, name, ids, runs[name]) for name in names]


def _row(ctx: Ctx, name: str, ids: Tensor, timed_runs: list[tuple[Run, float | None]]) -> dict[str, Any]:
    runs = [r for r, _ in timed_runs]
    peaks = [p for _, p in timed_runs if p is not None]
    seconds = statistics.median(r.seconds for r in runs)
    last, batch = runs[-1], ids.shape[0]
    firsts = [r.first_block_seconds for r in runs if r.first_block_seconds is not None]
    return {
        "decoder": name, "label": CASES[name][0], "batch": batch, "prompt": ids.shape[1], "tokens": last.tokens,
        "seconds": seconds, "seconds_all": [r.seconds for r in runs],
        "tokens_per_second": last.tokens / seconds, "forwards": last.forwards,
        "tokens_per_forward": last.tokens / batch / max(last.forwards, 1),
        "ms_per_forward": 1000.0 * seconds / max(last.forwards, 1),
        "first_block_ms": 1000.0 * statistics.median(firsts) if firsts else None,
        "peak_memory_gib": max(peaks) if peaks else None, "backend": last.backend,
        "forwards_saved_by_template": None if last.forwards_free is None else last.forwards_free - last.forwards,
    }


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratios to transformers generate in the same cell: tokens/s, and speed per forward (HF ms / our ms)."""
    hf = next((r for r in rows if r["decoder"] == "hf_ar"), None)
    for r in rows:
        r["tokens_per_second_vs_hf"] = r["tokens_per_second"] / hf["tokens_per_second"] if hf else None
        r["per_forward_speed_vs_hf"] = hf["ms_per_forward"] / r["ms_per_forward"] if hf else None


def _meta(ctx: Ctx) -> dict[str, Any]:
    import transformers

    model, dev = ctx.model, ctx.device
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    return {
        "model": ctx.cfg.model or f"random init, shape {ctx.cfg.shape}", "parameters": n_params,
        "dtype": str(model.dtype).replace("torch.", ""), "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "stop_tokens": "disabled: every run generates exactly new_tokens tokens per sample",
        "timing": "median of repeats after warm-up; perf_counter with CUDA synchronize before and after",
        "config": asdict(ctx.cfg),
    }


def run_bench(cfg: BenchConfig, model: Any = None, progress: bool = True) -> dict[str, Any]:
    """Measure every cell and case (module docstring); returns {"meta", "results"} and writes cfg.output."""
    from tqdm.auto import tqdm

    from diffusionvl.decoding.static import clear_sessions

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model = model if model is not None else load_bench_model(cfg)
    ctx = Ctx(model, cfg, model.device)
    if cfg.template is not None:
        from diffusionvl.decoding.template import budget, tokenize_text

        ctx.template = tokenize_text(cfg.template, model.tokenizer, model.mask_token_id, model.max_positions)
        ctx.cfg = cfg = dataclasses.replace(cfg, new_tokens=budget(ctx.template))
    result: dict[str, Any] = {"meta": _meta(ctx), "results": []}
    cells = [(b, p) for p in cfg.prompt for b in cfg.batch]
    blocks = any(d.startswith("block") or d == "reference" for d in cfg.decoders)
    for p in cfg.prompt:  # every cell fits the context, or a one-line error before anything runs
        model.check_prompt_lengths([[0] * p], cfg.new_tokens, cfg.block_size if blocks else None)
    bar = tqdm(total=len(cells) * len(cfg.decoders) * (cfg.repeats + 1), desc="bench", disable=not progress)
    with stop_tokens_disabled(model):
        for b, p in cells:
            ids = random_prompts(model, b, p, cfg.seed)

            def tick(what: str) -> None:
                bar.set_postfix_str(f"batch {b}, prompt {p}: {what}")
                bar.update(1)

            rows = measure_cell(ctx, ids, cfg.decoders, tick)
            add_ratios(rows)
            result["results"].extend(rows)
            clear_sessions(model)
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(cfg.output, result)
        if cfg.agreement:
            bar.set_postfix_str("fast vs plain agreement")
            result["meta"]["agreement"] = agreement(ctx, random_prompts(model, min(cfg.batch), min(cfg.prompt),
                                                                        cfg.seed + 1))
            write_json(cfg.output, result)
    bar.close()
    if cfg.plot:
        result["meta"]["plot"] = write_plot(result, Path(cfg.output).with_suffix(".png"))
        write_json(cfg.output, result)
    return result


def agreement(ctx: Ctx, ids: Tensor) -> list[dict[str, Any]]:
    """Greedy tokens of the fast path vs the plain path: mean identical-prefix fraction and exact-match samples."""
    from diffusionvl.decoding.backend import choose

    fast = ctx.cfg.fast if choose(DecodeConfig(fast=ctx.cfg.fast), ctx.device).path == "fast" else "on"
    out = []
    for decoder in ("ar", "block"):
        plain = _generate(ctx, ids, _decode_config(ctx.cfg, decoder, "static", "off")).token_ids
        out_fast = _generate(ctx, ids, _decode_config(ctx.cfg, decoder, "static", fast))
        ours, backend = out_fast.token_ids, out_fast.stats["backend"]
        prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
                  for x, y in zip(plain, ours)]
        out.append({"decoder": decoder, "fast_backend": backend, "samples": len(plain),
                    "exact_match_samples": sum(x == y for x, y in zip(plain, ours)),
                    "identical_prefix_fraction": statistics.mean(p / max(len(x), 1) for p, x in zip(prefix, plain))})
    return out


# ---- reporting ----------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render_table(result: dict[str, Any]) -> Any:
    """A rich Table of all rows, grouped by (batch, prompt)."""
    from rich.table import Table

    meta = result["meta"]
    template = meta["config"].get("template")
    table = Table(title=f"{meta['model']} | {meta['dtype']} | {meta['device_name']} | "
                        f"{meta['config']['new_tokens']} new tokens, stop tokens disabled"
                        + (f" | template {template!r}" if template else ""))
    for col in ("batch", "prompt", "decoder", "tok/s", "forwards", "tok/fwd", "ms/fwd", "1st block ms",
                "peak GiB", "x HF tok/s", "x HF /fwd", "backend") + (("fwd saved by template",) if template else ()):
        table.add_column(col, justify="left" if col in ("decoder", "backend") else "right")
    previous = None
    for r in result["results"]:
        if previous is not None and (r["batch"], r["prompt"]) != previous:
            table.add_section()
        previous = (r["batch"], r["prompt"])
        table.add_row(str(r["batch"]), str(r["prompt"]), r["decoder"], _fmt(r["tokens_per_second"], ".1f"),
                      str(r["forwards"]), _fmt(r["tokens_per_forward"], ".2f"), _fmt(r["ms_per_forward"], ".2f"),
                      _fmt(r["first_block_ms"], ".1f"), _fmt(r["peak_memory_gib"], ".2f"),
                      _fmt(r["tokens_per_second_vs_hf"], ".2f"), _fmt(r["per_forward_speed_vs_hf"], ".2f"),
                      r["backend"], *((_fmt(r.get("forwards_saved_by_template"), "d"),) if template else ()))
    return table


def markdown_table(result: dict[str, Any]) -> str:
    """The same rows and columns as a Markdown table (for docs/performance.md)."""
    template = result.get("meta", {}).get("config", {}).get("template")  # rows alone (gpu_report) have no meta
    head = ("| batch | prompt | decoder | tok/s | forwards | tok/fwd | ms/fwd | 1st block ms | peak GiB | x HF tok/s "
            "| x HF /fwd | backend |" + (" fwd saved by template |" if template else ""))
    lines = [head, "|" + "---|" * (13 if template else 12)]
    for r in result["results"]:
        saved = f" {_fmt(r.get('forwards_saved_by_template'), 'd')} |" if template else ""
        lines.append(f"| {r['batch']} | {r['prompt']} | {r['decoder']} | {_fmt(r['tokens_per_second'], '.1f')} | "
                     f"{r['forwards']} | {_fmt(r['tokens_per_forward'], '.2f')} | {_fmt(r['ms_per_forward'], '.2f')} | "
                     f"{_fmt(r['first_block_ms'], '.1f')} | {_fmt(r['peak_memory_gib'], '.2f')} | "
                     f"{_fmt(r['tokens_per_second_vs_hf'], '.2f')} | {_fmt(r['per_forward_speed_vs_hf'], '.2f')} | "
                     f"{r['backend']} |{saved}")
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path) -> str | None:
    """Grouped bars of tokens/s per decoder, one group per (batch, prompt) cell. None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = result["results"]
    cells = list(dict.fromkeys((r["batch"], r["prompt"]) for r in rows))
    names = list(dict.fromkeys(r["decoder"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(cells) * len(names) / 3), 4.5))
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        speed = {(r["batch"], r["prompt"]): r["tokens_per_second"] for r in rows if r["decoder"] == name}
        values = [speed.get(c, 0.0) for c in cells]
        ax.bar([k + i * width for k in range(len(cells))], values, width, label=name)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cells))], [f"batch {b}\nprompt {p}" for b, p in cells])
    ax.set_ylabel("tokens / s (all samples)")
    ax.set_title(f"{result['meta']['model']} ({result['meta']['dtype']}, {result['meta']['device_name']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)
    return str(path)
