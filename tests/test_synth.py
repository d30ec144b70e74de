"""The synthetic VQA generator: determinism, exact answers, file formats, split hygiene, CLI and bad input.

Answers are re-derived here by an independent oracle that reads the question text and the stored scene
description (`scenes.jsonl`), not by calling the generator's own question code.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from diffusionvl.cli import main
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.data import real
from diffusionvl.data import scene as scene_mod
from diffusionvl.data.questions import DEFAULT_TYPES, POSITION_MARGIN, RELATION_MARGIN
from diffusionvl.data.scene import COLOURS, PLURALS, SHAPES, Scene, SceneObject, gap_px, render_scene, sample_scene
from diffusionvl.data.synth import ALL_TYPES, generate_dataset, make_plan, make_sample

SMALL = dict(n_train=16, n_val=6, n_test=10, image_size=96, real_fraction=0.2, text_only_fraction=0.1,
             multi_turn_fraction=0.5, progress=False)


def read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def load_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(out, seed=3, **SMALL)
    return out


@pytest.fixture(scope="module")
def qa_dataset(tmp_path_factory) -> Path:
    """Synthetic scenes only, many questions of every type (for the answer oracle)."""
    out = tmp_path_factory.mktemp("synth_qa") / "data"
    generate_dataset(out, n_train=120, n_val=0, n_test=160, seed=11, image_size=64, real_images=False,
                     multi_turn_fraction=1.0, progress=False)
    return out


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_files_and_another_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, seed=3, **SMALL)
    first, second = read_tree(dataset), read_tree(again)
    assert first.keys() == second.keys()
    assert [k for k in first if first[k] != second[k]] == []
    other = tmp_path / "other"
    generate_dataset(other, seed=4, **SMALL)
    third = read_tree(other)
    assert third["train.json"] != first["train.json"]
    assert third["images/test-000000.png"] != first["images/test-000000.png"]


def test_a_sample_does_not_depend_on_the_split_size():
    plan = make_plan(5, 96, None, 0.0, 0.0, 0.0)
    a, b = make_sample(plan, "train", 7), make_sample(plan, "train", 7)
    assert a.qas == b.qas and a.meta == b.meta and a.image.tobytes() == b.image.tobytes()


# ---------------------------------------------------------------------------------------------- answers


def _mentions(question: str) -> tuple[list[str], list[str]]:
    """Colours and shapes named in the question, in order of appearance."""
    words = re.findall(r"[a-z]+", question.lower())
    plural_to_shape = {plural: shape for shape, plural in PLURALS.items()}
    colours = [w for w in words if w in COLOURS]
    shapes = [plural_to_shape.get(w, w) for w in words if w in SHAPES or w in plural_to_shape]
    return colours, shapes


def _match(scene: Scene, colour: str | None, shape: str | None) -> list[SceneObject]:
    return [o for o in scene.objects if colour in (None, o.colour) and shape in (None, o.shape)]


def _the_one(scene: Scene, phrase: str) -> SceneObject:
    colours, shapes = _mentions(phrase)
    found = _match(scene, colours[0] if colours else None, shapes[0] if shapes else None)
    assert len(found) == 1, f"{phrase!r} does not pick exactly one object in {scene}"
    return found[0]


def oracle(qtype: str, question: str, scene: Scene) -> str:
    """The canonical answer, derived from the question text and the scene description alone."""
    q = question.lower()
    colours, shapes = _mentions(question)
    if qtype == "text":
        return scene.text.text
    if qtype == "shape":
        return (_the_one(scene, question) if colours else _only(scene)).shape
    if qtype == "colour":
        return (_the_one(scene, question) if shapes else _only(scene)).colour
    if qtype == "count":
        return str(len(_match(scene, colours[0] if colours else None, shapes[0] if shapes else None)))
    if qtype == "exist":
        if "text" in q or "written" in q:
            return "yes" if scene.text is not None else "no"
        return "yes" if _match(scene, colours[0] if colours else None, shapes[0]) else "no"
    if qtype == "position":
        obj, axis = _the_one(scene, question), "x" if "left" in q else "y"
        offset = getattr(obj, axis) - scene.size / 2
        assert abs(offset) >= POSITION_MARGIN * scene.size, "position asked about an object near the middle"
        return {("x", True): "left", ("x", False): "right", ("y", True): "top", ("y", False): "bottom"}[
            (axis, offset < 0)]
    assert qtype == "relation", qtype
    return _relation(q, scene)


def _only(scene: Scene) -> SceneObject:
    assert len(scene.objects) == 1
    return scene.objects[0]


def _relation(q: str, scene: Scene) -> str:
    match = re.search(r"the ([a-z ]+?) or the ([a-z ]+?)\?$", q)
    if match:  # "Which is higher, the A or the B?"
        a, b = match.group(1), match.group(2)
        oa, ob = _the_one(scene, a), _the_one(scene, b)
        axis = "y" if ("higher" in q or "lower" in q or "top" in q) else "x"
        assert abs(getattr(oa, axis) - getattr(ob, axis)) >= RELATION_MARGIN * scene.size
        a_first = getattr(oa, axis) < getattr(ob, axis)
        wants_first = "higher" in q or "top" in q or "left" in q
        return a if a_first == wants_first else b
    match = re.search(r"is the ([a-z ]+?) (above or below|to the left or to the right of) the ([a-z ]+?)\?$", q)
    oa, ob = _the_one(scene, match.group(1)), _the_one(scene, match.group(3))
    if match.group(2) == "above or below":
        return "above" if oa.y < ob.y else "below"
    return "left" if oa.x < ob.x else "right"


def test_answers_match_the_scene_for_every_question_type(qa_dataset):
    scenes = {r["id"]: Scene.from_dict(r["scene"]) for r in load_jsonl(qa_dataset / "scenes.jsonl")}
    checked = {t: 0 for t in DEFAULT_TYPES}  # the default mix asks every short-answer type
    for record in load_jsonl(qa_dataset / "test.jsonl"):
        assert record["answers"][0] == oracle(record["type"], record["question"], scenes[record["id"]]), record
        checked[record["type"]] += 1
    for record in json.loads((qa_dataset / "train.json").read_text()):
        turns = record["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            question = human["value"].removeprefix("<image>\n")
            qtype = _template_type(question)  # train records do not store the type: recognise the template
            assert gpt["value"] == oracle(qtype, question, scenes[record["id"]]), record
    assert all(n >= 5 for n in checked.values()), checked


def _template_type(question: str) -> str:
    q = question.lower()
    if q.startswith(("how many", "count")):
        return "count"
    if "text" in q or "written" in q:
        return "exist" if q.startswith("is ") else "text"
    if q.startswith(("which is", "which one")) or " above or below " in q or " or to the right of " in q:
        return "relation"
    if "left" in q or "top" in q:
        return "position"
    if q.startswith(("is there", "do you see", "does the picture", "are there")):
        return "exist"
    return "colour" if "colo" in q else "shape"


def test_answer_variants_are_short_and_lower_case(dataset, qa_dataset):
    records = load_jsonl(dataset / "test.jsonl") + load_jsonl(qa_dataset / "test.jsonl")
    for record in records:
        answers = record["answers"]
        assert answers and all(isinstance(a, str) and 0 < len(a) <= 40 for a in answers)
        assert len(set(answers)) == len(answers)
        if record["type"] == "text":
            assert answers[0].isupper() or answers[0].isdigit()
        else:
            assert all(a == a.lower() for a in answers), record
    counts = [r for r in records if r["type"] == "count"]
    assert any("two" in r["answers"] or "one" in r["answers"] for r in counts)


def test_red_circle_is_red_at_its_centre():
    scene = Scene(96, "white", "plain", 0, (SceneObject("circle", "red", 48, 48, 20),))
    pixels = render_scene(scene).load()
    assert pixels[48, 48] == COLOURS["red"]
    assert pixels[2, 2] == (255, 255, 255)
    for shape in SHAPES:  # every shape covers its centre with exactly its colour, on every texture
        for texture in scene_mod.TEXTURES:
            image = render_scene(Scene(96, "beige", texture, 1, (SceneObject(shape, "blue", 30, 60, 18),)))
            assert image.getpixel((30, 60)) == COLOURS["blue"], (shape, texture)


@pytest.mark.parametrize("size", [64, 224])
def test_objects_and_text_never_overlap_and_stay_inside(size):
    rng, gap = random.Random(0), gap_px(size)
    for _ in range(150):
        scene = sample_scene(rng, size, force_text=rng.random() < 0.5)
        assert 1 <= len(scene.objects) <= 4
        boxes = [(o.x - o.r, o.y - o.r, o.x + o.r, o.y + o.r) for o in scene.objects]
        boxes += [scene.text.box] if scene.text else []
        for x0, y0, x1, y1 in boxes:
            assert 0 <= x0 and 0 <= y0 and x1 < size and y1 < size
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]
        assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene


def test_text_is_drawn_in_its_box_even_with_the_fallback_font(monkeypatch):
    scene = sample_scene(random.Random(1), 128, force_text=True)
    fonts = [scene_mod.font_name()]
    monkeypatch.setattr(scene_mod, "package_data_path", lambda *a: None)  # no matplotlib font
    scene_mod._font_and_name.cache_clear()
    try:
        fonts.append(scene_mod.font_name())
        x0, y0, x1, y1 = scene.text.box
        crop = render_scene(scene).crop((x0, y0, x1 + 1, y1 + 1))
        assert np.asarray(crop.convert("L")).min() < 60  # dark ink inside the text box
    finally:
        scene_mod._font_and_name.cache_clear()
    assert "matplotlib" not in fonts[1]


# ---------------------------------------------------------------------------------------------- formats


def test_llava_json_is_well_formed(dataset):
    for split in ("train", "val"):
        records = json.loads((dataset / f"{split}.json").read_text())
        assert len(records) == SMALL[f"n_{split}"]
        for record in records:
            assert set(record) <= {"id", "image", "conversations"}
            turns = record["conversations"]
            assert len(turns) in (2, 4) and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            tags = sum(t["value"].count("<image>") for t in turns)
            if "image" in record:
                assert tags == 1 and turns[0]["value"].startswith("<image>\n")
                assert (dataset / record["image"]).is_file()
            else:
                assert tags == 0
            assert all(t["value"].strip() for t in turns)
        if split == "val":
            assert all(len(r["conversations"]) == 2 for r in records)
    train = json.loads((dataset / "train.json").read_text())
    assert any(len(r["conversations"]) == 4 for r in train)
    assert any("image" not in r for r in train)


def test_eval_jsonl_is_well_formed(dataset):
    records = load_jsonl(dataset / "test.jsonl")
    assert len(records) == SMALL["n_test"]
    for record in records:
        assert set(record) - {"image"} == {"id", "question", "answers", "type"}
        assert record["type"] in ALL_TYPES and "<image>" not in record["question"]
        assert "image" not in record or (dataset / record["image"]).is_file()
    summary = json.loads((dataset / "summary.json").read_text())
    assert summary["samples"] == {"train": 16, "val": 6, "test": 10}
    assert sum(summary["questions"]["test"].values()) == 10


def test_text_only_and_multi_turn_extremes(tmp_path):
    generate_dataset(tmp_path, n_train=6, n_val=2, n_test=3, image_size=64, text_only_fraction=1.0,
                     real_images=False, progress=False)
    assert not list((tmp_path / "images").iterdir())
    assert all("image" not in r for r in json.loads((tmp_path / "train.json").read_text()))
    assert {r["type"] for r in load_jsonl(tmp_path / "test.jsonl")} <= {"arithmetic", "word"}


# ---------------------------------------------------------------------------------------------- splits


def test_splits_never_share_an_image(dataset):
    by_split = {"train": json.loads((dataset / "train.json").read_text()),
                "val": json.loads((dataset / "val.json").read_text()),
                "test": load_jsonl(dataset / "test.jsonl")}
    paths = {s: {r["image"] for r in rs if "image" in r} for s, rs in by_split.items()}
    digests = {s: {hashlib.sha256((dataset / p).read_bytes()).hexdigest() for p in ps} for s, ps in paths.items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not paths[a] & paths[b] and not digests[a] & digests[b]
    summary = json.loads((dataset / "summary.json").read_text())
    pools = {s: set(summary["real_images"][s]) for s in ("train", "val", "test")}
    assert not (pools["train"] & pools["val"] or pools["train"] & pools["test"] or pools["val"] & pools["test"])
    sources = [r for r in load_jsonl(dataset / "scenes.jsonl") if "source" in r]
    assert sources, "expected some real-image samples with real_fraction=0.2"
    for record in sources:
        assert record["source"] in pools[record["id"].split("-")[0]]


def test_missing_optional_packages_shrink_the_real_set(monkeypatch, tmp_path):
    original = real.package_data_path
    monkeypatch.setattr(real, "package_data_path",
                        lambda package, *parts: None if package == "skimage" else original(package, *parts))
    names, missing = real.available_real_images()
    assert names and all(real.BY_NAME[n].package == "matplotlib" for n in names)
    assert missing and all("scikit-image not installed" in m for m in missing)
    summary = generate_dataset(tmp_path, n_train=4, n_val=1, n_test=1, image_size=64, real_fraction=1.0,
                               progress=False)
    assert summary["real_images"]["missing"] == missing


def test_a_smaller_rerun_leaves_no_stray_images(tmp_path):
    generate_dataset(tmp_path, n_train=5, n_val=0, n_test=0, image_size=64, real_images=False, progress=False)
    generate_dataset(tmp_path, n_train=2, n_val=0, n_test=0, image_size=64, real_images=False, progress=False)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["train-000000.png", "train-000001.png"]
    assert not [p for p in tmp_path.rglob("*.tmp")]


# ---------------------------------------------------------------------------------------------- CLI and errors


def test_cli_writes_the_files_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["data", "--out", str(out), "--n-train", "4", "--n-val", "2", "--n-test", "3", "--image-size", "64",
            "--no-real-images", "--text-only-fraction", "0.25", "--task-mix", "count=2,text=1", "--no-progress"]
    assert main(argv) == 0
    for name in ("train.json", "val.json", "test.jsonl", "scenes.jsonl", "summary.json"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert "question type" in printed and "total" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["task_mix"]) == {"count", "text"} and summary["real_images"]["train"] == []


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_train=-1), "n_train must be a non-negative integer"),
    (dict(n_val=2.5), "n_val must be a non-negative integer"),
    (dict(n_train=0, n_val=0, n_test=0), "nothing to generate"),
    (dict(image_size=32), "too small to fit"),
    (dict(text_only_fraction=1.5), "text_only_fraction must be a number in [0, 1]"),
    (dict(task_mix={"colour": 1, "smell": 2}), "unknown question type(s) in task_mix: smell"),
    (dict(task_mix={"count": 0}), "task_mix weights are all 0"),
])
def test_invalid_arguments_raise_one_line_errors(tmp_path, kwargs, message):
    out = tmp_path / "never"
    args = dict(n_train=2, n_val=1, n_test=1, progress=False) | kwargs
    with pytest.raises(DiffusionVLError) as info:
        generate_dataset(out, **args)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not out.exists()


def test_cli_reports_bad_input_as_one_error_line(tmp_path, capsys):
    assert main(["data", "--out", str(tmp_path / "x"), "--image-size", "40", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: image_size 40 is too small")
    assert main(["data", "--out", str(tmp_path / "x"), "--task-mix", "count=lots"]) == 2
    assert "TYPE=WEIGHT" in capsys.readouterr().err


@pytest.mark.parametrize("n_names", [0, 1, 2, 3, 4, 25])
@pytest.mark.parametrize("counts", [(1000, 100, 200), (1, 1, 1000), (5, 0, 0), (0, 3, 7), (1000, 1, 1)])
def test_real_photographs_are_partitioned_without_loss(n_names, counts):
    from diffusionvl.data.synth import partition_real

    names = [f"img{i}" for i in range(n_names)]
    pools = partition_real(names, dict(zip(("train", "val", "test"), counts)), seed=0)
    assigned = [n for split in ("train", "val", "test") for n in pools[split]]
    assert sorted(assigned) == sorted(names)  # every photograph in exactly one split
    assert all(not pools[s] for s, n in zip(("train", "val", "test"), counts) if n == 0)
    if n_names >= 3 and all(counts):
        assert all(pools.values())


# ---------------------------------------------------------------------------------------------- no leaks


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def test_no_turn_can_be_answered_from_the_turns_before_it():
    """1,000 generated multi-question conversations (every type, descriptions included in the mix): no answer
    appears, as whole words, in the text (questions and answers) of the turns before it, and a description is
    always a sample of its own (it would answer every later question)."""
    mix = {t: 1.0 for t in ("shape", "colour", "count", "position", "relation", "exist", "text", "describe")}
    plan = make_plan(5, 96, mix, 0.0, 0.0, 1.0, questions_per_image=8)
    multi = 0
    for index in range(1000):
        qas = make_sample(plan, "train", index).qas
        multi += len(qas) > 1
        assert all(q.type != "describe" for q in qas) or len(qas) == 1
        for k, qa in enumerate(qas):
            earlier = "".join(_words(q.question) + _words(q.answer) for q in qas[:k])
            for answer in qa.answers:
                assert _words(answer) not in earlier, (index, [(q.question, q.answer) for q in qas[: k + 1]])
    assert multi > 500  # most samples still carry several questions


def test_recognition_scenes_hold_one_object():
    plan = make_plan(1, 96, {"shape": 1, "colour": 1}, 0.0, 0.0, 1.0, questions_per_image=4, max_objects=1)
    assert all(len(make_sample(plan, "train", i).meta["scene"]["objects"]) == 1 for i in range(50))
    with pytest.raises(DiffusionVLError, match="relation questions compare two objects"):
        make_plan(1, 96, None, 0.0, 0.0, 1.0, max_objects=1)  # the default mix asks relations
    with pytest.raises(DiffusionVLError, match="max_objects"):
        make_plan(1, 96, None, 0.0, 0.0, 1.0, max_objects=5)
