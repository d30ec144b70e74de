"""Scene descriptions ("Describe the image."): the describe / parse / F1 contract, the generator's multi-turn
samples that carry them, and how `diffusionvl eval --task synth-vqa` scores them (object-level F1, kept out of
accuracy)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.data.describe import (
    REGION_TOLERANCE,
    REGIONS,
    describe,
    description_f1,
    mean_f1,
    parse_description,
    region,
)
from diffusionvl.data.questions import DEFAULT_TYPES, QUESTION_TYPES
from diffusionvl.data.scene import Scene, SceneObject, sample_scene
from diffusionvl.data.synth import eval_record, generate_dataset, make_plan, make_sample
from diffusionvl.decoding import GenerationOutput
from diffusionvl.jobs.evaluation import scoring
from diffusionvl.jobs.evaluation.report import markdown
from diffusionvl.jobs.evaluation.runner import EvalConfig, evaluate, load_samples, sample_forwards, tokens_per_forward


def _scene(*objects: tuple[str, str, int, int], size: int = 90) -> Scene:
    """A scene of (shape, colour, x, y) objects (radius 5) on a plain background."""
    return Scene(size, "white", "plain", 0, tuple(SceneObject(s, c, x, y, 5) for s, c, x, y in objects))


THREE = _scene(("circle", "red", 15, 15), ("square", "blue", 45, 45), ("star", "green", 75, 75))


# ---------------------------------------------------------------------------------------------- describe / parse / F1


def test_describe_reads_back_exactly_on_many_random_scenes():
    for i in range(400):
        rng = random.Random(i)
        scene = sample_scene(rng, rng.choice((64, 96, 224)), repeat_probability=rng.choice((0.0, 0.6, 1.0)))
        text = describe(scene)
        assert text[0].isupper() and text.endswith(".") and "\n" not in text
        assert sorted(parse_description(text)) == sorted((o.colour, o.shape, region(o, scene.size))
                                                         for o in scene.objects)
        n = len(scene.objects)
        assert description_f1(text, scene) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "predicted": n,
                                               "objects": n, "matched": n}, (text, scene)
        assert description_f1(text, scene.to_dict())["f1"] == 1.0  # the eval file stores the Scene dict


def test_describe_format_names_objects_left_to_right():
    assert describe(THREE) == ("A red circle at the top left, a blue square at the centre and a green star at the "
                               "bottom right.")
    assert describe(_scene(("cross", "orange", 80, 45))) == "An orange cross at the right."
    assert set(REGIONS) == {"top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom",
                            "bottom right"}


@pytest.mark.parametrize("text, precision, recall", [
    ("A red circle at the top left, a blue square at the centre and a yellow star at the bottom right.", 2 / 3, 2 / 3),
    ("A red circle at the top left and a blue square at the centre.", 1.0, 2 / 3),  # an object left out
    ("A red circle at the top left, a blue square at the centre, a green star at the bottom right and a cyan "
     "cross at the top.", 3 / 4, 1.0),  # an object that is not there
    ("A red circle at the top left, a blue square at the centre and a green star at the top right.", 2 / 3, 2 / 3),
    ("A red circle at the top left, a red circle at the top left and a red circle at the top left.", 1 / 3, 1 / 3),
])
def test_mistakes_lower_precision_and_recall(text, precision, recall):
    scores = description_f1(text, THREE)
    assert scores["precision"] == pytest.approx(precision) and scores["recall"] == pytest.approx(recall)
    assert scores["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_region_tolerance_near_a_third_line():
    assert REGION_TOLERANCE * 90 == pytest.approx(3.6)  # third lines of a 90 px image at 30 and 60
    near = _scene(("circle", "red", 32, 15))  # in the top-middle cell, 2 px right of the line x = 30
    far = _scene(("circle", "red", 36, 15))  # 6 px right of it: beyond the tolerance
    assert describe(near) == describe(far) == "A red circle at the top."
    assert description_f1("A red circle at the top left.", near)["f1"] == 1.0
    assert description_f1("A red circle at the top left.", far)["f1"] == 0.0
    assert description_f1("A red circle at the top right.", near)["f1"] == 0.0
    on_both = _scene(("circle", "red", 30, 60))  # on both lines: every touching cell counts
    for where in ("left", "centre", "bottom left", "bottom"):
        assert description_f1(f"A red circle at the {where}.", on_both)["f1"] == 1.0, where
    assert description_f1("A red circle at the top.", on_both)["f1"] == 0.0


def test_matching_is_one_to_one_and_ignores_the_order_of_the_description():
    # A is in the centre cell but within the tolerance of "left"; B is plainly left. Matching "left" to A first
    # (scene order) must not cost the pair "centre" -> A.
    scene = _scene(("circle", "red", 32, 45), ("circle", "red", 10, 45))
    for text in ("A red circle at the left and a red circle at the centre.",
                 "A red circle at the centre and a red circle at the left."):
        assert description_f1(text, scene)["matched"] == 2, text
    assert description_f1("A red circle at the left and a red circle at the left.", scene)["matched"] == 2
    assert description_f1("A red circle at the centre and a red circle at the centre.", scene)["matched"] == 1


@pytest.mark.parametrize("text", ["", "   ", "asdf qwerty", "red circle top left", "A red blob at the top left.",
                                  "A pink circle at the top left.", "A red circle at the middle.",
                                  "A red circle, top left."])
def test_malformed_text_scores_zero(text):
    assert parse_description(text) == []
    assert description_f1(text, THREE) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "predicted": 0,
                                           "objects": 3, "matched": 0}


def test_readable_parts_of_a_noisy_answer_still_count():
    text = "Sure! I see... a red circle at the top left, uh, and A BLUE SQUARE IN THE CENTRE. Also a blob."
    assert parse_description(text) == [("red", "circle", "top left"), ("blue", "square", "centre")]
    assert description_f1(text, THREE)["matched"] == 2


def test_plurals_and_number_words_count_as_that_many_objects():
    assert parse_description("Two blue squares at the right.") == [("blue", "square", "right")] * 2
    assert parse_description("three red crosses at the top and one green star in the centre") == (
        [("red", "cross", "top")] * 3 + [("green", "star", "centre")])
    pair = _scene(("square", "blue", 75, 20), ("square", "blue", 75, 50))
    assert describe(pair) == "A blue square at the top right and a blue square at the right."
    assert description_f1("Two blue squares at the right.", pair)["matched"] == 1  # one is at the top right
    both_right = _scene(("square", "blue", 75, 40), ("square", "blue", 75, 55))
    assert description_f1("Two blue squares at the right.", both_right)["f1"] == 1.0
    one = _scene(("square", "blue", 75, 45))
    scores = description_f1("Two blue squares at the right.", one)
    assert (scores["precision"], scores["recall"]) == (0.5, 1.0)


def test_mean_f1_averages_each_score():
    rows = [description_f1(describe(THREE), THREE), description_f1("A red circle at the top left.", THREE)]
    means = mean_f1(rows)
    assert means["precision"] == 1.0 and means["recall"] == pytest.approx((1 + 1 / 3) / 2)
    assert means["f1"] == pytest.approx((1 + 0.5) / 2)
    assert mean_f1([]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# ---------------------------------------------------------------------------------------------- generator


MIX = {"shape": 1, "colour": 1, "count": 1, "position": 1, "relation": 1, "exist": 1, "describe": 1}


def test_multi_turn_samples_ask_distinct_questions_and_descriptions_stand_alone():
    """A description answers every other question about its image, so it is always a sample of its own; the other
    samples ask several distinct questions."""
    plan = make_plan(1, 96, MIX, 0.0, 0.0, multi_turn_fraction=1.0, questions_per_image=8)
    described = 0
    for index in range(40):
        sample = make_sample(plan, "train", index)
        keys = [(qa.type, qa.answer) for qa in sample.qas]
        assert 1 <= len(keys) <= 8 and len(set(keys)) == len(keys), keys
        scene = Scene.from_dict(sample.meta["scene"])
        if any(qa.type == "describe" for qa in sample.qas):
            described += 1
            assert len(keys) == 1 and sample.qas[0].answers == (describe(scene),)
        else:
            assert len(keys) > 2  # a scene supports several distinct questions
    assert described >= 5


def test_the_default_mix_never_asks_for_a_description():
    assert DEFAULT_TYPES == tuple(t for t in QUESTION_TYPES if t != "describe")
    plan = make_plan(2, 96, None, 0.0, 0.0, multi_turn_fraction=1.0, questions_per_image=8)
    assert "describe" not in plan.task_mix and set(plan.task_mix) == set(DEFAULT_TYPES)
    for split, index in [("train", i) for i in range(30)] + [("test", i) for i in range(30)]:
        assert all(qa.type != "describe" for qa in make_sample(plan, split, index).qas)


def test_a_describe_eval_record_carries_its_scene():
    plan = make_plan(3, 96, {"describe": 1}, 0.0, 0.0, 0.0)
    record = eval_record(make_sample(plan, "test", 0))
    assert record["type"] == "describe" and set(record) == {"id", "image", "question", "answers", "type", "scene"}
    assert record["answers"] == [describe(Scene.from_dict(record["scene"]))]


# ---------------------------------------------------------------------------------------------- eval scoring


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("describe") / "data"
    generate_dataset(out, n_train=0, n_val=0, n_test=14, seed=5, image_size=64, real_images=False,
                     task_mix={"describe": 1, "count": 1}, progress=False)
    return out


@dataclass
class FakeModel:
    """Answers a batch with the next scripted predictions; `forwards` per call is 3, 5, 7, ..."""

    predictions: list[tuple[str, str]]  # (text, finish reason) in sample order

    def __post_init__(self):
        self.config = SimpleNamespace(block_size=4)
        self.calls = []

    def generate(self, convs, config):
        batch, self.predictions = self.predictions[:len(convs)], self.predictions[len(convs):]
        ids = [list(range(len(text.split()))) for text, _ in batch]
        forwards = 3 + 2 * len(self.calls)
        self.calls.append(forwards)
        tokens = sum(len(x) + (reason == "stop") for x, (_, reason) in zip(ids, batch))
        return GenerationOutput([t for t, _ in batch], ids, [r for _, r in batch],
                                {"tokens": tokens, "forwards": forwards, "seconds": 0.5})


def _scripted(samples):
    """A prediction per sample: right or wrong answers, whole or partial descriptions, one cut at the budget."""
    out = []
    for i, s in enumerate(samples):
        if s.metric == "describe":
            text = describe(Scene.from_dict(s.scene))
            text = text if i % 3 else text.split(" and ")[0] + "."  # some leave objects out
            cut = all(reason == "stop" for _, reason in out)  # the first description ran out of tokens
            out.append((text, "length" if cut else "stop"))
        else:
            out.append((s.answers[0] if i % 2 else "zebra", "stop"))
    return out


def test_synth_vqa_scores_descriptions_by_f1_and_keeps_them_out_of_accuracy(synth_data):
    cfg = EvalConfig(task="synth-vqa", data=str(synth_data), batch_size=4)
    task, samples = load_samples(cfg)
    assert {s.metric for s in samples} == {"describe", "exact"}
    assert all((s.metric == "describe") == (s.type == "describe") and (s.scene is not None) == (s.type == "describe")
               for s in samples)
    predictions = _scripted(samples)
    model = FakeModel(list(predictions))
    summary, records = evaluate(model, samples, task, cfg, DecodeConfig(max_new_tokens=40), progress=False)

    described = [r for r in records if r["type"] == "describe"]
    counted = [r for r in records if r["type"] == "count"]
    assert described and counted
    for r in described:
        expected = description_f1(r["prediction"], samples[r["index"]].scene)
        assert {k: r[k] for k in expected} == expected and r["score"] == r["f1"] and "contains" not in r
    assert any(r["f1"] < 1 for r in described) and any(r["f1"] == 1 for r in described)
    assert all(r["score"] == scoring.exact_match(r["prediction"], r["answers"]) for r in counted)
    assert "scene" not in records[0]  # scenes stay in the data (scenes.jsonl), not in every record

    assert summary["accuracy"] == pytest.approx(sum(r["score"] for r in counted) / len(counted))
    assert summary["per_type"] == {"count": {"samples": len(counted), "accuracy": summary["accuracy"]}}
    assert summary["metrics"] == {"describe": len(described), "exact": len(counted)}
    desc = summary["description"]
    assert desc["samples"] == len(described) and desc["truncated"] == 1
    for key in ("precision", "recall", "f1"):
        assert desc[key] == pytest.approx(sum(r[key] for r in described) / len(described))

    forwards = [model.calls[r["index"] // 4] for r in records]
    per_sample = [(r["tokens"] + (r["finish_reason"] == "stop")) / f for r, f in zip(records, forwards)]
    assert [r["tokens_per_forward"] for r in records] == pytest.approx(per_sample)
    assert summary["speed"]["tokens_per_forward"] == pytest.approx(sum(per_sample) / len(per_sample))

    md = markdown(json.loads(json.dumps(summary)))
    assert f"| count | {len(counted)} |" in md and "| describe |" not in md
    assert f"Description (describe, {len(described)} samples" in md and f"F1 {100 * desc['f1']:.1f}%" in md


def test_only_descriptions_leave_accuracy_empty(synth_data):
    cfg = EvalConfig(task="synth-vqa", data=str(synth_data), batch_size=8)
    task, samples = load_samples(cfg)
    samples = [s for s in samples if s.type == "describe"]
    summary, _ = evaluate(FakeModel(_scripted(samples)), samples, task, cfg, DecodeConfig(), progress=False)
    assert summary["accuracy"] is None and summary["per_type"] == {}
    assert summary["description"]["samples"] == len(samples)
    assert "| synth-vqa | %d | - |" % len(samples) in markdown(summary)


def test_describe_lines_ignore_metric_overrides_and_need_a_scene(synth_data, tmp_path):
    _, samples = load_samples(EvalConfig(task="synth-vqa", data=str(synth_data), metric="anls"))
    assert {s.type: s.metric for s in samples} == {"describe": "describe", "count": "anls"}
    lines = (synth_data / "test.jsonl").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if '"describe"' in line)
    broken = dict(json.loads(lines[first]), image=str(synth_data / json.loads(lines[first])["image"]))
    for bad, message in ((None, "needs its 'scene'"), ({"size": 64}, "malformed 'scene'")):
        row = {k: v for k, v in broken.items() if k != "scene"} if bad is None else {**broken, "scene": bad}
        path = tmp_path / "test.jsonl"
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DiffusionVLError, match=rf"test.jsonl:1: .*{message}"):
            load_samples(EvalConfig(task="synth-vqa", data=str(path)))


def test_tokens_per_forward_counts_the_stop_token_per_sample():
    assert tokens_per_forward([[1, 2, 3], [4], []], ["stop", "length", "stop"], [2, 4, 1]) == [2.0, 0.25, 1.0]
    assert sample_forwards({"forwards": 9, "forwards_per_sample": [9, 4, 2]}, 3) == [9, 4, 2]
    assert sample_forwards({"forwards": 9}, 3) == [9, 9, 9]  # a decoder that counts per batch only
