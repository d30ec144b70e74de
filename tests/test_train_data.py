"""Training data: file formats, bad-sample handling, labels on exactly the assistant tokens, length policy, collator."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import red_square, tiny_diffusion
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train.collator import Collator
from diffusionvl.jobs.train.data import SFTDataset, read_records, split_records
from diffusionvl.jobs.train.encode import SampleEncoder

MULTI_TURN = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Say hello."},
              {"from": "gpt", "value": "Hello, how can I help you today?"},
              {"from": "human", "value": "What is the capital of France?"},
              {"from": "gpt", "value": "The capital of France is Paris."}]


@pytest.fixture(scope="module")
def llama():
    return tiny_diffusion("llama", block_size=4)


@pytest.fixture(scope="module")
def qwen_vl():
    return tiny_diffusion("qwen2_5_vl", block_size=4)


def _write_jsonl(path, items):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in items))
    return path


def _label_runs(ids, labels):
    """Contiguous runs of loss tokens -> list of token lists."""
    runs, cur = [], []
    for i, lab in zip(ids.tolist(), labels.tolist()):
        if lab != -100:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _strip_block_padding(dm, ids, labels):
    """The sample without its block-aligned EOS padding (the trailing EOS run beyond the first)."""
    n = len(ids)
    while n > 1 and ids[n - 1] == dm.eos_token_id and ids[n - 2] == dm.eos_token_id:
        n -= 1
    return ids[:n], labels[:n]


def test_labels_are_exactly_the_assistant_turns_multi_turn(llama, tmp_path):
    records, report = read_records(_write_jsonl(tmp_path / "d.jsonl", [{"conversations": MULTI_TURN}]),
                                   has_vision=False)
    assert report.kept == 1
    sample = SampleEncoder(llama, max_length=512)(records[0])
    tok = llama.tokenizer
    ids, labels = _strip_block_padding(llama, sample.input_ids, sample.labels)
    runs = [tok.decode(r) for r in _label_runs(ids, labels)]
    assert runs == ["Hello, how can I help you today?<|im_end|>", "The capital of France is Paris.<|im_end|>"]
    # the input is the model's own chat template up to the final end-of-turn token (no trailing "\n")
    full = llama.adapter.render(_conv(records[0]), add_generation_prompt=False)
    assert tok.decode(ids) == full[: full.rindex("<|im_end|>") + len("<|im_end|>")]
    # block-aligned EOS: length a multiple of B, the padding is EOS as input and as label
    assert len(sample.input_ids) % 4 == 0
    pad = sample.labels[len(ids):]
    assert torch.all(pad == llama.eos_token_id) and torch.all(sample.input_ids[len(ids):] == llama.eos_token_id)


def _conv(record):
    from diffusionvl.backbone.prompts import to_conversation

    return to_conversation(record.messages, record.images or None)


def test_vlm_image_markers_tokens_and_labels(qwen_vl, tmp_path):
    red_square().save(tmp_path / "red.png")
    item = {"image": "red.png", "conversations": [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                                                  {"from": "gpt", "value": "Red."}]}
    records, _ = read_records(_write_jsonl(tmp_path / "d.jsonl", [item]))
    assert [p["type"] for p in records[0].messages[0]["content"]] == ["image", "text"]
    assert records[0].messages[0]["content"][1]["text"] == "What colour is the square?"  # marker newline dropped
    sample = SampleEncoder(qwen_vl, max_length=512)(records[0])
    ids, labels = _strip_block_padding(qwen_vl, sample.input_ids, sample.labels)
    assert [qwen_vl.tokenizer.decode(r) for r in _label_runs(ids, labels)] == ["Red.<|im_end|>"]
    image_id = qwen_vl.adapter.image_token_id
    n_image_tokens = int((sample.input_ids == image_id).sum())
    grid = sample.vision["image_grid_thw"]
    assert n_image_tokens == int(grid.prod()) // 4 > 0  # the processor expanded the placeholder (merge 2x2)
    assert torch.all(sample.labels[sample.input_ids == image_id] == -100)
    # same ids as inference-time tokenization of the same text through the adapter
    conv = _conv(records[0])
    text = qwen_vl.adapter.render(conv, False)
    ref = qwen_vl.adapter.tokenize([text[: text.rindex("<|im_end|>") + 10]], [conv.images]).input_ids[0]
    assert ids.tolist() == ref


def test_openai_messages_and_text_only_mixed_in(qwen_vl, tmp_path):
    red_square().save(tmp_path / "red.png")
    items = [
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}},
                                                   {"type": "text", "text": "Describe it."}]},
                      {"role": "assistant", "content": "A red square."}]},
        {"messages": [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello."}]},
        {"images": ["red.png"], "messages": [{"role": "user", "content": "Look: <image> what is it?"},
                                             {"role": "assistant", "content": "A square."}]},
    ]
    records, report = read_records(_write_jsonl(tmp_path / "d.jsonl", items))
    assert report.kept == 3 and [len(r.images) for r in records] == [1, 0, 1]
    assert [p["type"] for p in records[2].messages[0]["content"]] == ["text", "image", "text"]
    enc = SampleEncoder(qwen_vl, max_length=512)
    samples = [enc(r) for r in records]
    assert not samples[1].vision and samples[0].vision and samples[2].vision
    batch = Collator(qwen_vl.pad_token_id, 4, qwen_vl.adapter)(
        [{"sample": s, "index": i, "position": i, "skipped": []} for i, s in enumerate(samples)])
    assert [g.shape[0] for g in batch["image_grid_thw_per_sample"]] == [1, 0, 1]
    # collator positions (M-RoPE) == what the model computes itself
    valid = batch["attention_mask"].bool()
    vision = {k: batch[k] for k in ("pixel_values", "image_grid_thw", "image_grid_thw_per_sample")}
    assert torch.equal(batch["position_ids"], qwen_vl.positions_for(batch["input_ids"], valid, vision))
    with torch.no_grad():
        out = qwen_vl.training_loss({k: v for k, v in batch.items() if k != "meta"}, torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)


def test_llava_json_list_and_image_folder(qwen_vl, tmp_path):
    (tmp_path / "imgs").mkdir()
    red_square().save(tmp_path / "imgs" / "a.png")
    data = [{"image": "a.png", "conversations": [{"from": "human", "value": "What is it?"},
                                                 {"from": "gpt", "value": "A square."}]}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data, indent=1))
    records, report = read_records(path, image_folder=tmp_path / "imgs")
    assert report.kept == 1 and records[0].images == [str(tmp_path / "imgs" / "a.png")]
    assert records[0].messages[0]["content"][0] == {"type": "image"}  # no marker: image goes first


def test_bad_samples_are_counted_and_skipped(qwen_vl, tmp_path):
    red_square().save(tmp_path / "ok.png")
    red_square((2000, 8)).save(tmp_path / "sliver.png")  # an aspect ratio no processor can take
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    for name in ("late1.png", "late2.png"):  # fine when the data is read, damaged before training reads them
        red_square().save(tmp_path / name)
    ok = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}

    def with_image(name):
        return {"image": name, "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}

    lines = [
        ok,
        "{not json",
        {"image": "missing.png", "conversations": [{"from": "human", "value": "<image>"},
                                                   {"from": "gpt", "value": "x"}]},
        {"conversations": [{"from": "human", "value": "Only a question"}]},
        {"conversations": [{"from": "robot", "value": "?"}, {"from": "gpt", "value": "x"}]},
        {"image": ["ok.png", "ok.png"], "conversations": [{"from": "human", "value": "<image> one marker"},
                                                          {"from": "gpt", "value": "x"}]},
        {"image": "https://example.com/a.png", "conversations": [{"from": "human", "value": "q"},
                                                                 {"from": "gpt", "value": "a"}]},
        [1, 2],
        with_image("corrupt.png"),
        with_image("sliver.png"),
        with_image("late1.png"),
        with_image("late2.png"),
        ok,
    ]
    records, report = read_records(_write_jsonl(tmp_path / "d.jsonl", lines))
    assert report.total == 13 and report.kept == 4
    assert dict(report.skipped) == {"bad JSON line": 1, "missing image": 1, "no assistant turn": 1,
                                    "unknown role": 1, "image count mismatch": 1, "remote image": 1,
                                    "not an object": 1, "bad image": 2}  # corrupt and sliver: caught up front
    assert len(report.examples) == 5 and report.examples[0].startswith("d.jsonl:2: bad JSON line")
    (tmp_path / "late1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    red_square((2000, 8)).save(tmp_path / "late2.png")
    # an image damaged after the check is found when decoding: the dataset moves on to the next sample,
    # deterministically
    ds = SFTDataset(records, SampleEncoder(qwen_vl, max_length=256))
    item = ds[(1, 7)]
    assert item["index"] == 3 and item["position"] == 7
    assert [i for i, _ in item["skipped"]] == [1, 2] and "late1.png" in item["skipped"][0][1]
    assert ds[(1, 0)]["index"] == 3  # same answer the second time
    assert ds[(2, 0)]["index"] == 3 and "aspect ratio" in ds[(2, 0)]["skipped"][0][1]  # refused by the loader


def test_text_model_skips_image_samples_and_errors_are_one_line(llama, tmp_path):
    red_square().save(tmp_path / "a.png")
    items = [{"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"},
                                                  {"from": "gpt", "value": "a"}]},
             {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]
    records, report = read_records(_write_jsonl(tmp_path / "d.jsonl", items), has_vision=False)
    assert report.kept == 1 and report.skipped["images for a text-only model"] == 1
    with pytest.raises(DiffusionVLError, match="data file not found"):
        read_records(tmp_path / "nope.jsonl")
    (tmp_path / "broken.json").write_text('[{"conversations": []},')
    with pytest.raises(DiffusionVLError, match="not valid JSON"):
        read_records(tmp_path / "broken.json")
    with pytest.raises(DiffusionVLError, match="no usable training samples"):
        SFTDataset([], None)


@pytest.mark.parametrize("policy", ["truncate", "skip"])
def test_max_length_policy(llama, tmp_path, policy):
    long_answer = " ".join(["one two three four five six seven eight nine ten"] * 6)
    items = [{"conversations": [{"from": "human", "value": "Count."}, {"from": "gpt", "value": long_answer}]},
             {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}]
    records, _ = read_records(_write_jsonl(tmp_path / "d.jsonl", items), has_vision=False)
    enc = SampleEncoder(llama, max_length=30, overlong=policy)  # -> 28, a multiple of B = 4
    ds = SFTDataset(records, enc)
    item = ds[(0, 0)]
    if policy == "truncate":
        s = item["sample"]
        assert item["index"] == 0 and s.truncated and len(s.input_ids) == 28
        assert (s.labels != -100).any() and s.labels[-1] != llama.eos_token_id  # a cut answer gets no EOS
    else:
        assert item["index"] == 1 and "too long" in item["skipped"][0][1]
    assert len(ds[(1, 0)]["sample"].input_ids) <= 28


def test_truncation_never_cuts_an_image(qwen_vl, tmp_path):
    red_square((112, 112)).save(tmp_path / "big.png")
    item = {"image": "big.png", "conversations": [{"from": "human", "value": "Hello there, what is in this? <image>"},
                                                  {"from": "gpt", "value": "A red square on white."}]}
    records, _ = read_records(_write_jsonl(tmp_path / "d.jsonl", [item]))
    from diffusionvl.jobs.train.data import SampleError

    with pytest.raises(SampleError, match="would cut an image"):
        SampleEncoder(qwen_vl, max_length=16)(records[0])


def test_split_records_is_deterministic_and_disjoint(tmp_path):
    items = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}
             for i in range(20)]
    records, _ = read_records(_write_jsonl(tmp_path / "d.jsonl", items), has_vision=False)
    train_a, held_a = split_records(records, 0.25, seed=3)
    train_b, held_b = split_records(records, 0.25, seed=3)
    assert len(held_a) == 5 and len(train_a) == 15
    assert [r.where for r in held_a] == [r.where for r in held_b]
    assert not {r.where for r in held_a} & {r.where for r in train_a}
    assert len(split_records(records, 3, seed=0)[1]) == 3


def test_truncated_and_missing_images_are_caught_before_training_and_named_with_their_ids(tmp_path):
    red_square().save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    items = [{"id": "good", "image": "ok.png", "conversations": conv},
             {"id": "s-cut", "image": "cut.png", "conversations": conv},
             {"id": "s-missing", "image": "missing.png", "conversations": conv}]
    records, report = read_records(_write_jsonl(tmp_path / "d.jsonl", items))
    assert report.kept == 1 and report.skipped == {"bad image": 1, "missing image": 1}
    assert any("(id s-cut)" in e and "truncated" in e for e in report.examples)
    assert any("(id s-missing)" in e for e in report.examples)


def test_training_on_only_bad_images_is_one_line_naming_the_sample(tmp_path, capsys):
    from diffusionvl.cli import main

    red_square().save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": "s-cut", "image": "cut.png", "conversations": conv}])
    model = tmp_path / "vl"
    assert main(["convert", "--tiny", "qwen2_5_vl", str(model)]) == 0
    capsys.readouterr()
    assert main(["train", "--model", str(model), "--data", str(path), "--output", str(tmp_path / "out"),
                 "--max-steps", "1", "--batch-size", "1", "--progress", "false"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: no usable training samples") and "(id s-cut)" in err


def test_a_byte_order_mark_is_not_data(tmp_path):
    """Windows editors save UTF-8 with a BOM: the JSON list and every JSONL line still read (it was 'bad JSON')."""
    sample = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "d.json").write_text(json.dumps([sample, sample]), encoding="utf-8-sig")
    (tmp_path / "d.jsonl").write_text(json.dumps(sample) + "\n" + json.dumps(sample) + "\n", encoding="utf-8-sig")
    for name in ("d.json", "d.jsonl"):
        records, report = read_records(tmp_path / name, has_vision=False)
        assert len(records) == 2 and report.kept == 2, report.summary()


def test_an_answer_without_a_question_and_a_broken_data_url_are_skipped_up_front(tmp_path):
    """Both used to pass the data check ('2 of 2 usable') and fail at the first training step."""
    import base64
    import io

    buf = io.BytesIO()
    red_square().save(buf, format="PNG")
    good_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    turns = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]
    items = [{"id": "ok", "image": good_url, "conversations": turns},
             {"id": "answer-only", "conversations": [{"from": "gpt", "value": "a"}]},
             {"id": "bad-b64", "image": "data:image/png;base64,@@@@", "conversations": turns},
             {"id": "not-image", "image": "data:image/png;base64," + base64.b64encode(b"text").decode(),
              "conversations": turns}]
    (tmp_path / "d.json").write_text(json.dumps(items))
    records, report = read_records(tmp_path / "d.json")
    assert [r.where.split("(id ")[1].rstrip(")") for r in records] == ["ok"]
    summary = report.summary()
    assert "no question: 1" in summary and "bad image: 2" in summary, summary


def test_a_remembered_text_encoding_is_the_same_encoding(qwen_vl, tmp_path, monkeypatch):
    """Later epochs reuse a record's text encoding (encode.SampleEncoder._text): the sample equals a fresh
    encoder's, images are still read (another picture under the same name gives its own pixels), different messages
    never share an entry, and nothing is remembered beyond TEXT_MEMO_BYTES."""
    from diffusionvl.jobs.train import encode

    red_square().save(tmp_path / "a.png")
    items = [{"image": "a.png", "conversations": [{"from": "human", "value": f"<image>\nWhat is {w}?"},
                                                  {"from": "gpt", "value": w}]} for w in ("red", "blue")]
    records, _ = read_records(_write_jsonl(tmp_path / "d.jsonl", items))
    enc = SampleEncoder(qwen_vl, max_length=512)
    first = [enc(r) for r in records]
    red_square(color="blue").save(tmp_path / "a.png")

    def no_render(*args, **kwargs):
        raise AssertionError("the text encoding was rendered again instead of being remembered")

    monkeypatch.setattr(enc, "render", no_render)
    again = [enc(r) for r in records]
    monkeypatch.undo()
    fresh = [SampleEncoder(qwen_vl, max_length=512)(r) for r in records]
    assert len(enc._memo) == 2 and 0 < enc._memo_bytes
    for a, b, f in zip(first, again, fresh):
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(b.labels, f.labels)
        assert torch.equal(b.vision["pixel_values"], f.vision["pixel_values"])
        assert not torch.equal(a.vision["pixel_values"], b.vision["pixel_values"])
    assert not torch.equal(first[0].labels, first[1].labels)
    monkeypatch.setattr(encode, "TEXT_MEMO_BYTES", 0)
    bounded = SampleEncoder(qwen_vl, max_length=512)
    assert torch.equal(bounded(records[0]).input_ids, first[0].input_ids) and not bounded._memo
