"""Evaluation: scoring functions, task loading and its errors, data-parallel split/gather, the generation tasks end to
end on tiny models (valid JSON + Markdown, accuracy from the real predictions), and the NELBO (B = 1 at t = 1 equals
the AR cross entropy)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_diffusion
from diffusionvl.cli import main
from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.evaluation import scoring
from diffusionvl.jobs.evaluation.elbo import encode_scored, nelbo, noise_levels
from diffusionvl.jobs.evaluation.report import markdown, write_results
from diffusionvl.jobs.evaluation.runner import EvalConfig, evaluate, load_samples, run_generate
from diffusionvl.jobs.evaluation.tasks import Sample, get_task, merge_shards, shard


# ---- scoring ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred,answers,expected", [
    ("Red.", ["red"], 1.0),
    ("The answer is: two", ["2", "two"], 1.0),
    ("a Circle", ["circle"], 1.0),
    ("1,000", ["1000"], 1.0),
    ("3.5", ["35"], 0.0),
    ("It is red", ["red"], 0.0),
    ("", ["red"], 0.0),
])
def test_exact_match(pred, answers, expected):
    assert scoring.exact_match(pred, answers) == expected


def test_contains_match_is_whole_word():
    assert scoring.contains_match("It is a red circle.", ["red"]) == 1.0
    assert scoring.contains_match("It is reddish.", ["red"]) == 0.0


@pytest.mark.parametrize("pred,letter", [
    ("B", "B"), ("(C)", "C"), ("A. cat", "A"), ("The answer is B.", "B"), ("Answer: (D)", "D"),
    ("option C", "C"), ("dog", "B"), ("I like it", None), ("A.M. is early", None), ("answer is a cat", "A"),
    ("E", None),
])
def test_extract_choice(pred, letter):
    assert scoring.extract_choice(pred, ["cat", "dog", "red", "blue"]) == letter


def test_choice_match_accepts_letters_or_option_text():
    choices = ["cat", "dog", "bird"]
    assert scoring.choice_match("(B)", ["B"], choices) == 1.0
    assert scoring.choice_match("B", ["dog"], choices) == 1.0
    assert scoring.choice_match("A", ["B"], choices) == 0.0
    assert scoring.choice_match("no idea", ["B"], choices) == 0.0


def test_anls_and_levenshtein():
    assert scoring.levenshtein("kitten", "sitting") == 3 and scoring.levenshtein("", "abc") == 3
    assert scoring.anls("Paris", ["paris"]) == 1.0
    assert scoring.anls("pariss", ["paris"]) == pytest.approx(1 - 1 / 6)
    assert scoring.anls("london", ["paris"]) == 0.0  # distance ratio above the 0.5 threshold
    assert scoring.anls("parsi", ["rome", "paris"]) == pytest.approx(1 - 2 / 5)


# ---- tasks --------------------------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_loader_metrics_and_errors(tmp_path):
    from conftest import red_square

    red_square().save(tmp_path / "a.png")
    file = _write_jsonl(tmp_path / "t.jsonl", [
        {"question": "What?", "answers": ["x"], "image": "a.png"},
        {"question": "Pick", "answer": "B", "choices": ["p", "q"], "type": "mc"},
        {"question": "Read", "answers": ["abc"], "metric": "anls"},
    ])
    samples = get_task("jsonl").load(str(file), None, None)
    assert [s.metric for s in samples] == ["exact", "choice", "anls"]
    assert samples[0].image == str((tmp_path / "a.png").resolve()) and samples[1].type == "mc"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answers": ["a"]}\n{oops\n')
    with pytest.raises(DiffusionVLError, match=r"bad.jsonl:2: malformed JSON"):
        get_task("jsonl").load(str(bad), None, None)
    _write_jsonl(bad, [{"question": "q", "answers": ["a"], "image": "missing.png"}])
    with pytest.raises(DiffusionVLError, match="image file not found"):
        get_task("jsonl").load(str(bad), None, None)
    _write_jsonl(bad, [{"question": "q"}])
    with pytest.raises(DiffusionVLError, match="missing 'answers'"):
        get_task("jsonl").load(str(bad), None, None)
    with pytest.raises(DiffusionVLError, match="unknown task"):
        get_task("mme")


def test_shard_and_merge_cover_every_sample_once():
    samples = [Sample(i, str(i), "q", ["a"]) for i in range(10)]
    parts = [[{"index": s.index} for s in shard(samples, r, 3)] for r in range(3)]
    assert sorted(len(p) for p in parts) == [3, 3, 4]
    assert [r["index"] for r in merge_shards(parts[::-1])] == list(range(10))
    with pytest.raises(RuntimeError, match="twice"):
        merge_shards([parts[0], parts[0]])


# ---- generation tasks end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_diffusion("llama", block_size=4)


QUESTIONS = ["What is the capital of France?", "Name a colour.", "Count to three.", "Yes or no?", "Say hello.",
             "Describe a cat."]


def test_data_parallel_shards_give_the_single_process_result(llama, tmp_path):
    rows = [{"question": q, "answers": ["x"], "type": "t" + str(i % 2)} for i, q in enumerate(QUESTIONS)]
    cfg = EvalConfig(task="jsonl", data=str(_write_jsonl(tmp_path / "q.jsonl", rows)), batch_size=2)
    task, samples = load_samples(cfg)
    decode = DecodeConfig(max_new_tokens=6).resolved(4)
    single, records = evaluate(llama, samples, task, cfg, decode, progress=False)
    others = {r: run_generate(llama, shard(samples, r, 3), task.prompt_suffix, cfg, decode, False) for r in (1, 2)}

    def gather(obj):  # what accelerate's gather_object returns on rank 0 of 3 processes
        return [obj] + [others[r][0 if isinstance(obj, list) else 1] for r in (1, 2)]

    split, split_records = evaluate(llama, samples, task, cfg, decode, rank=0, world=3, gather=gather, progress=False)
    assert [r["prediction"] for r in split_records] == [r["prediction"] for r in records]
    assert [r["index"] for r in split_records] == list(range(len(QUESTIONS)))
    assert split["speed"]["tokens"] == single["speed"]["tokens"] and split["processes"] == 3

    from accelerate import PartialState
    from accelerate.utils import gather_object

    assert PartialState().num_processes == 1
    accel, accel_records = evaluate(llama, samples, task, cfg, decode, gather=lambda o: gather_object([o]),
                                    progress=False)
    assert accel_records == records


def test_jsonl_cli_end_to_end_scores_real_predictions(llama, tmp_path):
    model_dir = tmp_path / "tiny"
    llama.save_pretrained(model_dir)
    preds = llama.generate([[{"role": "user", "content": q + "\nAnswer the question using a single word or phrase."}]
                            for q in QUESTIONS], max_new_tokens=8).texts
    rows = [{"id": f"s{i}", "question": q, "answers": [preds[i] if i < 2 else "zebra"], "type": "hit" if i < 2 else
             "miss"} for i, q in enumerate(QUESTIONS)]
    rows.append({"question": "Pick one.", "answers": ["A"], "choices": ["cat", "dog"], "type": "mc"})
    data = _write_jsonl(tmp_path / "qa.jsonl", rows)
    out = tmp_path / "out"
    assert main(["eval", "--model", str(model_dir), "--task", "jsonl", "--data", str(data), "--out", str(out),
                 "--max-new-tokens", "8", "--batch-size", "3", "--no-progress"]) == 0
    summary = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 7 and [s["prediction"] for s in samples[:6]] == preds
    assert summary["per_type"]["hit"]["accuracy"] == 1.0 and summary["per_type"]["miss"]["accuracy"] == 0.0
    mc = samples[6]
    assert mc["metric"] == "choice" and mc["score"] == scoring.choice_match(mc["prediction"], ["A"], ["cat", "dog"])
    assert summary["accuracy"] == pytest.approx((2 + mc["score"]) / 7)
    assert summary["speed"]["tokens_per_forward"] > 0 and summary["speed"]["tokens_per_second"] > 0
    assert summary["speed"]["tokens_per_forward"] == pytest.approx(sum(s["tokens_per_forward"] for s in samples) / 7)
    assert summary["decoding"]["block_size"] == 4 and summary["decoding"]["max_new_tokens"] == 8
    md = (out / "results.md").read_text()
    assert "| jsonl | 7 |" in md and "tokens/forward" in md and "| hit | 2 | 100.0% |" in md
    assert summary["description"] is None and "Description" not in (out / "results.md").read_text()


def test_tokens_per_forward_of_one_batch_is_the_decoders(llama, tmp_path):
    """Per sample: tokens up to and including the stop token / that sample's forwards, averaged over samples."""
    rows = [{"question": q, "answers": ["x"]} for q in QUESTIONS]
    cfg = EvalConfig(task="jsonl", data=str(_write_jsonl(tmp_path / "q.jsonl", rows)), batch_size=len(QUESTIONS))
    task, samples = load_samples(cfg)
    decode = DecodeConfig(max_new_tokens=6)
    summary, records = evaluate(llama, samples, task, cfg, decode, progress=False)
    prompts = [[{"role": "user", "content": q + task.prompt_suffix}] for q in QUESTIONS]
    stats = llama.generate(prompts, config=decode.resolved(4)).stats
    assert summary["speed"]["tokens_per_forward"] == pytest.approx(stats["tokens_per_forward"])
    forwards = stats.get("forwards_per_sample") or [stats["forwards"]] * len(records)  # per batch: older decoders
    assert [r["tokens_per_forward"] for r in records] == pytest.approx(
        [(r["tokens"] + (r["finish_reason"] == "stop")) / f for r, f in zip(records, forwards)])


