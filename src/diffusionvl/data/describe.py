"""Scene descriptions: a long, checkable answer ("Describe the image.") where parallel decoding pays.

Contract:
- `describe(scene)` names every object once, left to right (ties: top to bottom), as
  "A red circle at the top left, a blue square at the centre and a green star at the bottom right." Positions are
  the image's 3 x 3 regions (thirds): "top left", "top", "top right", "left", "centre", "right", "bottom left",
  "bottom", "bottom right". Rendered text is not described. Pure function of the scene.
- `parse_description(text)` reads back the (colour, shape, region) triples a description names, in order, ignoring
  anything it cannot read (a model's output may be malformed). Plurals and number words ("two blue squares at the
  right") count as that many objects.
- `description_f1(text, scene)` matches predicted triples to the scene's objects one to one, as many as possible
  (a maximum matching, so neither the order of the description nor tolerance matches can cost a pair): a triple
  can match an object of the same colour and shape whose region is the named one, or whose centre lies within
  `REGION_TOLERANCE` of the image size of that region (a centre on a third line is both). It returns
  {"precision", "recall", "f1", "predicted", "objects", "matched"}; an empty prediction scores 0, and the scene's
  own `describe` scores 1.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from diffusionvl.data.scene import COLOURS, PLURALS, SHAPES, Scene, SceneObject

DESCRIBE_QUESTIONS = ("Describe the image.", "Describe the scene.", "What objects are in the image and where?",
                      "List every shape in the picture with its colour and position.")
ROWS = ("top", "", "bottom")
COLS = ("left", "", "right")
REGION_TOLERANCE = 0.04
_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4}


def region_name(row: int, col: int) -> str:
    return " ".join(w for w in (ROWS[row], COLS[col]) if w) or "centre"


REGIONS = tuple(region_name(r, c) for r in range(3) for c in range(3))


def _third(value: float, size: int) -> int:
    return min(2, int(3 * value / size))


def region(obj: SceneObject, size: int) -> str:
    return region_name(_third(obj.y, size), _third(obj.x, size))


def _regions_near(obj: SceneObject, size: int) -> set[str]:
    """Every region whose cell lies within the tolerance of the object's centre."""
    tol = REGION_TOLERANCE * size
    rows = {_third(min(max(obj.y + d, 0), size - 1), size) for d in (-tol, 0, tol)}
    cols = {_third(min(max(obj.x + d, 0), size - 1), size) for d in (-tol, 0, tol)}
    return {region_name(r, c) for r in rows for c in cols}


def describe(scene: Scene) -> str:
    objects = sorted(scene.objects, key=lambda o: (o.x, o.y))
    parts = [f"{'an' if o.colour[0] in 'aeiou' else 'a'} {o.colour} {o.shape} at the {region(o, scene.size)}"
             for o in objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{PLURALS[s]: s for s in SHAPES}}
_PATTERN = re.compile(
    r"\b(a|an|one|two|three|four)\s+(" + "|".join(sorted(COLOURS, key=len, reverse=True)) + r")\s+("
    + "|".join(sorted(_SHAPE_WORDS, key=len, reverse=True)) + r")\s+(?:at|in|on)\s+the\s+("
    + "|".join(sorted(REGIONS, key=len, reverse=True)) + r")\b")


def parse_description(text: str) -> list[tuple[str, str, str]]:
    triples = []
    for count, colour, shape, where in _PATTERN.findall(text.lower()):
        triples += [(colour, _SHAPE_WORDS[shape], where)] * _NUMBERS[count]
    return triples


def description_f1(text: str, scene: Scene | dict[str, Any]) -> dict[str, float]:
    if isinstance(scene, dict):
        scene = Scene.from_dict(scene)
    predicted = parse_description(text)
    near = [_regions_near(o, scene.size) for o in scene.objects]
    edges = [[j for j, o in enumerate(scene.objects) if (o.colour, o.shape) == (colour, shape) and where in near[j]]
             for colour, shape, where in predicted]
    matched = _max_matching(edges, len(scene.objects))
    precision = matched / len(predicted) if predicted else 0.0
    recall = matched / len(scene.objects) if scene.objects else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "predicted": len(predicted),
            "objects": len(scene.objects), "matched": matched}


def _max_matching(edges: list[list[int]], n_right: int) -> int:
    """Size of a maximum matching between left nodes i and right nodes `edges[i]` (Kuhn's augmenting paths)."""
    owner = [-1] * n_right

    def augment(i: int, seen: set[int]) -> bool:
        for j in edges[i]:
            if j not in seen:
                seen.add(j)
                if owner[j] < 0 or augment(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    return sum(augment(i, set()) for i in range(len(edges)))


def mean_f1(scores: Iterable[dict[str, float]]) -> dict[str, float]:
    rows = list(scores)
    n = max(1, len(rows))
    return {k: sum(r[k] for r in rows) / n for k in ("precision", "recall", "f1")}
