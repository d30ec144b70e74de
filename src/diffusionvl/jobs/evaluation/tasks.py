"""Evaluation tasks: where samples come from and how they are scored, in a small registry.

Contract: a `Task` has a `kind` ("generate": answer questions, score the text; "elbo": score the likelihood bound
of reference answers / texts) and a loader `(data, image_folder) -> list[Sample]` that validates every line and
raises a one-line `DiffusionVLError` naming the file and line for bad input. Image paths in a `Sample` are
resolved (absolute) but not opened: images are read batch by batch while evaluating.
Built-in tasks:
- `jsonl`: generic JSONL, one `{"question", "answers" (list) or "answer", ["image"], ["choices"], ["type"],
  ["id"], ["metric"], ["template"]}` per line (`template`: that sample's answer template, docs/templates.md); images relative to `--image-folder` (default: the file's folder). The metric is
  `choice` when `choices` are given, else `exact`, unless the line (or `--metric`) says `anls`/`exact`/`choice`.
- `synth-vqa`: the generated visual QA data of `diffusionvl data --out DIR`: `DIR/test.jsonl` (`{"id",
  "image": "images/...png", "question", "answers", "type"}`, text-only samples have no image), exact match,
  accuracy per question type. `"type": "describe"` lines also carry `"scene"` (the Scene dict) and get the
  `describe` metric (object-level F1 against that scene, whatever `--metric` says); a describe line without a
  readable scene is an error naming the line.
- `elbo`: negative ELBO per token and the perplexity bound of reference texts (`{"text"}` lines: every token is
  scored) or answers (`{"question"/"prompt", "answers"/"answer"/"response", ["image"]}` lines: the first answer
  is scored as the assistant turn), e.g. the synth-vqa test file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.core.media import is_file, short
from diffusionvl.decoding.template import parse as parse_template
from diffusionvl.jobs.evaluation.scoring import DESCRIBE, SCORERS


@dataclass
class Sample:
    index: int  # position in the task file (results are reported in this order)
    id: str
    question: str  # the prompt (for elbo text samples: empty)
    answers: list[str]  # accepted answers (elbo: answers[0] or the text is scored)
    image: str | None = None  # absolute path
    choices: list[str] | None = None
    type: str = "all"  # category for the per-type breakdown
    metric: str = "exact"
    text: str | None = None  # elbo: a plain text scored as a whole
    scene: dict[str, Any] | None = None  # metric "describe": the Scene dict the description is scored against
    template: str | None = None  # this sample's answer template (decoding/template.py), before EvalConfig.template

    def to_dict(self) -> dict[str, Any]:
        out = {"index": self.index, "id": self.id, "type": self.type, "question": self.question,
               "answers": self.answers, "metric": self.metric}
        if self.image is not None:
            out["image"] = self.image
        if self.choices:
            out["choices"] = self.choices
        if self.template is not None:
            out["template"] = self.template
        return out


@dataclass
class Task:
    name: str
    kind: str  # "generate" | "elbo"
    load: Callable[[str | None, str | None, str | None], list[Sample]]
    prompt_suffix: str = ""  # appended to each question for generation (see EvalConfig.prompt_suffix)
    help: str = ""
    needs_data: bool = True


TASKS: dict[str, Task] = {}

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."


def register_task(task: Task) -> Task:
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DiffusionVLError(f"unknown task {name!r}; choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def read_jsonl(path: str | os.PathLike[str]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-empty line; a bad line is a one-line error naming it."""
    check(os.path.isfile(path), f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8-sig") as fh:  # a BOM (Windows editors) is not data
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DiffusionVLError(f"{path}:{number}: malformed JSON ({exc.msg})") from None
            check(isinstance(obj, dict), f"{path}:{number}: each line must be a JSON object")
            rows.append((number, obj))
    check(bool(rows), f"{path} holds no samples")
    return rows


def _answers(obj: dict[str, Any], where: str, required: bool = True) -> list[str]:
    raw = obj.get("answers", obj.get("answer", obj.get("response")))
    if raw is None:
        check(not required, f"{where}: missing 'answers' (a list) or 'answer'")
        return []
    answers = [raw] if isinstance(raw, (str, int, float)) else raw
    check(isinstance(answers, list) and bool(answers) and all(isinstance(a, (str, int, float)) for a in answers),
          f"{where}: 'answers' must be a non-empty list of strings")
    return [str(a) for a in answers]


def _image(obj: dict[str, Any], folder: Path, where: str) -> str | None:
    image = obj.get("image")
    if image is None:
        return None
    check(isinstance(image, str) and bool(image), f"{where}: 'image' must be a file path")
    path = Path(image) if os.path.isabs(image) else folder / image
    check(is_file(path), f"{where}: image file not found: {short(path)}")
    return str(path.resolve())


def sample_from(obj: dict[str, Any], index: int, folder: Path, where: str, metric: str | None) -> Sample:
    """One generic JSONL object -> Sample (module docstring)."""
    question = obj.get("question", obj.get("prompt"))
    check(isinstance(question, str) and bool(question.strip()), f"{where}: missing 'question' text")
    choices = obj.get("choices")
    if choices is not None:
        check(isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices),
              f"{where}: 'choices' must be a list of at least two strings")
    chosen = obj.get("metric") or metric or ("choice" if choices else "exact")
    check(isinstance(chosen, str) and chosen in SCORERS,
          f"{where}: unknown metric {chosen!r}; choose one of {', '.join(SCORERS)}")
    template = obj.get("template")
    if template is not None:
        check(isinstance(template, str), f"{where}: 'template' must be text")
        try:
            parse_template(template)
        except DiffusionVLError as exc:
            raise DiffusionVLError(f"{where}: {exc}") from None
    return Sample(index=index, id=str(obj.get("id", index)), question=question, answers=_answers(obj, where),
                  image=_image(obj, folder, where), choices=choices, type=str(obj.get("type", "all")),
                  metric=chosen, template=template)


