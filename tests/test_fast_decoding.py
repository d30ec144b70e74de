"""The two slot forwards the decoding loops run on, plain (decoding/plain.py: dynamic shapes) and static
(static.py: static shapes, device-side windows, capturable steps), give the same hidden states and, through the same
loops, the same tokens; the backend choice degrades cleanly (backend.py). CPU, fp32, tiny random models."""

from __future__ import annotations

import pytest
import torch

from conftest import has_cuda, red_square, tiny_diffusion
from diffusionvl.core.config import DecodeConfig
from diffusionvl.decoding import backend, static

PROMPTS = ["Hello, how are you?", "What is the capital of France? Answer in one short sentence, please.",
           "Count: one two three four five six seven eight nine ten eleven twelve"]
CASES = [  # decoder, policy, temperature
    ("block", "static", 0.0), ("block", "threshold", 0.0), ("ar", "static", 0.0), ("full", "static", 0.0),
    ("block", "static", 0.8), ("ar", "static", 0.8), ("full", "threshold", 0.7),
]


def _pair(dm, fast, images=None, prompts=PROMPTS, **kw):
    opts = dict(block_size=4, steps=2, threshold=0.05, max_new_tokens=13, seed=3) | kw
    plain = dm.generate(prompts, images=images, fast="off", **opts)
    quick = dm.generate(prompts, images=images, fast=fast, **opts)
    return plain, quick


def _assert_same(plain, quick, backend_name="fast/eager"):
    assert quick.token_ids == plain.token_ids
    assert quick.finish_reasons == plain.finish_reasons
    assert quick.stats["forwards"] == plain.stats["forwards"]
    assert plain.stats["backend"] == "plain" and quick.stats["backend"] == backend_name


