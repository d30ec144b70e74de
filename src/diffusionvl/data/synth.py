"""A deterministic synthetic visual question answering dataset, written as LLaVA JSON and an eval JSONL.

Contract:
- `generate_dataset(out_dir, n_train, n_val, n_test, seed, image_size, task_mix=...)` writes into `out_dir`:
  `images/<split>-<index>.png`; `train.json` and `val.json` (LLaVA: a list of `{"id", "image", "conversations"}`,
  the first human turn starts with `"<image>\\n"`, turns alternate human / gpt; with `multi_turn_fraction` of the
  train samples asking up to `questions_per_image` questions about the same image, no two with the same type and
  answer, and none whose answer can be read from the text of the turns before it (`leaks`): a later question never
  names what an earlier turn answered, so a model cannot copy instead of looking; descriptions, which answer
  everything, are always samples of their own); `val.jsonl` (the val split's first questions in the eval format,
  for watching accuracy per type while training); `test.jsonl` (one
  `{"id", "image", "question", "answers", "type"}` per line, `answers[0]` canonical); `scenes.jsonl` (the scene
  description or real-image source behind every image, for checking answers and error analysis); `summary.json`
  (what was written, counts per split and question type; "binding" counts the shape and colour questions about
  scenes of several objects, "what colour is the star?", which must find the object before reading it). It returns the summary dict. Text-only samples (a
  `text_only_fraction` of each split) have no "image" key and no `<image>` tag; of the others, a `real_fraction`
  show a real photograph (when any is available) and the rest a synthetic scene.
- Same arguments -> byte-identical files: every sample draws from its own `random.Random` seeded by
  (seed, split, index), never from global state, so sample i of a split does not depend on the split's size.
- Splits never share an image: every image file belongs to one sample, and each real photograph (see
  `diffusionvl.data.real`) is assigned to exactly one split, in proportion to the split sizes.
- Every file is written atomically (`diffusionvl.core.atomic`: a temporary name, then a rename); images named like ours
  (`<split>-<6 digits>.png`) that the new dataset does not list are removed, so a smaller rerun leaves no strays.
- Bad arguments raise a one-line `DiffusionVLError` before anything is written.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image

from diffusionvl.core.atomic import write_bytes, write_json
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.data.questions import DEFAULT_TYPES, QA, QUESTION_TYPES, SCENE_HINTS, ask
from diffusionvl.data.real import BY_NAME, available_real_images, load_real_image, real_qa, real_view
from diffusionvl.data.scene import MAX_OBJECTS, check_image_size, font_name, render_scene, sample_scene
from diffusionvl.data.textonly import TEXT_TYPES, text_qa

SPLITS = ("train", "val", "test")
ALL_TYPES = (*QUESTION_TYPES, "caption", "real", *TEXT_TYPES)
BINDING_TYPES = ("shape", "colour")  # "what shape is the red object?", "what colour is the star?" (several objects)
IMAGE_DIR = "images"
FORMAT_VERSION = 1
IMAGE_TOKEN = "<image>"
_STREAM = "diffusionvl-synth"
_OUR_IMAGE = re.compile(r"^(train|val|test)-\d{6}\.png$")


@dataclass(frozen=True)
class Plan:
    """Everything, besides the split and index, that decides a sample's content. Built by `make_plan`."""

    seed: int
    image_size: int
    task_mix: dict[str, float]  # question type -> probability (synthetic samples), sums to 1
    real_fraction: float  # share of the samples with an image that show a real photograph (when any is available)
    text_only_fraction: float  # share of samples without an image
    multi_turn_fraction: float  # share of train samples with more questions about the same image
    questions_per_image: int = 2  # questions of a multi-turn train sample (distinct; fewer when the scene runs out)
    max_objects: int = 4  # most objects per synthetic scene (1: one-object recognition scenes)


@dataclass(frozen=True)
class Sample:
    id: str
    image: Image.Image | None
    qas: tuple[QA, ...]
    meta: dict[str, Any] = field(default_factory=dict)  # {"scene": {...}} or {"source": name}

    @property
    def has_image(self) -> bool:
        return "scene" in self.meta or "source" in self.meta

    def without_pixels(self) -> "Sample":
        """The same sample without its (already written) image, to keep memory flat."""
        return dataclasses.replace(self, image=None)


# ---------------------------------------------------------------------------------------------- validation