def test_synth_vqa_task_on_a_tiny_vlm(tmp_path):
    data = tmp_path / "synth"
    assert main(["data", "--out", str(data), "--n-train", "2", "--n-val", "1", "--n-test", "8", "--image-size", "64",
                 "--no-progress"]) == 0
    model = tiny_diffusion("qwen2_5_vl", block_size=4)
    cfg = EvalConfig(task="synth-vqa", data=str(data), limit=6, batch_size=4)
    task, samples = load_samples(cfg)
    assert len(samples) == 6 and any(s.image for s in samples)
    summary, records = evaluate(model, samples, task, cfg, DecodeConfig(max_new_tokens=6), progress=False)
    paths = write_results(tmp_path / "out", summary, records)
    loaded = json.loads(paths["json"].read_text())
    assert loaded["task"] == "synth-vqa" and loaded["samples"] == 6
    assert set(loaded["per_type"]) == {s.type for s in samples}
    assert all(r["score"] == scoring.exact_match(r["prediction"], r["answers"]) for r in records)
    assert markdown(loaded).startswith("# diffusionvl eval: synth-vqa")


# ---- ELBO ----------------------------------------------------------------------------------------------------------
def _ar_cross_entropy(dm, batch):
    logits = dm.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels, ignore_index=-100, reduction="none")
    return ce.sum(1), (labels != -100).sum(1)


