"""Question templates over a synthetic `Scene`, each with exact short answers.

Contract:
- `ask(qtype, scene, rng)` returns a `QA` of that type about `scene`, or `None` when the scene cannot support the
  type unambiguously (for example a colour question when every shape occurs twice). It is a pure function of its
  arguments. `QUESTION_TYPES` lists the types; `SCENE_HINTS[qtype]` are keyword arguments for `sample_scene`
  that make a supporting scene likely.
- `QA.answers[0]` is the canonical answer (the training target); the rest are accepted variants for scoring
  ("2" and "two"). Answers are lower-case except rendered text, which keeps its case (and is also accepted in lower
  case). An answer is one word, one number or a short phrase, so exact match scores it.
- Objects are named so that the name picks exactly one object: its shape when the shape is unique in the scene,
  else colour + shape when that pair is unique; objects that share both are never referred to.
- Position answers are only asked when the object's centre is at least 10 % of the image size away from the middle
  line; relations only when the two centres are at least 15 % apart along the asked axis.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from diffusionvl.data.scene import COLOURS, PLURALS, SHAPES, Scene, SceneObject

QUESTION_TYPES = ("shape", "colour", "count", "position", "relation", "text", "exist", "describe")
DEFAULT_TYPES = QUESTION_TYPES[:-1]  # the short-answer types; "describe" (a long answer) is asked when a mix names it
# keyword arguments for sample_scene that make a scene likely to support (and balance) the question type
SCENE_HINTS: dict[str, dict] = {"text": {"force_text": True}, "count": {"repeat_probability": 0.6}}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
COLOUR_SYNONYMS = {"purple": ("violet",), "cyan": ("turquoise", "light blue")}
POSITION_MARGIN = 0.10
RELATION_MARGIN = 0.15


@dataclass(frozen=True)
class QA:
    type: str
    question: str
    answers: tuple[str, ...]  # answers[0] = canonical target

    @property
    def answer(self) -> str:
        return self.answers[0]


SHAPE_SINGLE = ("What shape is in the image?", "What shape do you see?", "Which shape is shown in the picture?",
                "Name the shape in the image.")
SHAPE_BY_COLOUR = ("What shape is the {colour} object?", "What is the shape of the {colour} object?",
                   "Which shape is {colour}?", "The {colour} object has which shape?")
COLOUR_SINGLE = ("What colour is the shape?", "What color is the object in the image?",
                 "Which colour does the shape have?")
COLOUR_BY_SHAPE = ("What colour is the {shape}?", "What color is the {shape}?", "Which colour is the {shape}?",
                   "What is the colour of the {shape}?")
COUNT_BY_SHAPE = ("How many {plural} are there?", "How many {plural} can you see?", "Count the {plural} in the image.",
                  "How many {plural} are in the picture?")
COUNT_BY_COLOUR = ("How many {colour} shapes are there?", "How many {colour} objects can you see?",
                   "Count the {colour} shapes.")
COUNT_BY_BOTH = ("How many {colour} {plural} are there?", "How many {colour} {plural} can you see?")
COUNT_ALL = ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes in the picture.")
POSITION_X = ("Is the {ref} on the left or the right?", "Is the {ref} on the left or right side of the image?",
              "On which side is the {ref}, left or right?", "Is the {ref} in the left half or the right half?")
POSITION_Y = ("Is the {ref} at the top or the bottom?", "Is the {ref} in the top half or the bottom half?",
              "Is the {ref} near the top or the bottom of the picture?")
# (template, which object answers: "first" = smaller coordinate along the axis, i.e. left / higher)
RELATION_Y = (("Which is higher, the {a} or the {b}?", "first"), ("Which is lower, the {a} or the {b}?", "second"),
              ("Which one is closer to the top, the {a} or the {b}?", "first"))
RELATION_X = (("Which is further left, the {a} or the {b}?", "first"),
              ("Which is further right, the {a} or the {b}?", "second"),
              ("Which one is more to the left, the {a} or the {b}?", "first"))
RELATION_SIDE_Y = ("Is the {a} above or below the {b}?",)
RELATION_SIDE_X = ("Is the {a} to the left or to the right of the {b}?",)
TEXT_READ = ("What text is written in the image?", "What does the text say?", "Read the text in the image.",
             "What letters or digits are written in the picture?", "What is written in the image?")
EXIST_BOTH = ("Is there {article} {colour} {shape} in the image?", "Do you see {article} {colour} {shape}?",
              "Is there {article} {colour} {shape}?", "Does the picture contain {article} {colour} {shape}?")
EXIST_SHAPE = ("Is there a {shape} in the image?", "Are there any {plural}?", "Do you see any {plural} in the picture?")
EXIST_TEXT = ("Is there any text in the image?", "Is something written in the picture?")


def ask(qtype: str, scene: Scene, rng: random.Random) -> QA | None:
    """A question of type `qtype` about `scene` with its exact answers, or None if the scene cannot support it."""
    return ASKERS[qtype](scene, rng)


# ---------------------------------------------------------------------------------------------- helpers


def count_answers(n: int) -> tuple[str, ...]:
    words = (NUMBER_WORDS[n],) if n < len(NUMBER_WORDS) else ()
    return (str(n), *words, *(("none", "no") if n == 0 else ()))


def colour_answers(colour: str) -> tuple[str, ...]:
    return (colour, *COLOUR_SYNONYMS.get(colour, ()))


def article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def reference(scene: Scene, obj: SceneObject) -> str | None:
    """The shortest name that picks exactly `obj` ("star" or "red star"), or None if none does."""
    same_shape = [o for o in scene.objects if o.shape == obj.shape]
    if len(same_shape) == 1:
        return obj.shape
    if sum(o.colour == obj.colour for o in same_shape) == 1:
        return f"{obj.colour} {obj.shape}"
    return None


def _name_answers(name: str) -> tuple[str, ...]:
    return (name, f"the {name}")


def _referable(scene: Scene) -> list[tuple[SceneObject, str]]:
    named = [(o, reference(scene, o)) for o in scene.objects]
    return [(o, name) for o, name in named if name is not None]


# ---------------------------------------------------------------------------------------------- askers


def ask_shape(scene: Scene, rng: random.Random) -> QA | None:
    if len(scene.objects) == 1:
        target, question = scene.objects[0], rng.choice(SHAPE_SINGLE)
    else:
        unique = [o for o in scene.objects if sum(p.colour == o.colour for p in scene.objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        question = rng.choice(SHAPE_BY_COLOUR).format(colour=target.colour)
    return QA("shape", question, (target.shape, f"a {target.shape}"))


def ask_colour(scene: Scene, rng: random.Random) -> QA | None:
    if len(scene.objects) == 1:
        target, question = scene.objects[0], rng.choice(COLOUR_SINGLE)
    else:
        unique = [o for o in scene.objects if sum(p.shape == o.shape for p in scene.objects) == 1]
        if not unique:
            return None
        target = rng.choice(unique)
        question = rng.choice(COLOUR_BY_SHAPE).format(shape=target.shape)
    return QA("colour", question, colour_answers(target.colour))


def ask_count(scene: Scene, rng: random.Random) -> QA:
    kind = rng.choice(("shape", "shape", "colour", "both", "all"))
    present = rng.random() < 0.8
    pick = rng.choice(scene.objects)
    shape = pick.shape if present else rng.choice(SHAPES)
    colour = pick.colour if present else rng.choice(sorted(COLOURS))
    if kind == "shape":
        n = sum(o.shape == shape for o in scene.objects)
        question = rng.choice(COUNT_BY_SHAPE).format(plural=PLURALS[shape])
    elif kind == "colour":
        n = sum(o.colour == colour for o in scene.objects)
        question = rng.choice(COUNT_BY_COLOUR).format(colour=colour)
    elif kind == "both":
        n = sum(o.shape == shape and o.colour == colour for o in scene.objects)
        question = rng.choice(COUNT_BY_BOTH).format(colour=colour, plural=PLURALS[shape])
    else:
        n, question = len(scene.objects), rng.choice(COUNT_ALL)
    return QA("count", question, count_answers(n))


def ask_position(scene: Scene, rng: random.Random) -> QA | None:
    axis = rng.choice("xy")
    middle, margin = scene.size / 2, POSITION_MARGIN * scene.size
    options = [(o, name) for o, name in _referable(scene) if abs(getattr(o, axis) - middle) >= margin]
    if not options:
        return None
    obj, name = rng.choice(options)
    first = getattr(obj, axis) < middle  # left / top
    if axis == "x":
        side = "left" if first else "right"
        question = rng.choice(POSITION_X).format(ref=name)
        return QA("position", question, (side, f"the {side}", f"on the {side}", f"{side} side"))
    side = "top" if first else "bottom"
    question = rng.choice(POSITION_Y).format(ref=name)
    return QA("position", question, (side, f"the {side}", f"at the {side}", f"{side} half"))


def ask_relation(scene: Scene, rng: random.Random) -> QA | None:
    axis = rng.choice("xy")
    margin = RELATION_MARGIN * scene.size
    named = _referable(scene)
    pairs = [(a, b) for a in named for b in named
             if a[0] is not b[0] and abs(getattr(a[0], axis) - getattr(b[0], axis)) >= margin]
    if not pairs:
        return None
    (a, a_name), (b, b_name) = rng.choice(pairs)
    a_first = getattr(a, axis) < getattr(b, axis)  # a is left of / above b
    if rng.random() < 0.3:
        template = rng.choice(RELATION_SIDE_X if axis == "x" else RELATION_SIDE_Y)
        if axis == "x":
            answers = ("left", "to the left") if a_first else ("right", "to the right")
        else:
            answers = ("above", "higher") if a_first else ("below", "lower", "under")
        return QA("relation", template.format(a=a_name, b=b_name), answers)
    template, wanted = rng.choice(RELATION_X if axis == "x" else RELATION_Y)
    winner = a_name if a_first == (wanted == "first") else b_name
    return QA("relation", template.format(a=a_name, b=b_name), _name_answers(winner))


def ask_text(scene: Scene, rng: random.Random) -> QA | None:
    if scene.text is None:
        return None
    text = scene.text.text
    return QA("text", rng.choice(TEXT_READ), (text, text.lower()) if text.lower() != text else (text,))


def ask_exist(scene: Scene, rng: random.Random) -> QA:
    kind = rng.choice(("both", "both", "shape", "text"))
    if kind == "text":
        return QA("exist", rng.choice(EXIST_TEXT), ("yes",) if scene.text is not None else ("no",))
    yes = rng.random() < 0.5
    if kind == "shape":
        present = sorted({o.shape for o in scene.objects})
        absent = [s for s in SHAPES if s not in present]
        shape = rng.choice(present if yes or not absent else absent)
        template = rng.choice(EXIST_SHAPE)
        return QA("exist", template.format(shape=shape, plural=PLURALS[shape]), _yes_no(shape in present))
    pairs = {(o.colour, o.shape) for o in scene.objects}
    if yes:
        colour, shape = rng.choice(sorted(pairs))
    else:
        colour, shape = _absent_pair(scene, rng, pairs)
    question = rng.choice(EXIST_BOTH).format(article=article(colour), colour=colour, shape=shape)
    return QA("exist", question, _yes_no((colour, shape) in pairs))


def _absent_pair(scene: Scene, rng: random.Random, pairs: set) -> tuple[str, str]:
    """A (colour, shape) pair not in the scene, preferring near misses (right shape, wrong colour or vice versa)."""
    obj = rng.choice(scene.objects)
    candidates = [(c, obj.shape) for c in sorted(COLOURS)] + [(obj.colour, s) for s in SHAPES]
    candidates = [p for p in candidates if p not in pairs]
    return rng.choice(candidates)


def ask_describe(scene: Scene, rng: random.Random) -> QA:
    from diffusionvl.data.describe import DESCRIBE_QUESTIONS, describe

    return QA("describe", rng.choice(DESCRIBE_QUESTIONS), (describe(scene),))


def _yes_no(value: bool) -> tuple[str, ...]:
    return ("yes",) if value else ("no",)


ASKERS: dict[str, Callable[[Scene, random.Random], QA | None]] = {
    "shape": ask_shape,
    "colour": ask_colour,
    "count": ask_count,
    "position": ask_position,
    "relation": ask_relation,
    "text": ask_text,
    "exist": ask_exist,
    "describe": ask_describe,
}
assert tuple(ASKERS) == QUESTION_TYPES