def make_plan(seed: int, image_size: int, task_mix: Mapping[str, float] | None, real_fraction: float,
              text_only_fraction: float, multi_turn_fraction: float, questions_per_image: int = 2,
              max_objects: int = MAX_OBJECTS) -> Plan:
    check(isinstance(seed, int) and not isinstance(seed, bool), f"seed must be an integer, got {seed!r}")
    check_image_size(image_size)
    for name, value in (("real_fraction", real_fraction), ("text_only_fraction", text_only_fraction),
                        ("multi_turn_fraction", multi_turn_fraction)):
        check(_is_number(value) and 0.0 <= value <= 1.0, f"{name} must be a number in [0, 1], got {value!r}")
    check(isinstance(questions_per_image, int) and not isinstance(questions_per_image, bool)
          and 1 <= questions_per_image <= 32, f"questions_per_image must be an integer in 1..32, got {questions_per_image!r}")
    check(isinstance(max_objects, int) and not isinstance(max_objects, bool) and 1 <= max_objects <= MAX_OBJECTS,
          f"max_objects must be an integer in 1..{MAX_OBJECTS}, got {max_objects!r}")
    mix = normalize_task_mix(task_mix)
    check(max_objects >= 2 or "relation" not in mix, "relation questions compare two objects: give them no weight "
                                                    "in task_mix when max_objects is 1")
    return Plan(seed, image_size, mix, float(real_fraction), float(text_only_fraction), float(multi_turn_fraction),
                questions_per_image, max_objects)


def normalize_task_mix(task_mix: Mapping[str, float] | None) -> dict[str, float]:
    """Question type -> probability; None means every short-answer type equally often."""
    if task_mix is None:
        return {t: 1.0 / len(DEFAULT_TYPES) for t in DEFAULT_TYPES}
    unknown = sorted(set(task_mix) - set(QUESTION_TYPES))
    check(not unknown, f"unknown question type(s) in task_mix: {', '.join(map(str, unknown))}; "
                       f"choose from {', '.join(QUESTION_TYPES)}")
    for name, weight in task_mix.items():
        check(_is_number(weight) and weight >= 0, f"task_mix weight for {name!r} must be a number >= 0, got {weight!r}")
    total = sum(task_mix.values())
    check(total > 0, "task_mix weights are all 0; give at least one question type a positive weight")
    return {t: task_mix[t] / total for t in QUESTION_TYPES if task_mix.get(t, 0) > 0}


def check_counts(counts: Mapping[str, int]) -> None:
    for split, n in counts.items():
        check(isinstance(n, int) and not isinstance(n, bool) and n >= 0,
              f"n_{split} must be a non-negative integer, got {n!r}")
        check(n < 1_000_000, f"n_{split} = {n} exceeds the 6-digit sample ids; use fewer than 1000000")
    check(sum(counts.values()) > 0, "nothing to generate: n_train, n_val and n_test are all 0")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------- samples (pure)


def sample_rng(seed: int, split: str, index: int) -> random.Random:
    """The private random stream of one sample (string seeds hash with SHA-512: stable across runs)."""
    return random.Random(f"{_STREAM}/{seed}/{split}/{index}")


def sample_id(split: str, index: int) -> str:
    return f"{split}-{index:06d}"


def image_path(sid: str) -> str:
    return f"{IMAGE_DIR}/{sid}.png"


def make_sample(plan: Plan, split: str, index: int, real_pool: Sequence[str] = ()) -> Sample:
    """Sample `index` of `split`: text-only, about a real photograph named in `real_pool`, or a synthetic scene."""
    rng = sample_rng(plan.seed, split, index)
    sid = sample_id(split, index)
    text_only, photo = rng.random() < plan.text_only_fraction, rng.random() < plan.real_fraction
    turns = plan.questions_per_image if rng.random() < plan.multi_turn_fraction and split == "train" else 1
    if text_only:
        return Sample(sid, None, (text_qa(rng),))
    if real_pool and photo:
        return _real_sample(sid, rng, plan, real_pool, turns)
    return _synthetic_sample(sid, rng, plan, turns)


def _synthetic_sample(sid: str, rng: random.Random, plan: Plan, turns: int) -> Sample:
    qtype = weighted_choice(rng, plan.task_mix)
    for _ in range(200):
        scene = sample_scene(rng, plan.image_size, max_objects=plan.max_objects, **SCENE_HINTS.get(qtype, {}))
        qa = ask(qtype, scene, rng)
        if qa is not None:
            break
    else:  # an internal bug: every type is answerable on a sizeable share of scenes
        raise RuntimeError(f"no scene supported a {qtype!r} question in 200 tries")
    qas = [qa]
    follow_ups = {t: w for t, w in plan.task_mix.items() if t != "describe"}  # a description answers everything
    for _ in range(20 * (turns - 1) if qtype != "describe" and follow_ups else 0):
        if len(qas) >= turns:
            break
        more = ask(weighted_choice(rng, follow_ups), scene, rng)
        if more is not None and all((more.type, more.answer) != (q.type, q.answer) for q in qas) \
                and not leaks(more, qas):
            qas.append(more)
    return Sample(sid, render_scene(scene), tuple(qas), {"scene": scene.to_dict()})


