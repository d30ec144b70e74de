"""Training-step time and peak memory of the BD3 objective: FlexAttention BlockMask vs dense-mask SDPA.

Contract: builds a random model of the given shape from its config (no download; default: Qwen2.5-1.5B-shaped,
hidden 1536, 28 layers, 12 heads / 2 KV heads, vocab 151936), converts it in memory (mask token, block size B),
and for every (backend, sequence length) times full training steps: the 2L-long [x_t ; x0] forward, backward and
an AdamW step, with fp32 weights and bf16 autocast as `diffusionvl train` uses on GPU. Half of each sequence is
prompt, half answer (loss tokens). Prints a table and writes JSON (--out, atomically after every case, so a run
cut short keeps what it measured). A case that fails (out of memory, a FlexAttention compile error) is recorded
with its error, its traceback goes to stderr, and the next case runs. `--tiny` runs a tiny Qwen2 on CPU (SDPA only:
FlexAttention has no backward on CPU) as a smoke test.

    python scripts/bench_train_attention.py --out bench_train_attention.json          # on a GPU
    python scripts/bench_train_attention.py --tiny --lengths 64 128 --steps 2         # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from typing import Any

import torch

from diffusionvl.core.atomic import write_json

QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6,
                  tie_word_embeddings=True)


def build_model(tiny: bool, device: torch.device, block_size: int) -> Any:
    """A random DiffusionVLModel of the benchmark shape (tiny: the test suite's tiny Qwen2)."""
    import transformers as tf

    from diffusionvl.backbone.tiny import make_tiny, tiny_tokenizer
    from diffusionvl.model.wrapping import wrap

    if tiny:
        hf, tok = make_tiny("qwen2")
    else:
        tok = tiny_tokenizer()
        config = tf.Qwen2Config(**QWEN25_15B, bos_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                pad_token_id=tok.pad_token_id)
        with torch.device(device):
            hf = tf.Qwen2ForCausalLM(config)
    hf.config.max_position_embeddings = max(hf.config.max_position_embeddings, 16384)
    model = wrap(hf.to(device), tok, block_size=block_size)
    return model.train()


def make_batch(model: Any, length: int, batch: int, device: torch.device, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    n_text = len(model.tokenizer) - 16  # ordinary tokens of the small tokenizer (ids are looked up, not assumed)
    ids = torch.randint(0, max(n_text, 2), (batch, length), generator=g)
    ids[:, -1] = model.eos_token_id
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids.to(device), "labels": labels.to(device),
            "attention_mask": torch.ones_like(ids).to(device)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(model: Any, backend: str, length: int, args: argparse.Namespace, device: torch.device) -> dict:
    from diffusionvl.jobs.train.trainer import set_attention

    set_attention(model, backend)
    batch = make_batch(model, length, args.batch, device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step(i: int) -> None:
        with autocast:
            loss = model.training_loss(batch, torch.Generator(device=device).manual_seed(i)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(args.warmup):  # includes FlexAttention's compilation
        step(i)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        step(args.warmup + i)
        sync(device)
        times.append(time.perf_counter() - t0)
    del opt
    ms = 1000 * sorted(times)[len(times) // 2]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"backend": backend, "length": length, "batch": args.batch, "step_ms": ms,
            "tokens_per_s": args.batch * length / (ms / 1000), "peak_gib": peak}


def safe_case(model: Any, backend: str, length: int, args: argparse.Namespace, device: torch.device) -> dict:
    """run_case, or the case with its error (its traceback on stderr) so that the next case still runs."""
    try:
        return run_case(model, backend, length, args, device)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        error = "out of memory"
    except Exception as exc:  # noqa: BLE001 - recorded in the results, never silent
        traceback.print_exc()
        error = f"{type(exc).__name__}: {str(exc)[:200]}".replace("\n", " ")
    return {"backend": backend, "length": length, "batch": args.batch, "error": error}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny Qwen2 (CPU smoke test) instead of the 1.5B shape")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="sequence lengths L (default 2048 4096)")
    p.add_argument("--backends", nargs="+", default=None, help="default: flex_attention sdpa (sdpa only on CPU)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--bf16", type=lambda s: s.lower() in ("1", "true", "yes"), default=None,
                   help="bf16 autocast (default: on with CUDA)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.bf16 = device.type == "cuda" if args.bf16 is None else args.bf16
    lengths = args.lengths or ([64, 128] if args.tiny else [2048, 4096])
    backends = args.backends or (["flex_attention", "sdpa"] if device.type == "cuda" else ["sdpa"])
    model = build_model(args.tiny, device, args.block_size)
    results = []
    for backend in backends:
        for length in lengths:
            results.append(safe_case(model, backend, length, args, device))
            print(json.dumps(results[-1]), file=sys.stderr)
            if args.out:  # after every case: a run cut short keeps what it measured
                write_json(args.out, {"device": str(device), "torch": torch.__version__, "shape": "tiny" if args.tiny
                                      else "qwen2.5-1.5b", "block_size": args.block_size, "bf16": args.bf16,
                                      "results": results})
    print(f"{'backend':<16}{'L':>6}{'step ms':>10}{'tokens/s':>11}{'peak GiB':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['backend']:<16}{r['length']:>6}  {r['error']}")
            continue
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"{r['backend']:<16}{r['length']:>6}{r['step_ms']:>10.1f}{r['tokens_per_s']:>11.0f}{peak:>10}")
    return results


if __name__ == "__main__":
    main()
