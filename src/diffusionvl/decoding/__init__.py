"""Generation front end: prompts -> batch layout -> a decoder from the registry -> texts, token ids, stats, streams.

Contract: `run(model, conversations, cfg)` (or `run_encoded(model, encoded, cfg)` for a batch the caller already
tokenized) is a generator of `StreamEvent`s, one per finished block (or AR chunk), carrying each sample's newly
final token ids and text; its last event has `final=True` and the complete `GenerationOutput`. `generate` drains
it; `stream` forwards it. Every sample stops at its own first stop token or after `max_new_tokens`; the returned
ids exclude the stop token. Decoders come from `DECODERS` by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from diffusionvl.config import DecodeConfig
from diffusionvl.decoding.ar import ar_decode
from diffusionvl.decoding.block import DecodeState, block_decode, full_decode
from diffusionvl.decoding.layout import build_layout
from diffusionvl.errors import DiffusionVLError

Tensor = torch.Tensor

DECODERS: dict[str, Callable[..., Iterator[DecodeState]]] = {
    "block": block_decode,
    "ar": ar_decode,
    "full": full_decode,
}


@dataclass
class GenerationOutput:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]  # "stop" (stop token) or "length" (max_new_tokens)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.texts[0]


@dataclass
class StreamEvent:
    new_token_ids: list[list[int]]  # per sample, tokens that became final since the previous event
    new_texts: list[str]  # per sample, text delta
    done: list[bool]
    final: bool = False
    output: GenerationOutput | None = None
    forwards: int = 0  # model forwards spent on the batch so far (prefill included)


def _cut(ids: list[int], stop: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(ids):
        if t in stop:
            return ids[:i], True
    return ids, False


class _TextTracker:
    """Incremental detokenization: emits only text that can no longer change (no dangling partial characters)."""

    def __init__(self, tokenizer: Any, n: int):
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.texts = [""] * n

    def update(self, i: int, ids: list[int], final: bool) -> tuple[list[int], str]:
        new_ids = ids[len(self.ids[i]):]
        self.ids[i] = ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        if not final and text.endswith("\ufffd"):
            return new_ids, ""
        delta = text[len(self.texts[i]):] if text.startswith(self.texts[i]) else text
        self.texts[i] = text
        return new_ids, delta


def _layout(model: Any, encoded: Any, cfg: DecodeConfig) -> Any:
    positions = [model.adapter.prompt_positions(ids, encoded.vision, i) for i, ids in enumerate(encoded.input_ids)]
    bsz = cfg.block_size
    if cfg.decoder == "full":
        canvas = -(-cfg.max_new_tokens // bsz) * bsz
        prefill = max(len(x) for x in encoded.input_ids)
        return build_layout(encoded.input_ids, positions, bsz, cfg.max_new_tokens, model.mask_token_id,
                            model.pad_token_id, prefill_to=prefill, canvas=canvas)
    fill = model.pad_token_id if cfg.decoder == "ar" else model.mask_token_id
    return build_layout(encoded.input_ids, positions, 1 if cfg.decoder == "ar" else bsz, cfg.max_new_tokens,
                        fill, model.pad_token_id)


def _outputs(state: DecodeState, stop: set[int], max_new: int) -> tuple[list[list[int]], list[bool]]:
    layout = state.layout
    rows = state.tokens[:, : state.final_end].tolist()
    out, stopped = [], []
    for i, row in enumerate(rows):
        g0 = int(layout.gen_start[i])
        ids, hit = _cut(row[g0:g0 + max_new], stop)
        out.append(ids)
        stopped.append(hit)
    return out, stopped


def _resolve(model: Any, cfg: DecodeConfig) -> DecodeConfig:
    cfg = cfg.resolved(model.config.block_size)
    if cfg.decoder not in DECODERS:
        raise DiffusionVLError(f"unknown decoder {cfg.decoder!r}; choose one of {', '.join(DECODERS)}")
    return cfg


def run(model: Any, conversations: list[Any], cfg: DecodeConfig) -> Iterator[StreamEvent]:
    cfg = _resolve(model, cfg)
    yield from run_encoded(model, model.adapter.encode(conversations), cfg)


def run_encoded(model: Any, encoded: Any, cfg: DecodeConfig) -> Iterator[StreamEvent]:
    """`run` on an already tokenized batch (`adapters.Encoded`), e.g. ids and pixels made by the caller."""
    cfg = _resolve(model, cfg)
    model.check_prompt_lengths(encoded.input_ids, cfg.max_new_tokens)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    stop = set(model.stop_token_ids)
    stop_ids = torch.tensor(sorted(stop), device=model.device)
    tracker = _TextTracker(model.tokenizer, len(encoded.input_ids))
    t0 = time.perf_counter()
    first_block_s: float | None = None
    state: DecodeState | None = None
    with torch.inference_mode():
        layout = _layout(model, encoded, cfg)
        for state in DECODERS[cfg.decoder](model, layout, encoded.vision, cfg, stop_ids, generator):
            ids, stopped = _outputs(state, stop, cfg.max_new_tokens)
            done = state.done.tolist()
            if first_block_s is None:
                first_block_s = time.perf_counter() - t0
            deltas = [tracker.update(i, x, done[i]) for i, x in enumerate(ids)]
            yield StreamEvent([d[0] for d in deltas], [d[1] for d in deltas], done,
                              forwards=state.forwards + state.prefill_forwards)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - t0
    assert state is not None
    ids, stopped = _outputs(state, stop, cfg.max_new_tokens)
    texts = [model.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    n_tokens = sum(len(x) + int(h) for x, h in zip(ids, stopped))  # the stop token was generated too
    forwards = state.forwards + state.prefill_forwards
    stats = {
        "decoder": cfg.decoder, "block_size": cfg.block_size, "steps": cfg.steps, "policy": cfg.policy,
        "batch": len(ids), "tokens": n_tokens, "forwards": forwards, "prefill_forwards": state.prefill_forwards,
        # per sequence: how many tokens one forward pass yields on average (prefill included)
        "tokens_per_forward": n_tokens / len(ids) / max(forwards, 1), "seconds": seconds,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else 0.0, "first_block_seconds": first_block_s,
    }
    output = GenerationOutput(texts, ids, ["stop" if h else "length" for h in stopped], stats)
    yield StreamEvent([[] for _ in ids], ["" for _ in ids], [True] * len(ids), final=True, output=output,
                      forwards=forwards)
