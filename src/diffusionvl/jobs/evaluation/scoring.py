"""Answer scoring: normalized exact match with answer variants, multiple-choice letter extraction, ANLS.

Contract: pure functions of strings (no model, no I/O), each returning a score in [0, 1]:
- `exact_match(prediction, answers)`: 1 if the normalized prediction equals any normalized answer variant
  (VQA-style normalization: lower case, punctuation dropped except inside numbers, articles a/an/the dropped,
  whitespace collapsed; a trailing period and a leading "answer:" are ignored).
- `contains_match(prediction, answers)`: 1 if some normalized answer appears in the normalized prediction as whole
  words (a lenient companion for chatty models; reported next to exact match, never instead of it).
- `extract_choice(prediction, choices)` -> the option letter a free-form answer picks ("B", "(B)", "B.",
  "Answer: B", "the answer is B", or the text of exactly one option), else None; `choice_match` scores it
  against the answer letter (or the answer's option text).
- `anls(prediction, answers, threshold=0.5)`: Average Normalized Levenshtein Similarity of one sample: the best
  1 - edit_distance / max_len over the answers, 0 when that distance ratio is >= threshold (DocVQA / ST-VQA).
`SCORERS` maps a metric name (`exact`, `choice`, `anls`) to `(prediction, answers, choices) -> float`.
The `describe` metric (`DESCRIBE`, synth-vqa "Describe the image." samples) is not in `SCORERS`: it needs the
scene, not answer strings. `score_description(prediction, scene)` returns object-level precision / recall / F1
(`diffusionvl.data.describe.description_f1`: parsed (colour, shape, region) triples matched one to one to the
scene's objects, a region within `REGION_TOLERANCE` of a third line counting as either side).
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable, Mapping, Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = re.compile("[" + re.escape(string.punctuation.replace("'", "")) + "]")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")
_DECIMAL = re.compile(r"(?<=\d)\.(?=\d)")
_LEAD = re.compile(r"^\s*(the\s+)?(final\s+)?answer\s*(is|:)\s*", re.IGNORECASE)


def normalize_answer(text: str) -> str:
    """VQA-style normalization (module docstring)."""
    text = _LEAD.sub("", str(text).strip()).lower()
    text = _DECIMAL.sub("\0", _THOUSANDS.sub("", text))  # 1,000 -> 1000; protect the point of 3.5
    text = _PUNCT.sub(" ", text).replace("'", "").replace("\0", ".")
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def contains_match(prediction: str, answers: Sequence[str]) -> float:
    pred = f" {normalize_answer(prediction)} "
    return float(any(norm and f" {norm} " in pred for norm in (normalize_answer(a) for a in answers)))


def choice_letters(n: int) -> list[str]:
    return [chr(ord("A") + i) for i in range(n)]


_LETTER_PATTERNS = [re.compile(p) for p in (
    r"^\s*\(?([A-Z])\)?\s*$",  # "B", "(B)"
    r"^\s*\(([A-Z])\)",  # "(B) a cat"
    r"^\s*([A-Z])[.:)](?:\s|$)",  # "B.", "B)", "B: a cat" (not "A.M.")
    r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?\(?([A-Z])\)?(?![\w'])",  # "answer: B", "answer is (B)"
    r"(?i:option|choice)\s*\(?([A-Z])\)?(?![\w'])",  # "option B"
)]


def extract_choice(prediction: str, choices: Sequence[str] | None = None, n_choices: int | None = None) -> str | None:
    """The option letter a free-form prediction picks, or None (module docstring)."""
    n = len(choices) if choices else (n_choices or 26)
    letters = set(choice_letters(n))
    text = str(prediction).strip()
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(text)
        if m and m.group(1) in letters:
            return m.group(1)
    if choices:
        pred = normalize_answer(text)
        hits = [letter for letter, c in zip(choice_letters(n), choices)
                if normalize_answer(c) and (pred == normalize_answer(c) or f" {normalize_answer(c)} " in f" {pred} ")]
        if len(hits) == 1:
            return hits[0]
    return None


def choice_match(prediction: str, answers: Sequence[str], choices: Sequence[str] | None = None) -> float:
    """1 if the extracted letter is the answer's letter (answers hold letters or the correct option's text)."""
    picked = extract_choice(prediction, choices)
    if picked is None:
        return 0.0
    targets = set()
    for a in answers:
        a = str(a).strip()
        if len(a.strip("()")) == 1 and a.strip("()").upper().isalpha():
            targets.add(a.strip("()").upper())
        elif choices:
            targets.update(letter for letter, c in zip(choice_letters(len(choices)), choices)
                           if normalize_answer(c) == normalize_answer(a))
    return float(picked in targets)


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions), O(len(a) * len(b)) time, O(len(b)) memory."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    pred = " ".join(str(prediction).lower().split())
    best = 0.0
    for answer in answers:
        gold = " ".join(str(answer).lower().split())
        longest = max(len(pred), len(gold))
        if longest == 0:
            return 1.0
        ratio = levenshtein(pred, gold) / longest
        best = max(best, 1.0 - ratio if ratio < threshold else 0.0)
    return best


Scorer = Callable[[str, Sequence[str], "Sequence[str] | None"], float]
SCORERS: dict[str, Scorer] = {
    "exact": lambda pred, answers, choices: exact_match(pred, answers),
    "choice": choice_match,
    "anls": lambda pred, answers, choices: anls(pred, answers),
}

DESCRIBE = "describe"


def score_description(prediction: str, scene: Mapping[str, Any]) -> dict[str, float]:
    """{"precision", "recall", "f1", "predicted", "objects", "matched"} of a description against a Scene dict."""
    from diffusionvl.data.describe import description_f1

    return description_f1(prediction, dict(scene))
