"""Load test of `diffusionvl serve` with locust (docs/serving.md, "Load test").

Each user sends chat completions back to back (no wait): streamed and not (`--stream-share`, spread evenly), with an
image (`--image-share`, only when the served model takes images: a PNG data URL of `--image-size` pixels a side, a
different colour each time) and without. `--run-time` bounds the run, and so does `--max-requests` if given. Latency
is measured to the last byte, streamed requests included (locust's own clock stops at the headers of a stream); time
to first token ("TTFT") is the first event that carries text. Locust reports requests/s, failures and percentiles
per request name; at the end this file prints one summary: requests/s, completion tokens/s (from `usage`), latency
p50/p95 and TTFT p50/p95.

    diffusionvl serve --model runs/tiny-vl --port 8000 &
    locust -f scripts/locustfile.py --host http://127.0.0.1:8000 --headless -u 8 -r 8 -t 30s --only-summary \\
        --max-tokens 32 --stream-share 0.5 --image-share 0.5
"""

from __future__ import annotations

import base64
import io
import json
import random
import time

from locust import HttpUser, events, task
from locust.env import Environment

PROMPTS = ["Hello, how are you?", "What is the capital of France?", "Describe a cat in one sentence.",
           "Count from one to ten.", "Name three colours.", "What does a block diffusion model do?"]
RUN = {"completion": 0, "started": 0.0, "requests": 0, "sent": 0}  # this run's counters (gevent: one thread)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--max-tokens", type=int, default=32, help="max_tokens of every request")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests (0..1)")
    parser.add_argument("--image-share", type=float, default=0.5,
                        help="share of requests with an image (0..1; ignored for a text-only model)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the generated PNGs, pixels")
    parser.add_argument("--max-requests", type=int, default=0,
                        help="stop after this many chat requests in all (0: only --run-time stops the run)")


@events.test_start.add_listener
def _start(environment: Environment, **kw) -> None:
    RUN.update(completion=0, started=time.monotonic(), requests=0, sent=0)


def _png(size: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), tuple(random.randrange(256) for _ in range(3))).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _share(k: int, share: float) -> bool:
    """Whether the k-th of a sequence is in a `share` of it: spread evenly, the same sequence every run."""
    return int((k + 1) * share) > int(k * share)


class ChatUser(HttpUser):
    """One client sending `/v1/chat/completions` requests one after another."""

    def on_start(self) -> None:
        card = self.client.get("/v1/models", name="models").json()["data"][0]
        self.model, self.vision = card["id"], bool(card.get("diffusionvl", {}).get("vision"))

    def _body(self, stream: bool, image: bool) -> dict:
        text = {"type": "text", "text": random.choice(PROMPTS)}
        content = [{"type": "image_url", "image_url": {"url": _png(self.environment.parsed_options.image_size)}},
                   text] if image else text["text"]
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.environment.parsed_options.max_tokens}
        return {**body, "stream": True, "stream_options": {"include_usage": True}} if stream else body

    @task
    def chat(self) -> None:
        opts = self.environment.parsed_options
        k = RUN["sent"]  # counted over all users, so that short runs mix the kinds too
        stream = _share(k, opts.stream_share)  # alternating at 0.5: plain, stream, plain, stream, ...
        image = self.vision and _share(k // 2, opts.image_share)  # ... each pair with and without images
        RUN["sent"] += 1
        name = f"chat{' stream' if stream else ''}{' image' if image else ''}"
        t0 = time.perf_counter()
        with self.client.post("/v1/chat/completions", json=self._body(stream, image), name=name, stream=stream,
                              catch_response=True) as response:
            try:
                usage, first = self._read(response, stream, t0)
                response.request_meta["response_time"] = (time.perf_counter() - t0) * 1000  # to the last byte
                RUN["completion"] += usage["completion_tokens"]
                if first is not None:
                    self.environment.events.request.fire(request_type="TTFT", name=name, response_time=first * 1000,
                                                         response_length=0, exception=None, context={})
            except Exception as exc:  # a broken body or stream is a failure of this request, reported by locust
                response.failure(f"{type(exc).__name__}: {exc}"[:300])
        RUN["requests"] += 1
        if opts.max_requests and RUN["requests"] >= opts.max_requests:
            self.environment.runner.quit()

    @staticmethod
    def _read(response, stream: bool, t0: float) -> tuple[dict, float | None]:
        """(usage, seconds to the first text) of a 200 answer; raises on anything else."""
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        if not stream:
            return response.json()["usage"], None
        usage, first, done = None, None, False
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            payload = line[len(b"data: "):]
            if payload == b"[DONE]":
                done = True
                break
            chunk = json.loads(payload)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            usage = chunk.get("usage") or usage
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter() - t0
        if not done or usage is None:
            raise RuntimeError("the stream ended without usage and [DONE]")
        return usage, first


@events.quitting.add_listener
def _summary(environment: Environment, **kw) -> None:
    """One line for docs/serving.md's table: all chat requests together, TTFT over streamed ones."""
    stats = environment.stats
    seconds = max(time.monotonic() - RUN["started"], 1e-9)
    chats = [e for (name, method), e in stats.entries.items() if method == "POST" and name.startswith("chat")]
    ttft = [e for (name, method), e in stats.entries.items() if method == "TTFT"]
    done = sum(e.num_requests - e.num_failures for e in chats)
    failures = sum(e.num_failures for e in chats)

    def pct(entries, q):
        merged = {}
        for e in entries:
            for ms, n in e.response_times.items():
                merged[ms] = merged.get(ms, 0) + n
        total, seen = sum(merged.values()), 0
        for ms in sorted(merged):
            seen += merged[ms]
            if seen >= q * total:
                return f"{ms:.0f}"
        return "-"

    print(f"summary: {done / seconds:.1f} requests/s, {RUN['completion'] / seconds:.0f} completion tokens/s, "
          f"latency p50/p95 {pct(chats, 0.5)}/{pct(chats, 0.95)} ms, TTFT p50/p95 {pct(ttft, 0.5)}/"
          f"{pct(ttft, 0.95)} ms, {failures} failures, {seconds:.0f} s")
