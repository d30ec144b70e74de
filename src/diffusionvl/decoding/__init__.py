"""Generation front end: prompts -> batch layout -> a decoder from the registry -> texts, token ids, stats, streams.

Contract: `run(model, conversations, cfg)` is a generator of `StreamEvent`s, one per finished block (or AR chunk),
carrying each sample's newly final token ids and text; its last event has `final=True` and the complete
`GenerationOutput`. `generate` drains it; `stream` forwards it. Every sample stops at its own first stop token or
after `max_new_tokens`; the returned ids exclude the stop token. Decoders come from `DECODERS` by name, one loop
each, run over the slot forward that `backend.choose` picks in one place from `DecodeConfig.fast` (plain: dynamic
shapes; static: static shapes, CUDA graphs); the stats say which ran (`backend`, `backend_reason`). The model is
read only through `protocol.DecoderModel`. `run_encoded` takes already tokenized prompts (benchmarks, servers that
tokenize themselves). An answer template per sample (template.py) fixes tokens of the answer and leaves masked slots
for the decoder; the answer is the template with its slots filled.
Speed stats are per sample: `tokens_per_sample` counts each sample's generated tokens up to and including its stop
token, `forwards_per_sample` the forwards that had work for it (prefill included; state.py `charge`), and
`tokens_per_forward` is the mean over samples of their ratio. `tokens` and `forwards` stay batch totals.
Block or full decoding of a model that has not been BD3-finetuned (`DiffusionConfig.bd3_trained` False: a fresh
conversion) logs `UNTRAINED_HINT` once per process (`hint_untrained`, also called by the server at start-up).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterator

import torch

from diffusionvl.backbone.tokens import Detokenizer
from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.decoding import backend
from diffusionvl.decoding.ar import ar_decode
from diffusionvl.decoding.block import block_decode, full_decode
from diffusionvl.decoding.layout import Layout, build_layout
from diffusionvl.decoding.protocol import DecoderModel
from diffusionvl.decoding.state import DecodeState
from diffusionvl.decoding.static import open_static
from diffusionvl.decoding.template import budget, check_fit, encode_templates, place, slot_runs

Tensor = torch.Tensor
log = logging.getLogger("diffusionvl")

UNTRAINED_HINT = ("block decoding needs BD3 finetuning first; use --decoder ar to check the conversion, or "
                  "diffusionvl train")
_hinted: list[bool] = []  # non-empty once the hint was given in this process

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
    slots: list[list[str] | None] | None = None  # per sample with a template: the text each slot run was filled with

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
    """Per-sample incremental detokenization (backbone.tokens.Detokenizer): only text that can no longer change."""

    def __init__(self, tokenizer: Any, n: int):
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.texts = [Detokenizer(tokenizer) for _ in range(n)]

    def update(self, i: int, ids: list[int], final: bool) -> tuple[list[int], str]:
        new_ids = ids[len(self.ids[i]):]
        self.ids[i] = ids
        text = self.texts[i]
        return new_ids, text.delta(text.text(ids), final)


def _layout(model: DecoderModel, encoded: Any, cfg: DecodeConfig) -> Layout:
    positions = [model.adapter.prompt_positions(ids, encoded.vision, i) for i, ids in enumerate(encoded.input_ids)]
    bsz = cfg.block_size
    if cfg.decoder == "full":
        canvas = -(-cfg.max_new_tokens // bsz) * bsz
        prefill = max(len(x) for x in encoded.input_ids)
        return build_layout(encoded.input_ids, positions, bsz, cfg.max_new_tokens, model.mask_token_id,
                            model.pad_token_id, prefill_to=prefill, canvas=canvas)
    return build_layout(encoded.input_ids, positions, 1 if cfg.decoder == "ar" else bsz, cfg.max_new_tokens,
                        model.mask_token_id, model.pad_token_id)


class _Rows:
    """Host copy of each sample's final tokens, extended incrementally (one small transfer per event); each sample
    is cut at its own budget (`budgets`: max_new_tokens, or a template's length and its closing token)."""

    def __init__(self, layout: Layout, stop: set[int], budgets: list[int]):
        self.gen_start = layout.gen_start.tolist()
        self.stop, self.budgets = stop, budgets
        self.rows: list[list[int]] = [[] for _ in self.gen_start]
        self.end = 0

    def update(self, state: DecodeState) -> tuple[list[list[int]], list[bool]]:
        """Each sample's generated ids up to its first stop token (excluded), and whether it hit one."""
        if state.final_end > self.end:
            new = state.tokens[:, self.end:state.final_end].tolist()
            for row, extra in zip(self.rows, new):
                row.extend(extra)
            self.end = state.final_end
        out, stopped = [], []
        for g0, row, budget in zip(self.gen_start, self.rows, self.budgets):
            ids, hit = _cut(row[g0:g0 + budget], self.stop)
            out.append(ids)
            stopped.append(hit)
        return out, stopped


def _stats(cfg: DecodeConfig, state: DecodeState, ids: list[list[int]], stopped: list[bool], seconds: float,
           first_block_s: float | None, choice: backend.Choice) -> dict[str, Any]:
    """The call's stats (module docstring): batch totals, and per-sample tokens, forwards and their mean ratio."""
    lengths = [len(x) + int(h) for x, h in zip(ids, stopped)]  # the stop token was generated too
    n_tokens = sum(lengths)
    forwards = state.forwards + state.prefill_forwards
    per_sample = [f + state.prefill_forwards for f in state.row_forwards.tolist()]
    return {
        "decoder": cfg.decoder, "block_size": cfg.block_size, "steps": cfg.steps, "policy": cfg.policy,
        "stop_early": cfg.stop_early and cfg.decoder == "block", "batch": len(ids), "tokens": n_tokens,
        "forwards": forwards, "prefill_forwards": state.prefill_forwards, "tokens_per_sample": lengths,
        "forwards_per_sample": per_sample,
        # per sample: tokens of its answer per forward it took (prefill included), averaged over the samples
        "tokens_per_forward": sum(n / max(f, 1) for n, f in zip(lengths, per_sample)) / len(ids), "seconds": seconds,
        "tokens_per_second": n_tokens / seconds if seconds > 0 else 0.0, "first_block_seconds": first_block_s,
        "backend": state.backend, "backend_reason": "; ".join([choice.reason, *state.notes]),
    }


def _slot_texts(model: DecoderModel, templates: list[list[int] | None], ids: list[list[int]]) -> list[list[str] | None]:
    return [None if t is None else [model.tokenizer.decode(x[a:b], skip_special_tokens=True)
                                    for a, b in slot_runs(t, model.mask_token_id)] for t, x in zip(templates, ids)]


def select_decoder(cfg: DecodeConfig, device: torch.device) -> tuple[Callable[..., Iterator[DecodeState]],
                                                                     backend.Choice]:
    """The decoder function for `cfg` on `device`, over the slot forward `backend.choose` picks: plain (dynamic
    shapes) or static (static shapes; eager, CUDA graph or compiled steps)."""
    if cfg.decoder not in DECODERS:
        raise DiffusionVLError(f"unknown decoder {cfg.decoder!r}; choose one of {', '.join(DECODERS)}")
    choice = backend.choose(cfg, device)
    if choice.path == "fast":
        return partial(DECODERS[cfg.decoder], open_forward=partial(open_static, mode=choice.mode)), choice
    return DECODERS[cfg.decoder], choice


def _inference_steps(states: Iterator[DecodeState]) -> Iterator[DecodeState]:
    """Advance a decoder under inference mode one state at a time, never holding the mode across a `yield`: a
    context held across yields would be exited out of order when callers interleave streams, leaving autograd
    globally disabled."""
    while True:
        with torch.inference_mode():
            try:
                state = next(states)
            except StopIteration:
                return
        yield state


def hint_untrained(model: DecoderModel, decoder: str) -> None:
    """Log UNTRAINED_HINT (once per process) when `decoder` is block or full diffusion and the model is a fresh
    conversion: its block predictions are still the AR head's, which gives empty or garbled answers."""
    if _hinted or decoder == "ar" or model.config.bd3_trained or getattr(model, "autoregressive_only", False):
        return
    _hinted.append(True)
    log.warning(UNTRAINED_HINT)


def run(model: DecoderModel, conversations: list[Any], cfg: DecodeConfig,
        templates: list[str | None] | None = None) -> Iterator[StreamEvent]:
    """`templates`: an answer template (template.py) per conversation, None for a free answer."""
    cfg = cfg.resolved(model.config.block_size)
    encoded = model.adapter.encode(conversations)
    ids = None
    if templates is not None:
        texts = [model.adapter.render(c) for c in conversations]
        ids = encode_templates(model, templates, texts, [len(x) for x in encoded.input_ids])
    yield from run_encoded(model, encoded, cfg, ids)


def run_encoded(model: DecoderModel, encoded: Any, cfg: DecodeConfig,
                templates: list[list[int] | None] | None = None) -> Iterator[StreamEvent]:
    """`run` on an `adapters.Encoded` batch (token ids per sample, vision tensors) and tokenized templates
    (template.py: ids, the mask id at slots; None for a free answer). A model marked `autoregressive_only` (an AR
    parent, e.g. `load_default(parent=True)`) is always decoded with the AR decoder. A templated sample's budget is
    its template and closing token; `max_new_tokens` is the others'."""
    if getattr(model, "autoregressive_only", False) and cfg.decoder != "ar":
        cfg = replace(cfg, decoder="ar", block_size=None, steps=None)
    cfg = cfg.resolved(model.config.block_size)
    templates = templates if templates is not None and any(t is not None for t in templates) else None
    budgets = [cfg.max_new_tokens] * len(encoded.input_ids)
    if templates is not None:
        check_fit(model, encoded.input_ids, templates)
        budgets = [cfg.max_new_tokens if t is None else budget(t) for t in templates]
        cfg = replace(cfg, max_new_tokens=max(budgets))
    hint_untrained(model, cfg.decoder)
    decoder, choice = select_decoder(cfg, model.device)
    model.check_prompt_lengths(encoded.input_ids, cfg.max_new_tokens, cfg.canvas_block)
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(cfg.seed)
    stop = set(model.stop_token_ids)
    stop_ids = torch.tensor(sorted(stop), dtype=torch.long, device=model.device)
    tracker = _TextTracker(model.tokenizer, len(encoded.input_ids))
    t0 = time.perf_counter()
    first_block_s: float | None = None
    state: DecodeState | None = None
    with torch.inference_mode():
        layout = _layout(model, encoded, cfg)
        if templates is not None:
            place(layout, templates, model.eos_token_id)
    rows = _Rows(layout, stop, budgets)
    for state in _inference_steps(decoder(model, layout, encoded.vision, cfg, stop_ids, generator)):
        ids, _ = rows.update(state)
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
    ids, stopped = rows.update(state)
    texts = [model.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    stats = _stats(cfg, state, ids, stopped, seconds, first_block_s, choice)
    output = GenerationOutput(texts, ids, ["stop" if h else "length" for h in stopped], stats,
                              _slot_texts(model, templates, ids) if templates is not None else None)
    yield StreamEvent([[] for _ in ids], ["" for _ in ids], [True] * len(ids), final=True, output=output,
                      forwards=stats["forwards"])
