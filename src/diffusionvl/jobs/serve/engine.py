"""Dynamic batching for the server: one decode thread owns the model; requests wait in a bounded queue.

Contract:
- `DecodeEngine.submit(request)` never blocks: it queues the request or raises `QueueFull` (HTTP 429; the queue
  holds at most `max_queue` waiting requests, so memory stays bounded) or `ShuttingDown` (HTTP 503).
- One worker thread takes the oldest waiting request and up to `max_batch - 1` more whose decode settings are
  compatible (`batch_key`: same decoder / block size / steps / policy / threshold / temperature / top-k / top-p;
  a sampled request (temperature > 0) with a `seed` always runs alone, so it gives the same text as a single
  `generate(..., seed=...)` call; greedy requests ignore the seed). It waits up to `batch_wait_s` for more
  compatible requests when the batch is not full. The batch decodes with the largest `max_new_tokens` of its
  requests; each request is cut at its own budget (block and AR decoding fill whole blocks, so a sample's first m
  tokens do not depend on the budget; the full-diffusion baseline's canvas does, so there the budget is part of
  the key). By invariant 5 (docs/design.md) a batch gives every request the same greedy tokens as decoding it alone.
- A request arrives tokenized (`PendingRequest.encoded`, one sample; prepare.py renders and tokenizes it off this
  thread and checks its length): the decode thread never runs a tokenizer on a prompt, so no prompt can hold it.
- Each request gets, on its own asyncio queue (posted thread-safely to its event loop): `Accepted`, then `Delta`s
  of text as blocks finish, then `Finished` or `Failed`.
  `TextAssembler` turns a request's token ids into text deltas: its own token budget, stop strings (the text is
  cut at the first one and the request finishes, even though its batch row may continue), no half characters,
  and nothing streamed that a stop string could still remove.
- The batch's encodings are joined (`concat_encoded`) and decoded with `decoding.run_encoded`, each request with
  its own answer template or none (ragged rows share a batch). Requests
  whose longest prompt + largest budget would not fit the model's context together are split: the ones that do
  not fit go back to the front of the queue for the next batch.
- A batch stops decoding as soon as every request in it has finished or was cancelled (client gone).
- Fair share: up to `max_active` batches are open at once and the thread advances them in turn, one block (event)
  each, so a request arriving while a long answer decodes starts at the next block instead of waiting for the
  whole answer. A batch opened while another is open runs with fast="off" (the plain forward; the same tokens by
  the fast-vs-plain equivalence), so the model's static sessions are never shared by two open batches.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusionvl.backbone.adapters import Encoded
from diffusionvl.backbone.tokens import Detokenizer
from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError

log = logging.getLogger("diffusionvl.jobs.serve")


class QueueFull(Exception):
    """The waiting queue is at capacity."""


class ShuttingDown(Exception):
    """The engine no longer accepts requests."""


@dataclass
class Accepted:
    prompt_tokens: int
    batch_size: int
    queue_seconds: float


@dataclass
class Delta:
    text: str


@dataclass
class Finished:
    text: str
    finish_reason: str  # "stop" (stop token or stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    stats: dict[str, Any]


@dataclass
class Failed:
    status: int
    message: str
    kind: str = "invalid_request_error"


def batch_key(cfg: DecodeConfig, uid: int) -> tuple[Any, ...]:
    """Requests with equal keys may share a batch (see module docstring). `cfg` must be resolved."""
    sampled = cfg.temperature > 0
    key: tuple[Any, ...] = (cfg.decoder, cfg.block_size, cfg.steps, cfg.policy,
                            cfg.threshold if cfg.policy == "threshold" else None, cfg.temperature,
                            cfg.top_k if sampled else 0, cfg.top_p if sampled else 1.0, cfg.use_cache, cfg.fast)
    if sampled and cfg.seed is not None:
        key += (("alone", uid),)
    if cfg.decoder == "full":
        key += (cfg.max_new_tokens,)
    return key


def concat_encoded(parts: list[Encoded]) -> Encoded:
    """One batch from encodings made apart (one or more samples each): ids in order; vision tensors joined along
    their first (image, patch or tile) axis; per-sample lists joined, None for a part's samples without them."""
    vision: dict[str, Any] = {}
    for key in dict.fromkeys(k for part in parts for k in part.vision):
        values = [part.vision.get(key) for part in parts]
        if any(isinstance(v, list) for v in values):
            vision[key] = [x for v, part in zip(values, parts) for x in (v or [None] * len(part.input_ids))]
        else:
            vision[key] = torch.cat([v for v in values if v is not None])
    return Encoded(input_ids=[ids for part in parts for ids in part.input_ids], vision=vision,
                   images_per_sample=[n for part in parts for n in part.images_per_sample])