def _words(text: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", text.lower())) + " "


def leaks(qa: QA, earlier: Sequence[QA]) -> bool:
    """True when one of `qa`'s accepted answers appears, as whole words, in the questions or answers before it."""
    seen = "".join(_words(q.question) + _words(q.answer) for q in earlier)
    return any(_words(a) in seen for a in qa.answers if _words(a).strip())


def _real_sample(sid: str, rng: random.Random, plan: Plan, pool: Sequence[str], turns: int) -> Sample:
    name = rng.choice(sorted(pool))
    entry = BY_NAME[name]
    image = real_view(load_real_image(name), entry, rng, plan.image_size)
    qas = [real_qa(entry, rng)]
    for _ in range(20 if turns > 1 else 0):
        second = real_qa(entry, rng)
        if second.question != qas[0].question:
            qas.append(second)
            break
    return Sample(sid, image, tuple(qas), {"source": name})


def weighted_choice(rng: random.Random, weights: Mapping[str, float]) -> str:
    keys = list(weights)
    point, total = rng.random() * sum(weights.values()), 0.0
    for key in keys:
        total += weights[key]
        if point < total:
            return key
    return keys[-1]


def partition_real(names: list[str], counts: Mapping[str, int], seed: int) -> dict[str, list[str]]:
    """Assign each real photograph to exactly one split, about in proportion to the split sizes.

    Every non-empty split gets at least one when there are enough photographs; leftovers go to train.
    """
    order = sorted(names)
    random.Random(f"{_STREAM}/{seed}/real-partition").shuffle(order)
    active = [s for s in ("train", "test", "val") if counts.get(s, 0) > 0]
    total = sum(counts[s] for s in active)
    quota = {s: 0 for s in SPLITS}
    if len(order) >= len(active):
        quota.update({s: max(1, len(order) * counts[s] // total) for s in active})
    for _ in range(sum(quota.values()) - len(order)):  # the at-least-one rule overshot: trim the largest
        quota[max(active, key=quota.__getitem__)] -= 1
    quota[active[0]] += len(order) - sum(quota.values())
    pools, start = {}, 0
    for split in SPLITS:
        pools[split] = sorted(order[start:start + quota[split]])
        start += quota[split]
    return pools


# ---------------------------------------------------------------------------------------------- records (pure)


def llava_record(sample: Sample) -> dict[str, Any]:
    record: dict[str, Any] = {"id": sample.id}
    if sample.has_image:
        record["image"] = image_path(sample.id)
    turns = []
    for k, qa in enumerate(sample.qas):
        prefix = f"{IMAGE_TOKEN}\n" if k == 0 and sample.has_image else ""
        turns += [{"from": "human", "value": prefix + qa.question}, {"from": "gpt", "value": qa.answer}]
    record["conversations"] = turns
    return record


def eval_record(sample: Sample) -> dict[str, Any]:
    qa = sample.qas[0]
    record: dict[str, Any] = {"id": sample.id}
    if sample.has_image:
        record["image"] = image_path(sample.id)
    record.update(question=qa.question, answers=list(qa.answers), type=qa.type)
    if qa.type == "describe":  # scored by object-level F1 against the scene (data.describe)
        record["scene"] = sample.meta["scene"]
    return record


def scene_record(sample: Sample) -> dict[str, Any]:
    return {"id": sample.id, "image": image_path(sample.id), **sample.meta}


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def json_bytes(data: Any, indent: int | None = 1) -> bytes:
    return (json.dumps(data, ensure_ascii=False, indent=indent) + "\n").encode("utf-8")


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")


# ---------------------------------------------------------------------------------------------- I/O


def prepare_out_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The output folder: missing, empty, or an earlier dataset of ours (its summary.json names our format), which
    is rewritten; a folder holding anything else is refused unless `overwrite` (its same-named files are replaced)."""
    out = Path(out_dir)
    check(not out.exists() or out.is_dir(), f"output path {out} exists and is not a directory; choose another --out")
    if out.is_dir() and not overwrite and any(out.iterdir()) and not _is_dataset(out):
        raise DiffusionVLError(f"{out} is not empty and holds no dataset written by diffusionvl data (no summary.json "
                               "of ours): choose an empty folder, or pass --overwrite to write into it anyway")
    try:
        (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DiffusionVLError(f"cannot create output directory {out}: {exc.strerror or exc}") from None
    return out


DATASET_FILES = ("train.json", "val.json", "val.jsonl", "test.jsonl", "scenes.jsonl", "summary.json")


def _is_dataset(out: Path) -> bool:
    """An earlier dataset of ours, finished (its summary names our format) or cut short (nothing but our files)."""
    try:
        if "format_version" in json.loads((out / "summary.json").read_text(encoding="utf-8")):
            return True
    except (OSError, ValueError, TypeError):
        pass
    ours = set(DATASET_FILES) | {IMAGE_DIR}
    images = out / IMAGE_DIR  # made first by every run: a folder without it was never ours
    return images.is_dir() and all(p.name in ours or p.name.startswith(".") for p in out.iterdir()) and \
        all(_OUR_IMAGE.match(p.name) or p.name.startswith(".") for p in images.iterdir())


def generate_dataset(out_dir: str | os.PathLike, n_train: int = 1000, n_val: int = 100, n_test: int = 200,
                     seed: int = 0, image_size: int = 224, task_mix: Mapping[str, float] | None = None,
                     real_images: bool = True, real_fraction: float = 0.05, text_only_fraction: float = 0.0,
                     multi_turn_fraction: float = 0.25, progress: bool = True,
                     questions_per_image: int = 2, overwrite: bool = False,
                     max_objects: int = MAX_OBJECTS) -> dict[str, Any]:
    """Generate the dataset into `out_dir` (see the module contract) and return its summary."""
    counts = {"train": n_train, "val": n_val, "test": n_test}
    check_counts(counts)
    plan = make_plan(seed, image_size, task_mix, real_fraction, text_only_fraction, multi_turn_fraction,
                     questions_per_image, max_objects)
    out = prepare_out_dir(out_dir, overwrite)
    names, missing = available_real_images() if real_images and plan.real_fraction > 0 else ([], [])
    pools = partition_real(names, counts, seed)
    samples = _write_samples(out, plan, counts, pools, progress)
    summary = build_summary(plan, counts, samples, pools, missing)
    write_bytes(out / "train.json", json_bytes([llava_record(s) for s in samples["train"]]))
    write_bytes(out / "val.json", json_bytes([llava_record(s) for s in samples["val"]]))
    write_bytes(out / "val.jsonl", jsonl_bytes([eval_record(s) for s in samples["val"]]))
    write_bytes(out / "test.jsonl", jsonl_bytes([eval_record(s) for s in samples["test"]]))
    scenes = [scene_record(s) for split in SPLITS for s in samples[split] if s.has_image]
    write_bytes(out / "scenes.jsonl", jsonl_bytes(scenes))
    write_json(out / "summary.json", summary)
    _remove_stray_images(out, {Path(r["image"]).name for r in scenes})
    return summary


def _write_samples(out: Path, plan: Plan, counts: Mapping[str, int],
                   pools: Mapping[str, Sequence[str]], progress: bool) -> dict[str, list[Sample]]:
    """Make every sample, write its image, and keep it (without pixels) for the JSON files."""
    from tqdm import tqdm

    samples: dict[str, list[Sample]] = {split: [] for split in SPLITS}
    with tqdm(total=sum(counts.values()), desc="synthetic VQA", unit="sample", disable=not progress) as bar:
        for split in SPLITS:
            for index in range(counts[split]):
                sample = make_sample(plan, split, index, pools[split])
                if sample.image is not None:
                    write_bytes(out / image_path(sample.id), png_bytes(sample.image))
                    sample = sample.without_pixels()
                samples[split].append(sample)
                bar.update(1)
    return samples


def _remove_stray_images(out: Path, keep: set[str]) -> None:
    for path in (out / IMAGE_DIR).iterdir():
        if _OUR_IMAGE.match(path.name) and path.name not in keep:
            path.unlink()


def build_summary(plan: Plan, counts: Mapping[str, int], samples: Mapping[str, list[Sample]],
                  pools: Mapping[str, list[str]], missing: list[str]) -> dict[str, Any]:
    questions = {split: Counter(qa.type for s in samples[split] for qa in s.qas) for split in SPLITS}
    binding = {split: sum(qa.type in BINDING_TYPES and len(s.meta.get("scene", {}).get("objects", ())) > 1
                          for s in samples[split] for qa in s.qas) for split in SPLITS}
    return {
        "format_version": FORMAT_VERSION,
        "seed": plan.seed,
        "image_size": plan.image_size,
        "samples": dict(counts),
        "images": {split: sum(s.has_image for s in samples[split]) for split in SPLITS},
        "text_only": {split: sum(not s.has_image for s in samples[split]) for split in SPLITS},
        "multi_turn": {split: sum(len(s.qas) > 1 for s in samples[split]) for split in SPLITS},
        "questions": {split: {t: questions[split][t] for t in ALL_TYPES} for split in SPLITS},
        "binding": binding,
        "task_mix": plan.task_mix,
        "real_fraction": plan.real_fraction,
        "text_only_fraction": plan.text_only_fraction,
        "multi_turn_fraction": plan.multi_turn_fraction,
        "real_images": {**{split: list(pools[split]) for split in SPLITS}, "missing": list(missing)},
        "font": font_name(),
        "files": {"train": "train.json", "val": "val.json", "test": "test.jsonl", "scenes": "scenes.jsonl",
                  "images": f"{IMAGE_DIR}/"},
    }
