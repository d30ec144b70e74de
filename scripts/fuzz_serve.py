"""Fuzz `diffusionvl serve` with schemathesis, from the server's own OpenAPI schema (docs/reliability.md).

For each `--arch`, converts a tiny random model (no downloads), starts `diffusionvl serve` on it in its own process
on 127.0.0.1, and runs `schemathesis run` over every operation of /openapi.json: the examples, coverage (boundary
and invalid values), fuzzing and stateful phases, generated bodies, paths and methods, every check except
positive_data_acceptance (below). Meanwhile a "hi" request is sent every half second. The run fails when schemathesis
reports a failure (a 5xx, an undocumented status or content type, a body or event that violates the schema, invalid
data accepted, a request slower than --max-response-time), when a "hi" takes longer than --hi-bound seconds beyond
twice its idle time, or when the server logs a traceback.

positive_data_acceptance ("schema-valid data must get 2xx") is left out: what the server refuses with 400 beyond
the schema are rules across fields or about content (steps <= block size, prompt + max_tokens <= the context, images
that decode, images sent to a text-only model, control tokens in text), and JSON Schema's `integer` includes 1.0,
which the server refuses by design (strict types: `"n": 1.0` is a 400).

    python scripts/fuzz_serve.py                                   # the suite's bounded run (tests/test_serve_fuzz.py)
    python scripts/fuzz_serve.py --examples 500 --arch llama qwen2_5_vl --seed 1   # the long run

Test cases per run grow with --examples (schemathesis' --max-examples: per operation and phase); the summary
prints how many were generated. Exit status 0 when all passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx

CHECKS_LEFT_OUT = "positive_data_acceptance"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", nargs="+", default=["qwen2_5_vl"], help="tiny model architectures to serve, one run each")
    p.add_argument("--examples", type=int, default=12, help="schemathesis --max-examples (per operation and phase)")
    p.add_argument("--seed", type=int, default=0, help="schemathesis --seed (the same seed generates the same cases)")
    p.add_argument("--max-response-time", type=float, default=60.0, help="slowest answer allowed, seconds")
    p.add_argument("--hi-bound", type=float, default=2.0,
                   help="slowest 'hi' allowed during the run, seconds beyond twice its idle time")
    p.add_argument("--workdir", type=Path, default=None, help="where models, logs and reports go (default: temp)")
    p.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.examples <= 100_000:
        p.error("--examples must be in 1..100000")
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}


@contextlib.contextmanager
def serving(arch: str, workdir: Path) -> Iterator[tuple[str, str, Path]]:
    """A tiny `arch` model served on 127.0.0.1; yields (base URL, model name, server log)."""
    model = workdir / f"tiny-{arch}"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, "-m", "diffusionvl", "convert", "--tiny", arch, str(model), "--block-size",
                        "4"], env=_env(), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port, log = _free_port(), workdir / f"serve-{arch}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "diffusionvl", "serve", "--model", str(model), "--port",
                                 str(port), "--log-level", "warning"], env=_env(), stdout=out, stderr=out)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # a saturated machine was seen to take over 180 s
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start; its log: {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.2)
        yield base, model.name, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


class HiProbe:
    """Sends a short "hi" every `every` seconds from a thread; keeps the slowest answer and any non-200."""

    def __init__(self, url: str, model: str, every: float = 0.5):
        self.url, self.every = url + "/v1/chat/completions", every
        self.body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        self.slowest, self.sent, self.bad = 0.0, 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def once(self, client: httpx.Client) -> float:
        t0 = time.monotonic()
        r = client.post(self.url, json=self.body)
        if r.status_code != 200:
            self.bad.append(f"{r.status_code} {r.text[:200]}")
        return time.monotonic() - t0

    def idle(self) -> float:
        """The slowest of 3 "hi" before the run (after one to warm up)."""
        with httpx.Client(timeout=60) as client:
            return max([self.once(client) for _ in range(4)][1:])

    def _run(self) -> None:
        with httpx.Client(timeout=600) as client:
            while not self._stop.wait(self.every):
                self.slowest = max(self.slowest, self.once(client))
                self.sent += 1

    def __enter__(self) -> "HiProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def schemathesis_command(base: str, args: argparse.Namespace, reports: Path) -> list[str]:
    return [sys.executable, "-m", "schemathesis.cli", "run", f"{base}/openapi.json", "--checks", "all",
            "--exclude-checks", CHECKS_LEFT_OUT, "--max-examples", str(args.examples), "--seed", str(args.seed),
            "--workers", "1", "--max-response-time", str(args.max_response_time), "--request-timeout",
            str(args.max_response_time + 30), "--output-sanitize", "false", "--report", "json",
            "--report-dir", str(reports)]


def fuzz(arch: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One schemathesis run against one tiny served model -> its summary (`ok` says whether it passed)."""
    reports = workdir / f"schemathesis-{arch}"
    with serving(arch, workdir) as (base, name, log):
        probe = HiProbe(base, name)
        idle = probe.idle()
        t0 = time.monotonic()
        with probe:
            reports.mkdir(parents=True, exist_ok=True)  # schemathesis keeps its own state in its working folder
            run = subprocess.run(schemathesis_command(base, args, reports), env=_env(), capture_output=True,
                                 text=True, cwd=reports)
        seconds = time.monotonic() - t0
    report = json.loads(max(reports.glob("json-*.json"), key=lambda p: p.stat().st_mtime).read_text())
    server_log = log.read_text(errors="replace")
    summary = {"arch": arch, "examples": args.examples, "seed": args.seed, "seconds": round(seconds, 1),
               "test_cases": report["test_cases"]["generated"], "failures": report["failures"],
               "errors": report["errors"], "schemathesis_exit": run.returncode, "hi_sent": probe.sent,
               "hi_idle_s": round(idle, 3), "hi_slowest_s": round(probe.slowest, 3), "hi_errors": probe.bad,
               "server_tracebacks": server_log.count("Traceback")}
    summary["ok"] = (run.returncode == 0 and not summary["failures"] and not summary["errors"] and not probe.bad
                     and probe.slowest - 2 * idle < args.hi_bound and not summary["server_tracebacks"])
    if not summary["ok"]:
        summary["schemathesis_output"] = run.stdout[-20000:] + run.stderr[-5000:]
        summary["server_log_tail"] = server_log[-5000:]
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fuzz-serve-")))
        workdir.mkdir(parents=True, exist_ok=True)
        results = [fuzz(arch, args, workdir) for arch in args.arch]
    for r in results:
        print(f"{r['arch']}: {r['test_cases']} test cases in {r['seconds']} s (--examples {r['examples']}, --seed "
              f"{r['seed']}), {len(r['failures'])} failures, {len(r['errors'])} errors; 'hi' x {r['hi_sent']}: idle "
              f"{r['hi_idle_s']} s, slowest {r['hi_slowest_s']} s, {len(r['hi_errors'])} not 200; server tracebacks: "
              f"{r['server_tracebacks']} -> {'ok' if r['ok'] else 'FAILED'}")
        if not r["ok"]:
            print(r.get("schemathesis_output", ""), r.get("server_log_tail", ""), sep="\n")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