@dataclass(eq=False)
class PendingRequest:
    encoded: Any  # adapters.Encoded of this one prompt (token ids, model-sized vision tensors)
    n_prompt: int  # its prompt tokens
    config: DecodeConfig  # resolved; max_new_tokens = this request's budget
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    key: tuple[Any, ...] = ()
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    finished: bool = False
    template: list[int] | None = None  # its answer template's ids (decoding/template.py); budget = template + 1

    def __post_init__(self) -> None:
        if not self.key:
            self.key = batch_key(self.config, id(self))

    def post(self, message: Any) -> None:
        """Deliver a message to the request's event loop (callable from any thread)."""
        if isinstance(message, (Finished, Failed)):
            self.finished = True
        try:
            self.loop.call_soon_threadsafe(self.outbox.put_nowait, message)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True


class TextAssembler:
    """One request's token ids -> text deltas, with its own budget and stop strings (module docstring)."""

    def __init__(self, tokenizer: Any, max_tokens: int, stops: list[str]):
        self.detokenizer = Detokenizer(tokenizer)
        self.max_tokens = max_tokens
        self.stops = stops
        self.ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def feed(self, new_ids: list[int], row_done: bool) -> str:
        """Add the tokens that became final; return the text that can be streamed now."""
        if self.finished:
            return ""
        self.ids.extend(new_ids)
        if len(self.ids) >= self.max_tokens:
            del self.ids[self.max_tokens:]
            self.finish_reason = "length"
        elif row_done:
            self.finish_reason = "stop"  # the decoder saw a stop token
        text = self.detokenizer.text(self.ids)
        at = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if at >= 0:
            text, self.finish_reason = text[:at], "stop"
        if self.finished:
            self.text = text
        return self.detokenizer.delta(text, self.finished, hold=self._held(text.rstrip("\ufffd")))

    def _held(self, text: str) -> int:
        """Length of the longest suffix of `text` that starts a stop string (it may still become one)."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best


@dataclass
class _Run:
    """One open batch: its admitted (request, prompt tokens), their text assemblers and the decoder's events."""

    admitted: list[tuple[PendingRequest, int]]
    texts: list[TextAssembler]
    events: Any
    started: float

    @property
    def requests(self) -> list[PendingRequest]:
        return [r for r, _ in self.admitted]


