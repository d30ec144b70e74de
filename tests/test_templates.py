"""Answer templates (decoding/template.py): fixed tokens committed before a block's first step, masked slots filled
by the policy. Proofs on tiny random models (fp32, CPU): fixed tokens land exactly at their positions; one slot of
N equals plain decoding of N tokens with the stop token suppressed; a brute-force per-step oracle (whole sequence
recomputed every step, fixed tokens pre-committed) gives the cached decoder's tokens; a later fixed token in the
same block changes an earlier slot (bidirectional), one in a later block does not (block-causal)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_diffusion
from diffusionvl.backbone.adapters import Encoded
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.core import attention, masks
from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.core.sampling import POLICIES, transfer_schedule
from diffusionvl.decoding import run_encoded
from diffusionvl.decoding.template import encode_templates, parse

PROMPTS = ["Hello, how are you?", "What is the capital of France? Answer in one short sentence, please.", "Hi"]
TEMPLATES = ['{"shape": "<mask:2>", "colour": "<mask:2>"}',
             "There are <mask:1> objects. The largest is a <mask:1> <mask:1>.",
             "<mask:3> and then <mask:6>"]


def _template_ids(dm, prompts, templates):
    convs = [to_conversation(p) for p in prompts]
    enc = dm.adapter.encode(convs)
    texts = [dm.adapter.render(c) for c in convs]
    return enc, encode_templates(dm, templates, texts, [len(x) for x in enc.input_ids])


def _decode(dm, prompt_ids, templates, **kw):
    final = None
    for final in run_encoded(dm, Encoded(input_ids=prompt_ids), DecodeConfig(**kw), templates):
        pass
    return final.output


# ---- fixed tokens appear exactly at their positions ----------------------------------------------------------------
@pytest.mark.parametrize("decoder,use_cache,fast,policy", [
    ("block", True, "off", "static"), ("block", True, "on", "static"), ("block", False, "off", "static"),
    ("block", True, "off", "threshold"), ("block", True, "on", "threshold"), ("block", False, "off", "threshold"),
    ("ar", True, "off", "static"), ("ar", True, "on", "static"), ("full", False, "off", "static")])
def test_fixed_tokens_appear_exactly_at_their_positions(decoder, use_cache, fast, policy):
    dm = tiny_diffusion("llama", block_size=4)
    enc, ids = _template_ids(dm, PROMPTS, TEMPLATES)
    steps = None if decoder == "ar" else 2
    out = dm.generate(PROMPTS, template=TEMPLATES, decoder=decoder, use_cache=use_cache, fast=fast, policy=policy,
                      steps=steps, threshold=0.05, max_new_tokens=3)
    stop = set(dm.stop_token_ids) | {dm.eos_token_id, dm.mask_token_id}
    for row, template in zip(out.token_ids, ids):
        assert len(row) == len(template)
        for got, want in zip(row, template):
            if want == dm.mask_token_id:
                assert got not in stop  # a slot is filled with exactly N tokens: never a stop or mask token
            else:
                assert got == want
    assert out.finish_reasons == ["stop"] * 3
    assert out.texts[0].startswith('{"shape": "') and out.texts[0].endswith('"}')
    assert out.texts[1].startswith("There are ") and out.texts[1].endswith(".")


def test_a_template_without_slots_returns_itself_and_costs_no_denoising_step():
    dm = tiny_diffusion("llama", block_size=4)
    text = "A fixed answer that is long enough to fill several blocks of four tokens."
    for use_cache in (True, False):
        out = dm.generate(PROMPTS, template=text, use_cache=use_cache)
        assert out.texts == [text] * 3
        assert out.stats["forwards"] == out.stats["prefill_forwards"]  # only the prefill (with the cache)


def test_a_batch_mixes_templated_and_free_samples():
    dm = tiny_diffusion("llama", block_size=4)
    free = dm.generate(PROMPTS[1], max_new_tokens=10)
    mixed = dm.generate(PROMPTS[:2], template=["Fixed <mask:2> text", None], max_new_tokens=10)
    assert mixed.token_ids[1] == free.token_ids[0]  # the free sample is decoded as alone (invariant 5)
    assert mixed.texts[0].startswith("Fixed") and mixed.texts[0].endswith(" text")


# ---- one <mask:N> == plain block decoding of N tokens with the stop token suppressed ------------------------------
@pytest.mark.parametrize("policy", ["static", "threshold"])
def test_one_slot_equals_plain_decoding_with_the_stop_token_suppressed(policy):
    """A template's answer ends with the end-of-answer token, so the two agree exactly where the answer ends at a
    block boundary (plain decoding has no such token there); elsewhere the slot still gets exactly N tokens."""
    bsz = 4
    dm = tiny_diffusion("llama", block_size=bsz)
    enc = dm.adapter.encode([to_conversation(p) for p in PROMPTS])
    kw = dict(block_size=bsz, steps=2, policy=policy, threshold=0.05)
    head = dm.adapter.head
    stops = torch.tensor(sorted(set(dm.stop_token_ids) | {dm.eos_token_id}))
    for prompt in enc.input_ids:
        leftover = len(prompt) % bsz
        for n in (2 * bsz - leftover, 3 * bsz - leftover):
            templated = _decode(dm, [prompt], [[dm.mask_token_id] * n], **kw)
            dm.adapter.head = lambda h: head(h).index_fill(-1, stops, float("-inf"))  # the stop token suppressed
            try:
                plain = _decode(dm, [prompt], None, max_new_tokens=n, **kw)
            finally:
                dm.adapter.head = head
            assert templated.token_ids == plain.token_ids and len(plain.token_ids[0]) == n
        ragged = _decode(dm, [prompt], [[dm.mask_token_id] * (2 * bsz - leftover + 1)], **kw)
        assert len(ragged.token_ids[0]) == 2 * bsz - leftover + 1 and ragged.finish_reasons == ["stop"]


# ---- per-step oracle: full recomputation every step, fixed tokens pre-committed ------------------------------------
def _oracle(dm, prompt, template, bsz, steps, policy, threshold):
    """One sample, no cache, no padding: every step re-runs [0, end of block) under the block-causal mask."""
    seq = prompt + template + [dm.eos_token_id]
    seq += [dm.eos_token_id] * (-len(seq) % bsz)
    seq = torch.tensor([seq])
    banned = sorted(set(dm.stop_token_ids) | {dm.eos_token_id, dm.mask_token_id})
    schedule = transfer_schedule(bsz, steps)
    for s in range(len(prompt) // bsz * bsz, seq.shape[1], bsz):
        e = s + bsz
        for step in range(steps):
            is_mask = seq[:, s:e] == dm.mask_token_id
            if not is_mask.any():
                break
            q = torch.arange(e)
            mask = attention.build(lambda w: masks.block_causal_dense_mask(q, e, torch.zeros(1, dtype=torch.long),
                                                                           bsz, w),
                                   dm.adapter.text_config, dm.adapter.text_config, dm.dtype)
            hidden = dm.adapter.run_decoder(dm.adapter.input_embeddings()(seq[:, :e]), mask, q.view(1, 1, -1))
            logits = dm.adapter.head(hidden[:, s - 1:e - 1]).float()  # 'shift': row i - 1 predicts token i
            logits[..., banned] = float("-inf")
            conf, cand = torch.softmax(logits, -1).max(-1)
            fill = POLICIES[policy](conf, is_mask, schedule[step], threshold)
            seq[:, s:e] = torch.where(fill, cand, seq[:, s:e])
    return seq[0, len(prompt):len(prompt) + len(template)].tolist()


@pytest.mark.parametrize("policy", ["static", "threshold"])
@pytest.mark.parametrize("fast", ["off", "on"])
def test_cached_decoder_equals_a_per_step_oracle_on_three_ragged_templates(policy, fast):
    bsz, steps, threshold = 4, 2, 0.05
    dm = tiny_diffusion("llama", block_size=bsz)
    enc, ids = _template_ids(dm, PROMPTS, TEMPLATES)
    out = _decode(dm, enc.input_ids, ids, block_size=bsz, steps=steps, policy=policy, threshold=threshold,
                  fast=fast)
    with torch.no_grad():
        for prompt, template, got in zip(enc.input_ids, ids, out.token_ids):
            assert got == _oracle(dm, prompt, template, bsz, steps, policy, threshold)


# ---- bidirectional inside a block, block-causal across blocks -------------------------------------------------------
def test_a_later_fixed_token_changes_an_earlier_slot_only_inside_its_block():
    bsz = 8
    dm = tiny_diffusion("llama", block_size=bsz)
    prompt = dm.adapter.encode([to_conversation(PROMPTS[1])]).input_ids[0]
    prompt = prompt[: len(prompt) // bsz * bsz - 4]  # 4 leftover tokens: the slots and the rows predicting them
    m = dm.mask_token_id
    words = list(range(300, 340, 5))  # ordinary tokens of the tiny vocabulary
    for k in (1, 3):  # k slots, then the fixed token, all in the first block
        same_block = {tuple(_decode(dm, [prompt], [[m] * k + [w]], steps=bsz).token_ids[0][:k]) for w in words}
        assert len(same_block) > 1  # bidirectional: the slots see a fixed token after them in their block
    later_block = {tuple(_decode(dm, [prompt], [[m] * 4 + [w]], steps=bsz).token_ids[0][:4]) for w in words}
    assert len(later_block) == 1  # block-causal: a fixed token in a later block cannot reach them


# ---- fully fixed blocks: no step; with the cache, one commit forward for a run of them ------------------------------
def test_fully_fixed_blocks_cost_no_denoising_step():
    bsz = 4
    dm = tiny_diffusion("llama", block_size=bsz)
    prompt = dm.adapter.encode([to_conversation(PROMPTS[0])]).input_ids[0]
    leftover = len(prompt) % bsz
    m, word = dm.mask_token_id, 300
    template = [m] * (bsz - leftover) + [word] * (3 * bsz) + [m] * bsz  # masks, 3 fixed blocks, masks
    cached = _decode(dm, [prompt], [template], block_size=bsz, steps=bsz, policy="static")
    fresh = _decode(dm, [prompt], [template], block_size=bsz, steps=bsz, policy="static", use_cache=False)
    assert cached.token_ids == fresh.token_ids
    assert fresh.stats["forwards"] == (bsz - leftover) + bsz  # one step per masked token, none for fixed blocks
    # with the cache: the prefill, and one forward writing the first two fixed blocks' keys (the last one is
    # written by the next block's fused step)
    assert cached.stats["forwards"] == 1 + (bsz - leftover) + 1 + bsz
    on = _decode(dm, [prompt], [template], block_size=bsz, steps=bsz, policy="static", fast="on")
    assert on.token_ids == cached.token_ids and on.stats["forwards"] == cached.stats["forwards"]


def test_a_static_session_serves_templated_and_free_calls_alike():
    dm = tiny_diffusion("llama", block_size=4)
    calls = [dict(), dict(template="x <mask:5> y"), dict(), dict(template=["<mask:4>.", None, "Yes <mask:2>"])]
    for kw in calls:
        for decoder in ("block", "ar"):
            on = dm.generate(PROMPTS, decoder=decoder, fast="on", max_new_tokens=9, **kw)
            off = dm.generate(PROMPTS, decoder=decoder, fast="off", max_new_tokens=9, **kw)
            assert on.token_ids == off.token_ids and on.stats["backend"].startswith("fast")


# ---- bad templates: one line ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("template,needle", [
    ("", "template: empty"), ("a <mask:0> b", "out of range"), ("<mask:100000>", "out of range"),
    ("<mask>", "malformed slot"), ("<mask:two>", "malformed slot"), ("<slot:3>", "unknown tag"),
    ("done<|im_end|>", "control token"), ("<mask:{context}>", "template too long"),
    ("<mask:{beyond}>", "out of range")])
def test_bad_templates_are_one_line_errors(template, needle):
    dm = tiny_diffusion("llama", block_size=4)
    template = template.format(context=dm.max_positions, beyond=dm.max_positions + 1)
    with pytest.raises(DiffusionVLError) as info:
        dm.generate("Hi", template=template)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_literal_angle_brackets_are_text():
    assert parse("a <b> c <mask:2>").parts == ["a <b> c ", 2]


# ---- the CLI: generate / chat / eval take --template; a bad one is one line, exit 2 ------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from diffusionvl.cli import main

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    assert main(["convert", "--tiny", "llama", str(path), "--block-size", "4"]) == 0
    return path


def test_cli_generate_chat_and_eval_take_a_template(tiny_dir, tmp_path, capsys, monkeypatch):
    import io
    import json

    from diffusionvl.cli import main

    template = '{"shape": "<mask:2>", "colour": "<mask:1>"}'
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--template", template, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"].startswith('{"shape": "') and out["text"].endswith('"}') and len(out["slots"]) == 2
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "Hello", "--template", "Yes, <mask:3>.",
                 "--decoder", "ar"]) == 0
    assert capsys.readouterr().out.startswith("Yes, ")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi\nAnd now?\n"))
    assert main(["chat", "--model", str(tiny_dir), "--template", "Answer: <mask:2>!"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x]
    assert len(lines) == 2 and all(x.startswith("Answer: ") and x.endswith("!") for x in lines)
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "Colour?", "answers": ["red"]}) + "\n"
                    + json.dumps({"question": "Shape?", "answers": ["star"], "template": "Shape: <mask:2>!"}) + "\n")
    assert main(["eval", "--model", str(tiny_dir), "--task", "jsonl", "--data", str(data), "--out",
                 str(tmp_path / "ev"), "--template", "It is <mask:1>.", "--no-progress"]) == 0
    first, second = [json.loads(x) for x in (tmp_path / "ev" / "samples.jsonl").read_text().splitlines()]
    assert first["answer"].startswith("It is ") and first["prediction"] == first["slots"][0].strip()
    assert second["answer"].startswith("Shape: ") and second["answer"].endswith("!")  # the line's own template
    data.write_text(json.dumps({"question": "Shape?", "answers": ["star"], "template": "<mask:x>"}) + "\n")
    assert main(["eval", "--model", str(tiny_dir), "--task", "jsonl", "--data", str(data), "--out",
                 str(tmp_path / "ev2"), "--no-progress"]) == 2
    assert f"{data}:1: template: malformed slot" in capsys.readouterr().err


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--prompt", "x", "--template", "<mask:0>"], "out of range"),
    (["generate", "--prompt", "x", "--template", "<foo:1>"], "unknown tag"),
    (["generate", "--prompt", "x", "--template", "<mask:{context}>"], "template too long"),
    (["eval", "--task", "jsonl", "--data", "{data}", "--template", "<mask>"], "malformed slot"),
])
def test_cli_bad_templates_exit_2(tiny_dir, tmp_path, capsys, argv, needle):
    import json

    from diffusionvl.cli import main

    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "Colour?", "answers": ["red"]}\n')
    context = json.loads((tiny_dir / "config.json").read_text())["max_position_embeddings"]
    argv = [a.replace("{data}", str(data)).replace("{context}", str(context)) for a in argv]
    assert main([argv[0], "--model", str(tiny_dir), *argv[1:]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and needle in err[-1] and not any("Traceback" in x for x in err)


# ---- the server: a `template` extension field; a bad one is a 400 ---------------------------------------------------
def test_server_answers_templates_batched_with_free_requests_and_refuses_bad_ones():
    pytest.importorskip("fastapi")
    import concurrent.futures

    from fastapi.testclient import TestClient

    from diffusionvl.jobs.serve import ServeConfig, create_app

    dm = tiny_diffusion("llama", block_size=4)
    app = create_app(dm, ServeConfig(max_batch=4, batch_wait_ms=200), model_name="tiny")
    asks = [("Hello, how are you?", TEMPLATES[0]), ("Hi", None), ("Name a colour.", TEMPLATES[1])]
    engine, batches = app.state.diffusionvl.engine, []
    real = engine._events

    def seen(encoded, cfg, *templates):
        batches.append([t is not None for t in (templates[0] if templates else [None] * len(encoded.input_ids))])
        return real(encoded, cfg, *templates)

    engine._events = seen
    with TestClient(app) as client:
        def ask(prompt, template):
            body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}]}
            extra = {"template": template} if template else {"max_tokens": 12}
            return client.post("/v1/chat/completions", json={**body, **extra})

        with concurrent.futures.ThreadPoolExecutor(3) as pool:  # one batch: ragged templates and a free answer
            answers = list(pool.map(lambda a: ask(*a), asks))
        assert sorted(batches[0]) == [False, True, True]  # the three shared one batch
        for (prompt, template), r in zip(asks, answers):
            assert r.status_code == 200
            out = r.json()["choices"][0]
            ref = dm.generate([{"role": "user", "content": prompt}], template=template, max_new_tokens=12)
            assert out["message"]["content"] == ref.texts[0] and out["finish_reason"] == ref.finish_reasons[0]
        for template, needle in [("<mask:0>", "out of range"), ("<x:1>", "unknown tag"), ("a<|im_end|>", "control"),
                                 ("<mask:20> and more", "less than the template")]:
            r = client.post("/v1/chat/completions", json={"model": "tiny", "template": template, "max_tokens": 12,
                                                          "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 400 and needle in r.json()["error"]["message"]
        r = client.post("/v1/chat/completions", json={"model": "tiny", "template": 3,
                                                      "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 400


# ---- bench --template: forwards saved by fixed positions ------------------------------------------------------------
def test_bench_reports_forwards_saved_by_a_template(tmp_path):
    from diffusionvl.jobs.bench import BenchConfig, markdown_table, run_bench

    cfg = BenchConfig(shape="tiny", batch=[2], prompt=[9], block_size=4, steps=4, warmup=0, repeats=1,
                      decoders=["ar", "block_static", "block_threshold"], agreement=False, plot=False,
                      template="Fixed words here, then <mask:3> and a long fixed tail of words.",
                      output=str(tmp_path / "b.json"))
    rows = {r["decoder"]: r for r in run_bench(cfg, progress=False)["results"]}
    assert rows["ar"]["forwards_saved_by_template"] == 0  # AR feeds every fixed token with a forward of its own
    assert rows["block_static"]["forwards_saved_by_template"] > 0
    assert rows["block_static"]["tokens"] == rows["ar"]["tokens"]
    assert "fwd saved by template" in markdown_table({"meta": {"config": {"template": cfg.template}},
                                                      "results": list(rows.values())})
