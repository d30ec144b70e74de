#!/usr/bin/env python
"""Load test of a `diffusionvl serve` endpoint: N concurrent streaming clients for T seconds.

Contract: each of `--clients` asyncio clients sends streaming chat completions back to back (`stream: true`,
usage included) until `--duration` seconds have passed or `--max-requests` requests were sent in all (bounded in
count and time: no request starts after the duration, and each one in flight then is bounded by
`--request-timeout`; requests/s and tokens/s divide by the whole run's wall time). It reports requests/s, completion tokens/s, latency and time-to-first-token p50/p95 and the
error count as a table and optionally as JSON (`--json FILE`, written atomically); the exit status is 1 when any
request failed. Only loopback hosts are allowed unless `--allow-non-loopback` is given. `--launch MODEL_DIR`
starts `diffusionvl serve` on a free loopback port for the run and stops it afterwards (extra server flags after
`--`).

    python scripts/loadtest.py --launch runs/tiny --clients 8 --duration 20 -- --max-batch 8
    python scripts/loadtest.py --url http://127.0.0.1:8000 --clients 16 --duration 60 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

MAX_CLIENTS = 256
MAX_DURATION_S = 600.0
PROMPTS = ["Hello, how are you?", "What is the capital of France?", "Describe a cat in one sentence.",
           "Count from one to ten.", "Name three colours.", "What does a block diffusion model do?"]


@dataclass
class Results:
    latencies: list[float] = field(default_factory=list)
    first_token: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    def fail(self, message: str) -> None:
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(message[:300])


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of a non-empty list; nan when empty."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def one_request(client: Any, url: str, body: dict[str, Any], results: Results) -> None:
    t0 = time.perf_counter()
    first = None
    usage = None
    done = False
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode("utf-8", "replace")
                return results.fail(f"HTTP {response.status_code}: {text}")
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[len("data: "):]
                if payload == "[DONE]":
                    done = True
                    break
                chunk = json.loads(payload)
                if "error" in chunk:
                    return results.fail(f"stream error: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    first = time.perf_counter() - t0
    except Exception as exc:  # noqa: BLE001 - every failure is counted and reported
        return results.fail(f"{type(exc).__name__}: {exc}")
    if not done or usage is None:
        return results.fail("stream ended without usage and [DONE]")
    results.latencies.append(time.perf_counter() - t0)
    results.first_token.append(first if first is not None else results.latencies[-1])
    results.tokens += int(usage["completion_tokens"])


async def client_loop(idx: int, client: Any, url: str, args: argparse.Namespace, model: str, end: float,
                      results: Results, budget: list[int]) -> None:
    k = 0
    while time.perf_counter() < end and budget[0] > 0:
        budget[0] -= 1
        prompt = PROMPTS[(idx + k) % len(PROMPTS)]
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
                "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
        results.requests += 1
        await one_request(client, url, body, results)
        k += 1


async def run_load(args: argparse.Namespace, base: str) -> dict[str, Any]:
    import httpx

    timeout = httpx.Timeout(args.request_timeout)
    limits = httpx.Limits(max_connections=args.clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        model = args.model or (await client.get(f"{base}/v1/models")).json()["data"][0]["id"]
        results = Results()
        budget = [args.max_requests]
        t0 = time.perf_counter()
        end = t0 + args.duration
        await asyncio.gather(*[client_loop(i, client, f"{base}/v1/chat/completions", args, model, end, results,
                                           budget) for i in range(args.clients)])
        wall = time.perf_counter() - t0
        health = (await client.get(f"{base}/health")).json()
    return summary(results, wall, args, model, health)


def summary(results: Results, wall: float, args: argparse.Namespace, model: str,
            health: dict[str, Any]) -> dict[str, Any]:
    ok = len(results.latencies)
    return {
        "model": model, "clients": args.clients, "duration_s": round(wall, 3), "max_tokens": args.max_tokens,
        "requests": results.requests, "completed": ok, "errors": results.errors,
        "requests_per_s": ok / wall, "tokens_per_s": results.tokens / wall, "completion_tokens": results.tokens,
        "latency_p50_s": percentile(results.latencies, 50), "latency_p95_s": percentile(results.latencies, 95),
        "first_token_p50_s": percentile(results.first_token, 50),
        "first_token_p95_s": percentile(results.first_token, 95),
        "error_samples": results.error_samples, "server_device": health.get("device"),
    }


def print_table(report: dict[str, Any]) -> None:
    rows = [("clients", report["clients"]), ("duration", f"{report['duration_s']:.1f} s"),
            ("requests (ok / errors)", f"{report['completed']} / {report['errors']}"),
            ("requests/s", f"{report['requests_per_s']:.2f}"), ("tokens/s", f"{report['tokens_per_s']:.1f}"),
            ("latency p50 / p95", f"{report['latency_p50_s'] * 1e3:.0f} / {report['latency_p95_s'] * 1e3:.0f} ms"),
            ("first token p50 / p95",
             f"{report['first_token_p50_s'] * 1e3:.0f} / {report['first_token_p95_s'] * 1e3:.0f} ms")]
    print(f"| load test ({report['model']}, max_tokens {report['max_tokens']}) | |\n|---|---|")
    for key, value in rows:
        print(f"| {key} | {value} |")
    for sample in report["error_samples"]:
        print(f"error: {sample}", file=sys.stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir: str, extra: list[str], timeout: float) -> tuple[subprocess.Popen, str]:
    """Start `diffusionvl serve` on a free loopback port and wait until /health answers."""
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "diffusionvl", "serve", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    stop(proc)
    raise SystemExit(f"error: the server did not answer /health within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_json(path: str, data: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".loadtest-", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    p.add_argument("--launch", metavar="MODEL_DIR", help="start `diffusionvl serve --model MODEL_DIR` for the run")
    p.add_argument("--model", help="model id to request (default: the first of /v1/models)")
    p.add_argument("--clients", type=int, default=8, help=f"concurrent clients, 1..{MAX_CLIENTS} (default: 8)")
    p.add_argument("--duration", type=float, default=10.0, help=f"seconds, at most {MAX_DURATION_S:.0f} (default: 10)")
    p.add_argument("--max-requests", type=int, default=10000, help="most requests in all (default: 10000)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (default: 32)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request (default: 120)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for --launch (default: 300)")
    p.add_argument("--allow-non-loopback", action="store_true", help="allow a --url that is not a loopback host")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    args = p.parse_args(argv)
    if not 1 <= args.clients <= MAX_CLIENTS:
        p.error(f"--clients must be in 1..{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION_S:
        p.error(f"--duration must be in (0, {MAX_DURATION_S:.0f}]")
    if args.max_requests < 1:
        p.error("--max-requests must be >= 1")
    host = urlparse(args.url).hostname or ""
    if not args.launch and not is_loopback(host) and not args.allow_non_loopback:
        p.error(f"refusing to load-test the non-loopback host {host!r} (pass --allow-non-loopback if you mean it)")
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    proc = None
    base = args.url.rstrip("/")
    if args.launch:
        proc, base = launch(args.launch, extra, args.startup_timeout)
    try:
        report = asyncio.run(run_load(args, base))
    finally:
        if proc is not None:
            stop(proc)
    print_table(report)
    if args.json:
        write_json(args.json, report)
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