class DecodeEngine:
    """Bounded queue + one decode thread (module docstring)."""

    def __init__(self, model: Any, *, max_batch: int = 8, max_queue: int = 64, batch_wait_s: float = 0.005,
                 max_active: int = 2):
        self.model = model.eval()  # the server never trains; decoding.run_encoded does not switch modes itself
        self.max_active = max_active
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batch_wait_s = batch_wait_s
        self._pending: deque[PendingRequest] = deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._active: deque[_Run] = deque()  # the open batches (decode thread only)
        self._closing = False
        self.running = 0  # requests in the open batches
        self.completed = 0

    # ---- event-loop side ------------------------------------------------------------------------------------------
    def submit(self, request: PendingRequest) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"server busy: {len(self._pending)} requests are waiting; retry later")
            self._start_locked()
            self._pending.append(request)
            self._cond.notify_all()

    def cancel(self, request: PendingRequest) -> None:
        """The client went away: drop the request if it still waits; a running batch skips it."""
        request.cancelled = True
        with self._cond:
            if request in self._pending:
                self._pending.remove(request)

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return not self._closing and (self._thread is None or self._thread.is_alive())

    def start(self) -> None:
        with self._cond:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="diffusionvl-decode", daemon=True)
            self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail the waiting ones (503) and stop after the current block."""
        with self._cond:
            self._closing = True
            waiting = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for request in waiting:
            request.post(Failed(503, "the server is shutting down", "service_unavailable"))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # ---- decode thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        """The decode thread: `_serve`, and if that ever fails outside a batch, no request is left hanging: the
        engine closes (new requests get 503), and every waiting or running request is answered 500."""
        try:
            self._serve()
        except Exception:  # noqa: BLE001 - the thread must not die silently with clients waiting
            log.exception("decode thread failed")
            with self._cond:
                self._closing = True
                left = list(self._pending) + [r for run in self._active for r in run.requests]
                self._pending.clear()
                self._active.clear()
                self.running = 0
            for request in left:
                if not request.finished:
                    request.post(Failed(500, "internal error: the decoder stopped", "server_error"))

    def _serve(self) -> None:
        """Round robin over at most `max_active` open batches, one block (event) each in turn: a long answer never
        holds the decoder while a new batch waits. A batch opened while another is open decodes on the plain
        forward (fast="off": same tokens), so at most one open batch uses the model's static sessions."""
        active: deque[_Run] = self._active
        while True:
            if len(active) < self.max_active:
                batch = self._next_batch(wait=not active)
                if batch is None and not active:
                    return
                if batch:
                    run = self._guarded(batch, lambda: self._open(batch, plain=bool(active)))
                    if run is not None:
                        active.append(run)
            self.running = sum(len(r.requests) for r in active)
            if active:
                run = active.popleft()
                if self._guarded(run.requests, lambda: self._step(run)):
                    active.append(run)
            self.running = sum(len(r.requests) for r in active)

    def _guarded(self, batch: list[PendingRequest], work: Any) -> Any:
        """`work()`, or None after an unexpected error: logged, and its unfinished requests answered 500."""
        try:
            return work()
        except Exception:  # noqa: BLE001 - never let one batch kill the server
            log.exception("decode batch failed")
            with self._cond:
                requeued = set(map(id, self._pending))
            for request in batch:
                if not request.finished and id(request) not in requeued:
                    request.post(Failed(500, "internal error while decoding", "server_error"))
            return None

    def _next_batch(self, wait: bool = True) -> list[PendingRequest] | None:
        """The next batch to open; None when closing; [] when `wait` is False and nothing is ready yet."""
        with self._cond:
            deadline = None
            while True:
                for request in [r for r in self._pending if r.cancelled]:
                    self._pending.remove(request)
                if self._closing:
                    return None
                if not self._pending and not wait:
                    return []
                if not self._pending:
                    deadline = None
                    self._cond.wait()
                    continue
                head = self._pending[0]
                batch = [r for r in self._pending if r.key == head.key][: self.max_batch]
                deadline = deadline if deadline is not None else time.monotonic() + self.batch_wait_s
                remaining = deadline - time.monotonic()
                if len(batch) >= self.max_batch or remaining <= 0 or not wait:
                    for request in batch:
                        self._pending.remove(request)
                    return batch
                self._cond.wait(remaining)

    def _fit(self, batch: list[PendingRequest]) -> tuple[list[PendingRequest], list[PendingRequest]]:
        """Keep the requests whose longest prompt + largest budget fit the context together; the rest wait."""
        limit = self.model.max_positions
        chosen: list[PendingRequest] = []
        rest = []
        for request in batch:
            longest = max(r.n_prompt for r in chosen + [request])
            budget = max(r.config.max_new_tokens for r in chosen + [request])
            if not chosen or not limit or longest + budget <= limit:
                chosen.append(request)
            else:
                rest.append(request)
        return chosen, rest

    def _events(self, encoded: Any, cfg: DecodeConfig, templates: list[list[int] | None] | None = None) -> Any:
        """The decoder's per-block events for an encoded batch and its rows' answer templates (a seam for tests)."""
        from diffusionvl.decoding import run_encoded

        return run_encoded(self.model, encoded, cfg, templates)

    def _open(self, batch: list[PendingRequest], plain: bool) -> _Run | None:
        """Fit a batch to the context, join its encodings and start its decoder (requests that do not fit wait for the
        next batch)."""
        started = time.monotonic()
        requests, rest = self._fit([r for r in batch if not r.cancelled])
        if rest:  # served by the next batch, ahead of everything else
            with self._cond:
                self._pending.extendleft(reversed(rest))
        if not requests:
            return None
        encoded = concat_encoded([r.encoded for r in requests])
        cfg = dataclasses.replace(requests[0].config, max_new_tokens=max(r.config.max_new_tokens for r in requests),
                                  **({"fast": "off"} if plain else {}))
        for request in requests:
            request.post(Accepted(request.n_prompt, len(requests), started - request.enqueued))
        texts = [TextAssembler(self.model.tokenizer, r.config.max_new_tokens, r.stops) for r in requests]
        templates = [r.template for r in requests]
        events = self._events(encoded, cfg, *([templates] if any(t is not None for t in templates) else []))
        return _Run([(r, r.n_prompt) for r in requests], texts, events, started)

    def _step(self, run: _Run) -> bool:
        """Advance one open batch by one event; False once it is done (then every request has its answer)."""
        done = True
        try:
            event = next(run.events, None)
            if event is not None and not event.final:
                for i, (request, n_prompt) in enumerate(run.admitted):
                    self._advance(request, run.texts[i], event, i, n_prompt, run.started, len(run.requests))
                done = self._closing or all(t.finished or r.cancelled for r, t in zip(run.requests, run.texts))
        except DiffusionVLError as exc:
            for request in run.requests:
                if not request.finished:
                    request.post(Failed(400, str(exc)))
        finally:
            if done:
                run.events.close()
        if done:
            self._close(run)
        return not done

    def _close(self, run: _Run) -> None:
        for request in run.requests:
            if not request.finished and not request.cancelled:
                request.post(Failed(503, "the server is shutting down", "service_unavailable") if self._closing
                             else Failed(500, "the decoder stopped before the answer finished", "server_error"))
        self.completed += len(run.requests)

    def _advance(self, request: PendingRequest, text: TextAssembler, event: Any, i: int, n_prompt: int,
                 started: float, batch_size: int) -> None:
        if text.finished or request.cancelled:
            return
        delta = text.feed(event.new_token_ids[i], event.done[i])
        if delta:
            request.post(Delta(delta))
        if text.finished:
            seconds = time.monotonic() - started
            n = len(text.ids)
            cfg = request.config
            stats = {"decoder": cfg.decoder, "block_size": cfg.block_size, "steps": cfg.steps, "policy": cfg.policy,
                     "batch_size": batch_size, "forwards": event.forwards,
                     "tokens_per_forward": n / max(event.forwards, 1), "decode_seconds": seconds,
                     "tokens_per_second": n / seconds if seconds > 0 else 0.0,
                     "queue_seconds": started - request.enqueued}
            request.post(Finished(text.text, text.finish_reason or "length", n_prompt, n, stats))
