"""Tokens by name, and token ids -> text as they arrive: one way to do each, for every layer above.

Contract:
- `find_token_id(tokenizer, name)`: the id of the token spelled exactly `name`, or None (never the unknown-token
  id); `end_of_turn_token(tokenizer)`: the special token that closes an assistant turn in the chat template.
- `MAX_CHARS_PER_TOKEN`: no tokenizer packs more characters than this into one token on average over a prompt,
  so text longer than `tokens * MAX_CHARS_PER_TOKEN` cannot fit `tokens` and is refused unread (server, CLI).
- `control_tokens(model)`: a pattern of the special tokens that carry chat structure, as spelled in text;
  `refuse_control_tokens(pattern, texts)`: the one rule, for the server and the CLI alike, that user text holding
  one of them is refused (one line naming where and which).
- `Detokenizer`: one sequence's growing ids -> the text deltas that can no longer change. `text(ids)` decodes
  (special tokens skipped); `delta(text, final, hold=0)` returns what is new since the last delta, holding back a
  trailing incomplete character (U+FFFD) and `hold` more characters until `final`. The concatenated deltas are a
  prefix of the final text; when a tokenizer rewrites text it already emitted (rare), nothing more is streamed and
  the final text stays authoritative.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

from diffusionvl.core.errors import DiffusionVLError

# SmolLM2's longest tokens are runs of 64-81 spaces: 128 characters a token on average over a whole prompt is more
# than any tokenizer packs.
MAX_CHARS_PER_TOKEN = 128


def find_token_id(tokenizer: Any, name: str) -> int | None:
    """Id of the token spelled exactly `name`, or None (never the unknown-token id)."""
    vocab = tokenizer.get_vocab()
    return int(vocab[name]) if name in vocab else None


def special_tokens(tokenizer: Any) -> set[str]:
    """Every special or added token of `tokenizer`, as spelled in text (parsed as one token wherever it appears)."""
    return {t for t in set(getattr(tokenizer, "all_special_tokens", None) or [])
            | set(getattr(tokenizer, "added_tokens_encoder", None) or {}) if t}


def control_tokens(model: Any) -> re.Pattern[str] | None:
    """A pattern matching, as spelled in text, the special tokens of `model` (a DiffusionVLModel: tokenizer,
    processor, config.mask_token, adapter) that carry chat structure: those the chat template writes (<|im_start|>,
    <|im_end|>, <|vision_start|><|image_pad|>...), end of text, the mask token and the image placeholder; or None.
    Prompts are tokenized with special tokens parsed, so user text holding one would forge turns or image slots.
    Leftover specials with no role (SmolLM2's <filename>, <jupyter_code>...) stay ordinary text."""
    tok = model.tokenizer
    templates = " ".join(t for t in (getattr(tok, "chat_template", None),
                                     getattr(getattr(model, "processor", None), "chat_template", None))
                         if isinstance(t, str))
    roles = {name for name in special_tokens(tok) if name in templates}
    roles |= {getattr(tok, "eos_token", None), getattr(model.config, "mask_token", None)}
    image_id = getattr(model.adapter, "image_token_id", None) if getattr(model.adapter, "has_vision", False) else None
    if isinstance(image_id, int):
        roles.add(tok.convert_ids_to_tokens(image_id))
    names = sorted((n for n in roles if isinstance(n, str) and n), key=len, reverse=True)
    return re.compile("|".join(map(re.escape, names))) if names else None


def refuse_control_tokens(pattern: re.Pattern[str] | None, texts: Iterable[tuple[str, str]]) -> None:
    """A one-line DiffusionVLError for the first (where, text) whose text holds a control token of `pattern`."""
    for where, text in texts if pattern is not None else ():
        found = pattern.search(text)
        if found is not None:
            raise DiffusionVLError(f"{where}: the text holds the model's control token {found.group(0)!r} (it would "
                                   "be read as chat structure, not as text); remove it")


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