# ---- the two forwards, directly ----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "gemma3", "qwen2_5_vl"])
def test_static_forward_equals_plain_forward(arch):
    """For the same canvas, the static forward (whole bucketed canvas, device windows) computes the plain forward's
    hidden states (live prefix only) for the prefill and a block's fused and plain step windows; windows read,
    write, advance and select rows alike."""
    from diffusionvl.backbone.prompts import to_conversation
    from diffusionvl.decoding import _layout
    from diffusionvl.decoding.plain import open_plain
    from diffusionvl.decoding.static import open_static

    dm = tiny_diffusion(arch, block_size=4)
    images = [[red_square()], [red_square(color="blue")]] if arch == "qwen2_5_vl" else [None, None]
    encoded = dm.adapter.encode([to_conversation(p, im) for p, im in zip(PROMPTS[:2], images)])
    cfg = DecodeConfig(block_size=4, steps=2, max_new_tokens=9).resolved(4)
    static.clear_sessions(dm)
    with torch.inference_mode():
        layout = _layout(dm, encoded, cfg)
        kw = dict(use_cache=True, attention_block=4)
        with open_plain(dm, layout, encoded.vision, cfg, **kw) as plain, \
                open_static(dm, layout, encoded.vision, cfg, mode="eager", **kw) as quick:
            assert quick.tokens.shape[1] > plain.tokens.shape[1] == layout.total  # bucketed canvas
            p = layout.prefill
            torch.testing.assert_close(quick.prefill(p), plain.prefill(p), rtol=1e-5, atol=1e-5)
            for start, length in [(p, 4), (p - 4, 8)]:  # a plain step, then a fused step one block later
                wins = [(fwd, fwd.window(length), fwd.window(2)) for fwd in (plain, quick)]
                for fwd, win, pair in wins:
                    fwd.aim(win, start)
                    fwd.aim(pair, start + 1)
                (hp, wp, pp), (hq, wq, pq) = [(fwd.hidden(w), w, r) for fwd, w, r in wins]
                torch.testing.assert_close(hq, hp, rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(quick.rows(hq, wq, pq), plain.rows(hp, wp, pp), rtol=1e-5, atol=1e-5)
                assert torch.equal(quick.read(wq), plain.read(wp))
            for fwd, win, pair in wins:
                fwd.advance(pair)
                fwd.write(pair, torch.tensor([[7, 8], [9, 10]]))
            assert torch.equal(quick.tokens[:, :layout.total], plain.tokens)


# ---- static forward == plain forward, token for token, through the same loops --------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("prediction", ["shift", "same"])
@pytest.mark.parametrize("decoder,policy,temperature", CASES)
def test_static_forward_equals_plain_forward_batched(arch, prediction, decoder, policy, temperature):
    """Batched, different prompt lengths (left padding, prompt leftovers in the first block), both alignments,
    greedy and sampled (same generator draws in the same order)."""
    dm = tiny_diffusion(arch, block_size=4, prediction=prediction)
    plain, quick = _pair(dm, "on", decoder=decoder, policy=policy, temperature=temperature)
    _assert_same(plain, quick)


@pytest.mark.parametrize("decoder,policy", [("block", "static"), ("block", "threshold"), ("ar", "static"),
                                            ("full", "static")])
def test_static_forward_equals_plain_forward_vision(decoder, policy):
    """Qwen2.5-VL: M-RoPE positions and cached image features read from the static buffers."""
    dm = tiny_diffusion("qwen2_5_vl", block_size=4)
    images = [[red_square()], [red_square(color="blue")], [red_square((60, 60))]]
    plain, quick = _pair(dm, "on", images=images, decoder=decoder, policy=policy)
    _assert_same(plain, quick)


def _generate_ids(dm, ids, fast, **kw):
    """Decode pre-tokenized prompts (exact lengths) through the public front end."""
    from diffusionvl.backbone.adapters import Encoded
    from diffusionvl.decoding import run_encoded

    cfg = DecodeConfig(fast=fast, **(dict(block_size=4, steps=2, max_new_tokens=9) | kw))
    *_, final = run_encoded(dm, Encoded(input_ids=ids), cfg)
    return final.output


def test_short_prompt_without_prefill():
    """Prompts shorter than B: no prefill forward, the first block starts at slot 0 with the prompt in it."""
    dm = tiny_diffusion("llama", block_size=8)
    ids = [[5, 6, 7], [9, 10, 11, 12, 13]]
    plain = _generate_ids(dm, ids, "off", block_size=8, steps=4)
    quick = _generate_ids(dm, ids, "on", block_size=8, steps=4)
    assert plain.stats["prefill_forwards"] == 0
    _assert_same(plain, quick)


def test_sessions_are_reused_and_refilled():
    """A second call of the same shape reuses the session (on GPU: replays its graphs) with its own prompts."""
    dm = tiny_diffusion("qwen2", block_size=4)
    static.clear_sessions(dm)
    first_ids = [[20 + i for i in range(11)], [40 + i for i in range(6)]]
    other_ids = [[90 - i for i in range(11)], [70 - i for i in range(6)]]  # same lengths, other tokens
    first = _generate_ids(dm, first_ids, "on")
    session = next(iter(static._SESSIONS[dm].values()))
    other = _generate_ids(dm, other_ids, "on")
    assert list(static._SESSIONS[dm].values()) == [session] and not session.busy
    assert other.token_ids == _generate_ids(dm, other_ids, "off").token_ids != first.token_ids
    assert first.token_ids == _generate_ids(dm, first_ids, "on").token_ids


def test_interleaved_streams_do_not_share_a_session():
    dm = tiny_diffusion("qwen2", block_size=4)
    kw = dict(block_size=4, steps=2, max_new_tokens=12, fast="on")
    a, b = dm.stream_events(PROMPTS[:2], **kw), dm.stream_events(PROMPTS[1:], **kw)
    outs = {}
    pending = {"a": a, "b": b}
    while pending:
        for name, gen in list(pending.items()):
            ev = next(gen)
            if ev.final:
                outs[name] = ev.output.token_ids
                del pending[name]
    assert outs["a"] == dm.generate(PROMPTS[:2], block_size=4, steps=2, max_new_tokens=12, fast="off").token_ids
    assert outs["b"] == dm.generate(PROMPTS[1:], block_size=4, steps=2, max_new_tokens=12, fast="off").token_ids


# ---- the one place that chooses, and its fallbacks ---------------------------------------------------------------
def test_choice_without_cuda():
    cpu = torch.device("cpu")
    assert backend.choose(DecodeConfig(fast="off"), cpu).path == "plain"
    auto = backend.choose(DecodeConfig(fast="auto"), cpu)
    assert (auto.path, auto.mode) == ("plain", "eager") and "cpu" in auto.reason
    on = backend.choose(DecodeConfig(fast="on"), cpu)
    assert (on.path, on.mode) == ("fast", "eager") and "CUDA" in on.reason
    assert backend.choose(DecodeConfig(fast="on", use_cache=False), cpu).path == "plain"
    assert backend.choose(DecodeConfig(fast="compile"), cpu).mode == "compile"


def test_choice_with_cuda(monkeypatch):
    monkeypatch.setattr(backend, "cuda_graphs_available", lambda device: (True, "CUDA graphs"))
    gpu = torch.device("cuda")
    assert backend.choose(DecodeConfig(fast="auto"), gpu) == backend.Choice("fast", "graph", "CUDA graphs")
    assert backend.choose(DecodeConfig(fast="on", decoder="ar"), gpu).mode == "graph"
    assert backend.choose(DecodeConfig(fast="compile"), gpu).mode == "compile"
    assert backend.choose(DecodeConfig(fast="off"), gpu).path == "plain"


@pytest.mark.parametrize("where", ["CUDA graph capture", "creating a CUDA stream"])
def test_graph_failure_falls_back_to_eager(monkeypatch, caplog, where):
    """Force the executor to try CUDA graphs on CPU: the warm-up stream or the capture fails, steps run eagerly,
    tokens are unchanged, and the reason is logged and reported."""
    monkeypatch.setattr(backend, "cuda_graphs_available", lambda device: (True, "pretend"))
    if where == "CUDA graph capture":
        monkeypatch.setattr(backend.StepExecutor, "_on_stream", lambda self, call: call())  # warm-ups pass
    dm = tiny_diffusion("qwen2", block_size=4)
    static.clear_sessions(dm)
    with caplog.at_level("WARNING", logger="diffusionvl.decoding"):
        plain, quick = _pair(dm, "on", decoder="block", max_new_tokens=20)
    assert quick.token_ids == plain.token_ids
    assert quick.stats["backend"] == "fast/eager"
    assert f"{where} failed" in quick.stats["backend_reason"]
    assert any(f"{where} failed" in r.getMessage() for r in caplog.records)


def test_compile_failure_falls_back(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    dm = tiny_diffusion("qwen2", block_size=4)
    static.clear_sessions(dm)
    plain, quick = _pair(dm, "compile", decoder="block")
    assert quick.token_ids == plain.token_ids
    assert quick.stats["backend"] == "fast/eager"
    assert "torch.compile failed (RuntimeError: no compiler here)" in quick.stats["backend_reason"]


# ---- the steps are capturable: dynamo traces each one whole, with no host-syncing op in the graph ----------------
SYNC_METHODS = {"item", "tolist", "nonzero", "cpu", "numpy", "masked_select", "unique", "argwhere", "__bool__"}
SYNC_FUNCTIONS = {torch.nonzero, torch.masked_select, torch.unique, torch.argwhere, torch.Tensor.item}


class SyncInspector:
    """A torch.compile backend that runs the traced graph eagerly and records ops that would sync with the host
    (on CUDA they break graph capture). fullgraph=True makes any graph break an error, which the executor reports."""

    def __init__(self):
        self.graphs, self.syncs = 0, []

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        for node in gm.graph.nodes:
            if (node.op == "call_method" and node.target in SYNC_METHODS) or \
                    (node.op == "call_function" and node.target in SYNC_FUNCTIONS):
                self.syncs.append(str(node.target))
        return gm.forward


def _inspect(monkeypatch, dm, decoder):
    inspector = SyncInspector()
    monkeypatch.setattr(backend, "COMPILE_OPTIONS", {"backend": inspector, "fullgraph": True, "dynamic": False})
    static.clear_sessions(dm)
    plain, quick = _pair(dm, "compile", decoder=decoder, max_new_tokens=9)
    assert quick.token_ids == plain.token_ids
    return inspector, quick


@pytest.mark.parametrize("arch,decoder", [("qwen2", "block"), ("qwen2", "ar"), ("qwen2", "full"),
                                          ("gemma3", "block")])
def test_steps_trace_as_one_graph_without_host_syncs(monkeypatch, arch, decoder):
    inspector, quick = _inspect(monkeypatch, tiny_diffusion(arch, block_size=4), decoder)
    assert quick.stats["backend"] == "fast/compile", quick.stats["backend_reason"]  # no graph break anywhere
    assert inspector.graphs >= (1 if decoder != "block" else 2) and inspector.syncs == []


def test_host_sync_in_a_step_is_detected(monkeypatch):
    """The previous test can fail: a `.item()` inside a step shows up in the traced graph."""
    dm = tiny_diffusion("qwen2", block_size=4)
    head = dm.adapter.head
    dm.adapter.head = lambda hidden: head(hidden) + 0.0 * head(hidden).sum().item()
    inspector, _ = _inspect(monkeypatch, dm, "block")
    assert "item" in inspector.syncs


# ---- GPU: the captured graphs replay the plain path's tokens ------------------------------------------------------
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA device")
@pytest.mark.parametrize("decoder,policy", [("block", "static"), ("block", "threshold"), ("ar", "static"),
                                            ("full", "static")])
def test_cuda_graphs_equal_plain_greedy_fp32(decoder, policy):
    dm = tiny_diffusion("qwen2", block_size=4).to("cuda")
    static.clear_sessions(dm)
    for _ in range(2):  # the second call replays graphs captured in the first
        plain, quick = _pair(dm, "auto", decoder=decoder, policy=policy, max_new_tokens=40)
        _assert_same(plain, quick, "fast/graph")
    sessions = list(static._SESSIONS[dm].values())
    assert any(s.executor.captured for s in sessions)