def test_nelbo_at_t1_with_block_size_1_is_the_ar_cross_entropy():
    dm = tiny_diffusion("llama", block_size=1)
    texts = [Sample(0, "a", "", [], text="The quick brown fox jumps over the lazy dog."),
             Sample(1, "b", "", [], text="Hello, how can I help you today?")]
    answers = [Sample(0, "c", "What is the capital of France?", ["Paris."]),
               Sample(1, "d", "Name a colour.", ["Red, like a ripe tomato."])]
    for samples in (texts, answers):
        batch = encode_scored(dm, samples)
        total, count = nelbo(dm, batch, [1.0])
        ref_total, ref_count = _ar_cross_entropy(dm, batch)
        assert count.tolist() == ref_count.tolist()
        torch.testing.assert_close(total.float(), ref_total.detach().float(), rtol=1e-4, atol=1e-4)
    assert (batch["labels"][1] != -100).sum() < batch["attention_mask"][1].sum()  # the prompt is not scored


def test_elbo_task_writes_nelbo_and_perplexity_bound(llama, tmp_path):
    data = _write_jsonl(tmp_path / "text.jsonl", [{"text": "The quick brown fox."},
                                                 {"question": "Name a colour.", "answer": "Red.", "type": "qa"}])
    cfg = EvalConfig(task="elbo", data=str(data), noise_levels=4)
    task, samples = load_samples(cfg)
    summary, records = evaluate(llama, samples, task, cfg, DecodeConfig(), progress=False)
    again, _ = evaluate(llama, samples, task, cfg, DecodeConfig(), progress=False)
    assert again["nelbo_per_token"] == summary["nelbo_per_token"]  # seeded masks: reproducible
    assert summary["scored_tokens"] == sum(r["tokens"] for r in records) > 0
    assert summary["perplexity_bound"] == pytest.approx(torch.tensor(summary["nelbo_per_token"]).exp().item())
    assert set(summary["per_type"]) == {"all", "qa"} and noise_levels(4) == [0.125, 0.375, 0.625, 0.875]
    md = markdown(summary)
    assert "NELBO/token" in md and "perplexity bound" in md