def load_jsonl(data: str | None, image_folder: str | None, metric: str | None) -> list[Sample]:
    check(data is not None, "the jsonl task needs --data FILE.jsonl")
    folder = Path(image_folder) if image_folder else Path(data).resolve().parent
    check(folder.is_dir(), f"image folder not found: {folder}")
    return [sample_from(obj, i, folder, f"{data}:{n}", metric) for i, (n, obj) in enumerate(read_jsonl(data))]


def load_synth(data: str | None, image_folder: str | None, metric: str | None) -> list[Sample]:
    check(data is not None, "the synth-vqa task needs --data DIR (the folder written by `diffusionvl data --out DIR`)")
    path = Path(data)
    file = path / "test.jsonl" if path.is_dir() else path
    check(file.is_file(), f"{file} not found: generate the data with `diffusionvl data --out {data}`")
    folder = Path(image_folder) if image_folder else file.resolve().parent
    rows = read_jsonl(file)
    return [_synth_sample(obj, i, folder, f"{file}:{n}", metric or "exact") for i, (n, obj) in enumerate(rows)]


def _synth_sample(obj: dict[str, Any], index: int, folder: Path, where: str, metric: str) -> Sample:
    """One synth-vqa line -> Sample; a "describe" line is scored against its scene (metric DESCRIBE)."""
    if obj.get("type") != "describe":
        return sample_from(obj, index, folder, where, metric)
    sample = sample_from({k: v for k, v in obj.items() if k != "metric"}, index, folder, where, "exact")
    sample.metric, sample.scene = DESCRIBE, _scene(obj.get("scene"), where)
    return sample


def _scene(data: Any, where: str) -> dict[str, Any]:
    """The line's Scene dict, checked to load (a describe sample cannot be scored without it)."""
    from diffusionvl.data.scene import Scene

    check(isinstance(data, dict), f"{where}: a describe sample needs its 'scene' (regenerate with `diffusionvl data`)")
    try:
        Scene.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise DiffusionVLError(f"{where}: malformed 'scene' ({type(exc).__name__}: {exc})") from None
    return data


def load_elbo(data: str | None, image_folder: str | None, metric: str | None) -> list[Sample]:
    check(data is not None, "the elbo task needs --data FILE.jsonl ({'text'} or {'question', 'answer(s)'} lines)")
    path = Path(data)
    file = path / "test.jsonl" if path.is_dir() else path
    folder = Path(image_folder) if image_folder else file.resolve().parent
    samples = []
    for i, (n, obj) in enumerate(read_jsonl(file)):
        where = f"{file}:{n}"
        text = obj.get("text")
        if text is not None:
            check(isinstance(text, str) and bool(text.strip()), f"{where}: 'text' must be a non-empty string")
            samples.append(Sample(i, str(obj.get("id", i)), "", [], type=str(obj.get("type", "all")), text=text))
            continue
        sample = sample_from({k: v for k, v in obj.items() if k not in ("choices", "metric")}, i, folder, where,
                             "exact")
        samples.append(sample)
    return samples


register_task(Task("jsonl", "generate", load_jsonl, SHORT_ANSWER,
                   "generic JSONL of {image, question, answers, [choices], [type]}: exact / choice / anls"))
register_task(Task("synth-vqa", "generate", load_synth, "",
                   "generated visual QA (`diffusionvl data --out DIR`): exact match per question type, "
                   "object-level F1 for describe"))
register_task(Task("elbo", "elbo", load_elbo, "",
                   "negative ELBO per token and perplexity bound of reference texts or answers"))


def build_prompt(sample: Sample, suffix: str) -> str:
    """The user message for a generation sample: question, lettered options (multiple choice), instruction."""
    text = sample.question.replace("<image>", "").strip()
    if sample.choices:
        letters = [chr(ord("A") + i) for i in range(len(sample.choices))]
        text += "\n" + "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters, sample.choices))
        if suffix == SHORT_ANSWER:
            suffix = LETTER_ANSWER
    return text + suffix


def shard(samples: list[Sample], rank: int, world: int) -> list[Sample]:
    check(world >= 1 and 0 <= rank < world, f"bad process rank {rank} of {world}")
    return samples[rank::world]


def merge_shards(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per-process record lists (each with "index") -> one list in task order; duplicates are an internal error."""
    merged = sorted((r for part in parts for r in part), key=lambda r: r["index"])
    indices = [r["index"] for r in merged]
    if len(set(indices)) != len(indices):
        raise RuntimeError("a sample was evaluated twice: the shards overlap")
    return merged
