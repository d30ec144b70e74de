"""Which decoding path runs, and how fast-path steps execute: chosen in ONE place, with a logged reason.

Contract:
- `choose(cfg, device) -> Choice` turns `DecodeConfig.fast` ("auto" | "on" | "off" | "compile"), the decoder and
  the device into a path, "plain" (the loops run on plain.py's `PlainForward`, dynamic shapes) or "fast" (the same
  loops on static.py's `StaticSession`, static shapes), and a step mode for the fast path:
    "eager"   - every step is a plain call (CPU, or after a fallback);
    "graph"   - CUDA graphs: after `warmup` eager calls each step shape is captured once and then replayed;
    "compile" - the step is wrapped with torch.compile (inductor, no cudagraphs of its own) and then captured.
  Both paths give the same tokens (tests/test_fast_decoding.py); the choice and its reason land in the stats.
- `StepExecutor(mode).run(name, fn)` executes the zero-argument step closure `fn` once and returns its outputs.
  `fn` must read and write only static buffers (same storage every call) and must not sync with the host, so that
  its CUDA graph replays exactly what an eager call would do. A failure to compile or capture is logged once and
  the executor degrades one level (compile -> graph -> eager); since a failed compile or capture executes nothing,
  the step is then simply run eagerly and decoding continues with identical results.
Model code never calls torch.compile; only this call site does, so model code stays plain eager PyTorch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

log = logging.getLogger("diffusionvl.decoding")

MODES = ("eager", "graph", "compile")
# What `fast="compile"` hands torch.compile: inductor's default mode (fused kernels, no cudagraph trees: the executor
# captures the graph itself), one specialization per static shape.
COMPILE_OPTIONS: dict[str, Any] = {"fullgraph": False, "dynamic": False}
RECOMPILE_LIMIT = 64  # one compiled variant per (batch, canvas length, step shape); raise torch's default of 8


@dataclass(frozen=True)
class Choice:
    path: str  # "plain" | "fast"
    mode: str  # "eager" | "graph" | "compile" (how fast-path steps run; "eager" for the plain path)
    reason: str


def cuda_graphs_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"CUDA graphs need a CUDA device (model is on {device.type})"
    if not torch.cuda.is_available():
        return False, "torch.cuda is not available"
    return True, "CUDA graphs"


def choose(cfg: Any, device: torch.device) -> Choice:
    """The single place that decides between the plain and the fast path (see module docstring)."""
    fast = cfg.fast
    if fast == "off":
        return Choice("plain", "eager", "fast='off'")
    if cfg.decoder == "block" and not cfg.use_cache:
        return Choice("plain", "eager", "use_cache=False recomputes the prefix: no static-shape fast path")
    graphs, why = cuda_graphs_available(device)
    if fast == "auto" and not graphs:
        # Measured (docs/performance.md): on CPU the dynamic-shape path reads only the live part of the cache and
        # is at least as fast per forward as static shapes, which pay off only by enabling CUDA graphs.
        return Choice("plain", "eager", f"fast='auto' on {device.type}: dynamic shapes are fastest without CUDA graphs")
    if fast == "compile":
        return Choice("fast", "compile", "torch.compile + CUDA graphs" if graphs else f"torch.compile, eager ({why})")
    if graphs:
        return Choice("fast", "graph", why)
    return Choice("fast", "eager", f"static shapes, eager steps: {why}")


def _raise_recompile_limit() -> None:
    import torch._dynamo.config as dynamo_config

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < RECOMPILE_LIMIT:
            setattr(dynamo_config, name, RECOMPILE_LIMIT)


class StepExecutor:
    """Runs named step closures eagerly, compiled and/or as replayed CUDA graphs, degrading on failure."""

    def __init__(self, mode: str, device: torch.device, warmup: int = 2):
        assert mode in MODES, mode
        self.compile = mode == "compile"
        self.graphs = mode in ("graph", "compile") and cuda_graphs_available(device)[0]
        self.warmup = warmup
        self.calls: dict[str, int] = {}
        self.compiled: dict[str, Callable[[], Any]] = {}
        self.captured: dict[str, tuple[Any, Any]] = {}  # name -> (CUDAGraph, its static outputs)
        self.pool = None
        self.device = device
        self.stream: Any = None  # warm-up and capture stream, created on first use
        self.fallbacks: list[str] = []  # reasons, in order (reported in the stats)

    @property
    def mode(self) -> str:
        if self.graphs:
            return "compile" if self.compile else "graph"
        return "compile" if self.compile else "eager"

    def _degrade(self, what: str, exc: BaseException) -> None:
        reason = f"{what} failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); falling back"
        log.warning("diffusionvl fast path: %s", reason)
        self.fallbacks.append(reason)

    def _callable(self, name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        if not self.compile:
            return fn
        if name not in self.compiled:
            _raise_recompile_limit()
            self.compiled[name] = torch.compile(fn, **COMPILE_OPTIONS)
        return self.compiled[name]

    def _on_stream(self, call: Callable[[], Any]) -> Any:
        """Run on the capture stream when graphs are on (cuBLAS/allocator state then exists for the capture, as the
        CUDA graphs docs ask for warm-up), ordered after and before the current stream's work."""
        if not self.graphs:
            return call()
        if self.stream is None:
            try:
                self.stream = torch.cuda.Stream(self.device)
            except Exception as exc:  # noqa: BLE001 - no usable CUDA runtime: no graphs either
                self._degrade("creating a CUDA stream", exc)
                self.graphs = False
                return call()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            out = call()
        current.wait_stream(self.stream)
        return out

    def _eager(self, name: str, fn: Callable[[], Any]) -> Any:
        call = self._callable(name, fn)
        if call is fn:
            return self._on_stream(fn)
        try:
            return self._on_stream(call)
        except Exception as exc:  # noqa: BLE001 - any compiler error: run this and later steps uncompiled
            self._degrade("torch.compile", exc)
            self.compile = False
            self.compiled.clear()
            return fn()

    def _capture(self, name: str, fn: Callable[[], Any]) -> Any:
        call = self._callable(name, fn)
        try:
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                out = call()
        except Exception as exc:  # noqa: BLE001 - an op that cannot be captured: run eagerly from now on
            self._degrade("CUDA graph capture", exc)
            self.graphs = False
            self.captured.clear()
            return self._eager(name, fn)
        self.captured[name] = (graph, out)
        graph.replay()  # capturing recorded the step without running it
        return out

    def reset(self) -> None:
        """Forget captured graphs and warm-up counts (a buffer they read was replaced)."""
        self.captured.clear()
        self.calls.clear()

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        """Execute step `name` once (eagerly, compiled, or by replaying its graph) and return its outputs."""
        if name in self.captured:
            graph, out = self.captured[name]
            graph.replay()
            return out
        count = self.calls.get(name, 0) + 1
        self.calls[name] = count
        if not self.graphs or count <= self.warmup:
            return self._eager(name, fn)
        return self._capture(name, fn)
