"""What happens to a request before the decode thread sees it: images decoded under a global pixel budget, and
the prompt rendered and tokenized on a small pool of threads. The decode thread only sees token ids.

Contract:
- `PixelBudget(capacity, max_waiting).hold(pixels)` is a context manager (a `core.media.Hold`): at most `capacity`
  full-size pixels are decoded at once over all requests. A request's image waits (in its worker thread) until its
  header's pixel count fits, the smallest waiting image first; with `max_waiting` images already waiting it is
  refused with `QueueFull` (HTTP 429). The loader reduces every image to the size the model uses as soon as it is
  decoded (`core.media`, `fit`), inside the hold: full-size pixels never wait in a queue.
- `Preparer(adapter, threads, max_waiting, max_tokens).encode(conversation, cost)` (async) renders and tokenizes
  one conversation (`adapter.encode`) on one of `threads` threads, each with its own copy of the processor (a
  tokenizer is not shared across threads); the cheapest waiting request (`cost`: its characters) goes first, so
  "hi" does not wait behind a queue of megabyte prompts; with `max_waiting` requests waiting it raises `QueueFull`
  (HTTP 429), after `close()` `ShuttingDown` (HTTP 503). Threads start on first use. Work per request is bounded by
  `max_tokens`, not by the text's length: the text is first counted chunk by chunk (`tokens_over`), and text that
  already passes `max_tokens` is refused (`DiffusionVLError`, HTTP 400) before the whole prompt is tokenized.
  `encode(..., then=fn)` also runs `fn(adapter, encoded)` on the same thread (an answer template's tokens) and
  returns `(encoded, its result)`.
- `image_fit(processor)`: the (pixels, short side) of one image the model's processor keeps at most (it downsizes
  anything larger), the `fit` images are reduced to as soon as they are decoded; None where it is not fixed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import itertools
import math
import threading
from typing import Any, Iterator

from diffusionvl.core.errors import check
from diffusionvl.jobs.serve.engine import QueueFull, ShuttingDown

CHUNK_CHARS = 16384  # text is counted in pieces of about this many characters, cut at a space


class PixelBudget:
    """At most `capacity` full-size pixels decoded at once (module docstring)."""

    def __init__(self, capacity: int, max_waiting: int):
        self.capacity, self.max_waiting = capacity, max_waiting
        self.used = 0
        self._waiting: dict[int, int] = {}  # ticket -> pixels
        self._tickets = itertools.count()
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(pixels, self.capacity)  # the config guarantees one allowed image fits; never wait forever
        with self._cond:
            if len(self._waiting) >= self.max_waiting:
                raise QueueFull(f"server busy: {len(self._waiting)} images are waiting to be decoded; retry later")
            ticket = next(self._tickets)
            self._waiting[ticket] = pixels
            try:
                self._cond.wait_for(lambda: self._turn(ticket))
            finally:
                del self._waiting[ticket]
            self.used += pixels
        try:
            yield
        finally:
            with self._cond:
                self.used -= pixels
                self._cond.notify_all()

    def _turn(self, ticket: int) -> bool:
        """The smallest waiting image that fits is the one to go (ties: the earliest)."""
        free = self.capacity - self.used
        fitting = [(p, t) for t, p in self._waiting.items() if p <= free]
        return bool(fitting) and min(fitting)[1] == ticket


class Preparer:
    """Render + tokenize on a few threads, cheapest request first (module docstring)."""

    def __init__(self, adapter: Any, threads: int, max_waiting: int, max_tokens: int):
        self.adapter, self.threads, self.max_waiting, self.max_tokens = adapter, threads, max_waiting, max_tokens
        self._heap: list[tuple[int, int, Any, asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._closing = False

    async def encode(self, conversation: Any, cost: int, then: Any = None) -> Any:
        """`adapter.encode([conversation])`, computed off the event loop and off the decode thread; with `then`,
        `(encoded, then(adapter, encoded))`, both on the worker's own tokenizer (an answer template's tokens)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._heap) >= self.max_waiting:
                raise QueueFull(f"server busy: {len(self._heap)} requests are waiting to be tokenized; retry later")
            self._start_locked()
            heapq.heappush(self._heap, (cost, next(self._order), (conversation, then), future, loop))
            self._cond.notify()
        return await future

    def close(self) -> None:
        """Refuse new work; requests still waiting get `ShuttingDown`."""
        with self._cond:
            self._closing = True
            waiting, self._heap = self._heap, []
            self._cond.notify_all()
        for _, _, _, future, loop in waiting:
            _settle(loop, future, None, ShuttingDown("the server is shutting down"))

    def _start_locked(self) -> None:
        while len(self._workers) < self.threads:
            own = copy.copy(self.adapter)
            own.processor = copy.deepcopy(self.adapter.processor)
            worker = threading.Thread(target=self._work, args=(own,), name="diffusionvl-tokenize", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _work(self, adapter: Any) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._heap or self._closing)
                if self._closing:
                    return
                _, _, (conversation, then), future, loop = heapq.heappop(self._heap)
            if future.done():  # the client went away while it waited
                continue
            try:
                texts = [p["text"] for m in conversation.messages for p in m["content"] if p["type"] == "text"]
                over = tokens_over(adapter.tokenizer, texts, self.max_tokens)
                check(over is None, f"the prompt is more than {self.max_tokens} tokens (its text alone is at least "
                                    f"{over}); this server allows at most {self.max_tokens} per request")
                result, error = adapter.encode([conversation]), None
                if then is not None:
                    result = (result, then(adapter, result))
            except Exception as exc:  # noqa: BLE001 - answered by the request's own handler (400 or 500)
                result, error = None, exc
            _settle(loop, future, result, error)


def tokens_over(tokenizer: Any, texts: list[str], limit: int) -> int | None:
    """A lower bound of the tokens in `texts`, counted chunk by chunk (cut at a space, one token of slack per cut),
    returned as soon as it passes `limit`; None if it never does. The work is about `limit` tokens' worth of text,
    whatever the length of the text."""
    total = 0
    for text in texts:
        start = 0
        while start < len(text):
            end = len(text) if len(text) - start <= CHUNK_CHARS else start + CHUNK_CHARS
            if end < len(text):
                space = text.rfind(" ", start + CHUNK_CHARS // 2, end)
                end = space if space > start else end
            total += max(len(tokenizer(text[start:end], add_special_tokens=False)["input_ids"]) - 1, 0)
            if total > limit:
                return total
            start = end
    return None


def _settle(loop: asyncio.AbstractEventLoop, future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    def apply() -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    try:
        loop.call_soon_threadsafe(apply)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


def image_fit(processor: Any) -> tuple[int, int] | None:
    """Qwen-VL keeps `longest_edge` pixels (max_pixels) at the image's aspect ratio; a composed VLM with one tile per
    image resizes the short side to its input size (over its crop fraction); None for anything else."""
    images = getattr(processor, "image_processor", None)
    size = getattr(images, "size", None)  # a dict, or transformers' SizeDict
    longest = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if isinstance(longest, int) and hasattr(images, "merge_size"):
        return longest, 0
    transform, layout = getattr(processor, "transform", None), getattr(processor, "layout", None)
    if transform is not None and getattr(layout, "is_default", False):
        return 0, math.ceil(transform.size / (transform.crop_pct or 1.0))
    return None
