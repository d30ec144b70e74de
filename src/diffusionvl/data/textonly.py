"""Text-only questions with exact answers (no image), mixed in so a VLM keeps answering plain text prompts.

Contract: `text_qa(rng)` is a pure function of a `random.Random`; it returns a `QA` of type "arithmetic" (small
integer sums, differences and products; answers are the digits, plus the number word up to twenty) or "word"
(first / last letter, letter count, spelling backwards, the next weekday, opposites; lower-case answers).
"""

from __future__ import annotations

import random

from diffusionvl.data.questions import QA, count_answers

TEXT_TYPES = ("arithmetic", "word")
WORDS = ("apple", "house", "river", "garden", "window", "tiger", "pencil", "cloud", "bread", "music", "planet",
         "orange", "yellow", "circle", "square", "rabbit", "winter", "summer", "banana", "mountain", "ocean", "chair",
         "table", "forest", "candle", "bottle", "dragon", "lemon", "silver", "rocket")
DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "day": "night", "open": "closed", "fast": "slow",
             "light": "dark", "old": "new", "left": "right", "happy": "sad", "full": "empty", "early": "late"}


def text_qa(rng: random.Random) -> QA:
    return _arithmetic(rng) if rng.random() < 0.5 else _word(rng)


def _arithmetic(rng: random.Random) -> QA:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        value, question = a * b, rng.choice(("What is {a} times {b}?", "What is {a} * {b}?", "Multiply {a} by {b}."))
    elif op == "+":
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        value, question = a + b, rng.choice(("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}."))
    else:
        a, b = sorted((rng.randint(1, 60), rng.randint(1, 60)), reverse=True)
        value, question = a - b, rng.choice(("What is {a} minus {b}?", "What is {a} - {b}?",
                                             "Subtract {b} from {a}."))
    return QA("arithmetic", question.format(a=a, b=b), count_answers(value)[:2])


def _word(rng: random.Random) -> QA:
    kind = rng.choice(("first", "last", "length", "reverse", "day", "opposite"))
    word = rng.choice(WORDS)
    if kind == "first":
        return QA("word", f"What is the first letter of the word '{word}'?", (word[0],))
    if kind == "last":
        return QA("word", f"What is the last letter of the word '{word}'?", (word[-1],))
    if kind == "length":
        return QA("word", f"How many letters are in the word '{word}'?", count_answers(len(word))[:2])
    if kind == "reverse":
        return QA("word", f"Spell the word '{word}' backwards.", (word[::-1],))
    if kind == "day":
        day = rng.randrange(len(DAYS))
        return QA("word", f"Which day comes after {DAYS[day].capitalize()}?", (DAYS[(day + 1) % len(DAYS)],))
    word, opposite = rng.choice(sorted(OPPOSITES.items()))
    return QA("word", f"What is the opposite of '{word}'?", (opposite,))
