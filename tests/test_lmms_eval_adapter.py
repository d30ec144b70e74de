"""The lmms-eval adapter: request conversion with small fakes of lmms-eval's `Instance` objects (lmms-eval itself is
an optional extra), generate_until == our generate cut at `until`, in request order across gen_kwargs groups;
loglikelihood == the NELBO as a loss, is_greedy == greedy decoding reproduces the continuation; and, where lmms-eval
is installed, its registry resolves our entry point (the real harness: tests/test_lmms_eval_harness.py)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from conftest import red_square, tiny_diffusion
from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.integrations import lmms_eval as adapter


def _request(context, gen_kwargs, doc_id, task="t", split="test", visual=True):
    doc_to_visual = (lambda doc: [doc["image"]]) if visual else None
    return SimpleNamespace(args=(context, gen_kwargs, doc_to_visual, doc_id, task, split))


def test_to_messages_places_images():
    a, b = red_square(), red_square(color="blue")
    plain = adapter.to_messages("What is shown?", [a])
    assert plain == [{"role": "user", "content": [{"type": "image", "image": a},
                                                  {"type": "text", "text": "What is shown?"}]}]
    inter = adapter.to_messages("<image>\nCompare with <image> please.", [a, b], system="Be brief.")
    assert inter[0] == {"role": "system", "content": "Be brief."}
    kinds = [(p["type"], p.get("text")) for p in inter[1]["content"]]
    assert kinds == [("image", None), ("text", "Compare with"), ("image", None), ("text", "please.")]
    assert inter[1]["content"][2]["image"] is b
    extra = adapter.to_messages("<image> one", [a, b])  # more images than placeholders: the rest go in front
    assert [p["type"] for p in extra[0]["content"]] == ["image", "image", "text"]
    assert extra[0]["content"][0]["image"] is b and extra[0]["content"][1]["image"] is a


def test_decode_options_and_until():
    base = DecodeConfig(steps=2, block_size=4, temperature=0.5)
    cfg, until = adapter.decode_options({"max_new_tokens": 7, "temperature": 0, "until": "\n\n", "top_p": None,
                                         "num_beams": 1, "image_aspect_ratio": "pad"}, base)
    assert (cfg.max_new_tokens, cfg.temperature, cfg.steps, until) == (7, 0.0, 2, ["\n\n"])
    cfg, until = adapter.decode_options({"do_sample": False, "temperature": 0.7}, base)
    assert cfg.temperature == 0.0 and until == []
    assert adapter.decode_options({}, base)[0].temperature == 0.5  # unset: keep the model_args value
    with pytest.raises(DiffusionVLError, match="beam search"):
        adapter.decode_options({"num_beams": 4}, base)
    assert adapter.cut_until("Paris.\n\nNext question", ["\n\n", "Q:"]) == "Paris."
    with pytest.raises(DiffusionVLError, match="only still images"):
        adapter.flatten_visuals(["video.mp4"])


def test_generate_until_equals_generate_in_request_order():
    model = tiny_diffusion("qwen2_5_vl", block_size=4)
    docs = {"t": {"test": {i: {"image": red_square(color=c)} for i, c in enumerate(["red", "blue", "green"])}}}
    greedy8 = {"max_new_tokens": 8, "temperature": 0}
    short = {"max_new_tokens": 5, "until": ["zzz"]}
    requests = [_request("<image>\nWhat colour?", greedy8, 0), _request("Name the shape.", short, 1),
                _request("What colour is it?", greedy8, 2), _request("Say hello.", short, 0, visual=False)]
    runner = adapter.GenerationRunner(model, DecodeConfig(steps=2), batch_size=2)
    got = runner.generate_until(requests, docs)
    for req, text in zip(requests, got):
        context, kwargs, doc_to_visual, doc_id = req.args[:4]
        images = [docs["t"]["test"][doc_id]["image"]] if doc_to_visual else []
        cfg, until = adapter.decode_options(kwargs, DecodeConfig(steps=2))
        ref = model.generate(adapter.to_messages(context, images), config=cfg).texts[0]
        assert text == adapter.cut_until(ref, until)


def test_loglikelihood_is_the_nelbo_as_a_loss():
    """lmms-eval 0.7.x picks a choice by argmin: the score is the NELBO (nats, summed), lower is better."""
    from diffusionvl.jobs.evaluation.elbo import encode_scored, nelbo, noise_levels
    from diffusionvl.jobs.evaluation.tasks import Sample

    model = tiny_diffusion("llama", block_size=4)
    runner = adapter.GenerationRunner(model, elbo_levels=2)
    requests = [SimpleNamespace(args=("Is the sky blue?", " Yes", None, 0, "t", "test")),
                SimpleNamespace(args=("Is the sky blue?", lambda doc: doc["target"], None, 0, "t", "test"))]
    out = runner.loglikelihood(requests, {"t": {"test": {0: {"target": " Yes"}}}})
    import torch

    batch = encode_scored(model, [Sample(0, "0", "Is the sky blue?", [" Yes"])], include_end=False)
    total, _ = nelbo(model, batch, noise_levels(2), torch.Generator().manual_seed(0))
    assert out[0][0] == pytest.approx(float(total[0])) and out[0][0] > 0
    assert out[1] == out[0] and isinstance(out[0][1], bool)  # same request, same score (seeded per request)
    with pytest.raises(DiffusionVLError, match="acc_mutual_info"):  # its context-free requests have 2 args
        runner.loglikelihood([SimpleNamespace(args=("", "Yes"))], {})


def test_is_greedy_means_greedy_decoding_produces_the_continuation():
    model = tiny_diffusion("llama", block_size=4)
    decode = DecodeConfig(steps=2, temperature=0.0)
    runner = adapter.GenerationRunner(model, decode)
    prompt = "Say hello."
    own = None
    for n in range(6, 0, -1):  # the longest greedy answer whose text re-tokenizes to the tokens greedy chose
        out = model.generate(prompt, config=dataclasses.replace(decode, max_new_tokens=n))
        if model.tokenizer(out.texts[0], add_special_tokens=False)["input_ids"] == out.token_ids[0]:
            own = out.texts[0]
            break
    assert own
    long = " ".join(["a seventeenth-century nautical chart of the Baltic coast"] * 2)
    out = runner.loglikelihood([SimpleNamespace(args=(prompt, own, None, 0, "t", "test")),
                                SimpleNamespace(args=(prompt, long, None, 0, "t", "test"))], {})
    assert out[0][1] is True and out[1][1] is False
    assert out[0][0] < out[1][0]  # the model's own answer has the better (lower) bound


def test_registered_with_lmms_eval_when_installed(tmp_path):
    pytest.importorskip("lmms_eval")
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    for manifest in adapter.manifests():
        registry.register_manifest(manifest)
    cls = registry.get_model_class("diffusionvl")
    assert cls is adapter.DiffusionVLLmms and cls.is_simple
    model = tiny_diffusion("llama", block_size=4)
    model.save_pretrained(tmp_path / "tiny")
    lm = cls.create_from_arg_string(f"pretrained={tmp_path / 'tiny'},steps=2,max_new_tokens=6",
                                    {"batch_size": 2, "device": "cpu"})
    lm.task_dict = {"t": {"test": {0: {}}}}
    meta = {"task": "t", "doc_id": 0, "repeats": 1}
    reqs = [Instance("generate_until", ("Say hello.", {"until": ["zzz"]}, lambda doc: [], 0, "t", "test"), 0, meta)]
    ref = model.generate([{"role": "user", "content": "Say hello."}], steps=2, max_new_tokens=6).texts[0]
    assert lm.generate_until(reqs) == [ref]
