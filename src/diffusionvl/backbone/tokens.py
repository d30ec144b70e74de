"""Tokens by name, and token ids -> text as they arrive: one way to do each, for every layer above.

Contract:
- `find_token_id(tokenizer, name)`: the id of the token spelled exactly `name`, or None (never the unknown-token
  id); `end_of_turn_token(tokenizer)`: the special token that closes an assistant turn in the chat template.
- `Detokenizer`: one sequence's growing ids -> the text deltas that can no longer change. `text(ids)` decodes
  (special tokens skipped); `delta(text, final, hold=0)` returns what is new since the last delta, holding back a
  trailing incomplete character (U+FFFD) and `hold` more characters until `final`. The concatenated deltas are a
  prefix of the final text; when a tokenizer rewrites text it already emitted (rare), nothing more is streamed and
  the final text stays authoritative.
"""

from __future__ import annotations

from typing import Any


def find_token_id(tokenizer: Any, name: str) -> int | None:
    """Id of the token spelled exactly `name`, or None (never the unknown-token id)."""
    vocab = tokenizer.get_vocab()
    return int(vocab[name]) if name in vocab else None


def special_tokens(tokenizer: Any) -> set[str]:
    """Every special or added token of `tokenizer`, as spelled in text (parsed as one token wherever it appears)."""
    return {t for t in set(getattr(tokenizer, "all_special_tokens", None) or [])
            | set(getattr(tokenizer, "added_tokens_encoder", None) or {}) if t}


def end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token that closes an assistant turn in the chat template (e.g. <|im_end|>), if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    marker = "Zq7xW"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
    except Exception:  # noqa: BLE001 - templates that need other roles / content formats
        return None
    tail = text[text.find(marker) + len(marker):]
    specials = sorted(special_tokens(tokenizer), key=len, reverse=True)
    best = None
    for tok in specials:
        at = tail.find(tok)
        if tok and at >= 0 and (best is None or at < best[0]):
            best = (at, tok)
    return best[1] if best else None


class Detokenizer:
    """One sequence's ids -> text deltas (module docstring)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.emitted = ""

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def delta(self, text: str, final: bool, hold: int = 0) -> str:
        if not final:
            text = text.rstrip("\ufffd")  # an incomplete character may still change
            text = text[: len(text) - hold]
        if not text.startswith(self.emitted):
            return ""
        new, self.emitted = text[len(self.emitted):], text
        return new
