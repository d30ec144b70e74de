"""Answer templates: literal text the answer must contain, and masked slots the decoder fills. The one place a
template is parsed, tokenized and laid onto the canvas.

Contract:
- Syntax: literal text plus slots `<mask:N>` (N masked tokens, 1 <= N <= the model's context). A `<mask:N>` is
  filled with exactly N tokens; the answer ends where the template ends. Any other `<word:...>` tag, a malformed
  `<mask...>` and a control token of the model (backbone.tokens, as for prompts) are refused in one line.
  `parse(text)` -> `Template` (its parts in order: `str` literal, `int` slot size).
- `tokenize(template, tokenizer, mask_id, prompt_text)` -> the answer's token ids with `mask_id` at every slot
  position (a position is masked iff its id is the mask id). Literal text is tokenized as the chat template would
  place it: the first literal as the continuation of the rendered prompt `prompt_text` (the ids of prompt + text
  minus the ids of the prompt, when the prompt's ids are a prefix of them), later literals on their own (what
  precedes them is a slot, not known yet).
- `encode_templates(model, texts, prompt_texts, prompt_lengths)` does both for a batch (None = no template for that
  sample); `check_fit` refuses a template that cannot fit the context after its prompt.
- `place(layout, templates, eos_id)` writes each template onto its sample's generation slots: template ids from the
  sample's first generated slot, then `eos_id` (the block padding the model was trained with, DiffusionConfig
  eos_token) on every later slot, so a template's answer ends with that token and the rest of its last block is
  what training put there. Rows with a template are marked in `Layout.templated`; the decoders never sample a stop
  token there (a slot gets exactly N tokens). Fixed positions are not the mask id, so the block decoder treats them
  as it treats a prompt's leftover tokens: committed before the block's first step, never remasked.
- `budget(template)`: the generated tokens a templated sample has, its closing `eos_id` included; `slot_runs`: where
  its slots are (GenerationOutput.slots holds the text each run of slot positions was filled with).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from diffusionvl.backbone.tokens import control_tokens, refuse_control_tokens
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.decoding.layout import Layout

SLOT = re.compile(r"<mask:(\d+)>")
TAG = re.compile(r"<\s*([A-Za-z_]\w*)\s*(?::[^<>\n]*)?>")  # <word> or <word:...>: a tag, known or not
SYNTAX = "write literal text and <mask:N> slots, e.g. 'There are <mask:1> objects.'"


@dataclass
class Template:
    text: str
    parts: list[str | int]  # literal text, or the size of a slot

    @property
    def slots(self) -> int:
        return sum(p for p in self.parts if isinstance(p, int))


def _literal(text: str) -> str:
    """A literal stretch of a template: refused if it holds a tag (`<mask>` without a size, `<slot:3>`...)."""
    tag = TAG.search(text)
    if tag is not None and tag.group(1).lower() == "mask":
        raise DiffusionVLError(f"template: malformed slot {tag.group(0)!r}; a slot is <mask:N> with N a whole number "
                               "of tokens >= 1")
    if tag is not None and ":" in tag.group(0):
        raise DiffusionVLError(f"template: unknown tag {tag.group(0)!r}; the only tag is <mask:N> ({SYNTAX})")
    return text


def parse(text: str, context: int | None = None) -> Template:
    """`text` -> its parts; one-line errors for an empty template, a slot size outside 1..context, an unknown tag."""
    check(isinstance(text, str) and text != "", f"template: empty; {SYNTAX}")
    parts: list[str | int] = []
    at = 0
    for m in SLOT.finditer(text):
        if m.start() > at:
            parts.append(_literal(text[at:m.start()]))
        n = int(m.group(1)) if len(m.group(1)) <= 12 else 10 ** 12
        top = context if context else 10 ** 12
        check(1 <= n <= top, f"template: slot {m.group(0)[:24]!r} is out of range; N must be 1..{top}"
                             + (" (the model's context)" if context else ""))
        parts.append(n)
        at = m.end()
    if at < len(text):
        parts.append(_literal(text[at:]))
    return Template(text, parts)


def _ids(tokenizer: Any, text: str, **kwargs: Any) -> list[int]:
    return [int(t) for t in tokenizer(text, **kwargs)["input_ids"]]


def tokenize(template: Template, tokenizer: Any, mask_id: int, prompt_text: str | None = None) -> list[int]:
    """The answer's ids, `mask_id` at every slot position (module docstring: how literals are tokenized)."""
    ids: list[int] = []
    for i, part in enumerate(template.parts):
        if isinstance(part, int):
            ids += [mask_id] * part
            continue
        piece = _ids(tokenizer, part, add_special_tokens=False)
        if i == 0 and prompt_text:
            special = not getattr(tokenizer, "chat_template", None)
            before = _ids(tokenizer, prompt_text, add_special_tokens=special)
            both = _ids(tokenizer, prompt_text + part, add_special_tokens=special)
            if both[:len(before)] == before:
                piece = both[len(before):]
        ids += piece
    return ids


def slot_runs(template: list[int], mask_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of slot positions in a tokenized template (adjacent slots read as one run)."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(template):
        if t != mask_id:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def tokenize_text(text: str, tokenizer: Any, mask_id: int, context: int | None,
                  prompt_text: str | None = None) -> list[int]:
    """`parse` then `tokenize` one template text (control tokens are the caller's check)."""
    ids = tokenize(parse(text, context), tokenizer, mask_id, prompt_text)
    check(len(ids) > 0, f"template: {text[:40]!r} has no tokens; {SYNTAX}")
    return ids


def budget(template: list[int]) -> int:
    """Generated tokens of a templated answer: the template and the closing end-of-answer token."""
    return len(template) + 1


def encode_templates(model: Any, texts: list[str | None], prompt_texts: list[str | None] | None,
                     prompt_lengths: list[int]) -> list[list[int] | None]:
    """Parse and tokenize each sample's template (module docstring); None stays None. One-line errors."""
    check(len(texts) == len(prompt_lengths), f"template: {len(texts)} templates for {len(prompt_lengths)} prompts; "
                                             "give one per prompt (None for a free answer)")
    context = model.max_positions
    pattern = control_tokens(model)
    out: list[list[int] | None] = []
    for i, text in enumerate(texts):
        if text is None:
            out.append(None)
            continue
        check(isinstance(text, str), f"template: must be text, got {type(text).__name__}")
        refuse_control_tokens(pattern, [("template", text)])
        out.append(tokenize_text(text, model.tokenizer, model.mask_token_id, context,
                                 prompt_texts[i] if prompt_texts else None))
    check_fit(model, [[0] * n for n in prompt_lengths], out)
    return out


def check_fit(model: Any, prompts: list[list[int]], templates: list[list[int] | None]) -> None:
    """One line for a template (and its closing token) that does not fit the context after its prompt."""
    context = model.max_positions
    check(len(templates) == len(prompts), f"template: {len(templates)} templates for {len(prompts)} prompts")
    for prompt, ids in zip(prompts, templates):
        if ids is not None and context and len(prompt) + budget(ids) > context:
            raise DiffusionVLError(f"template too long: {len(ids)} tokens after a {len(prompt)}-token prompt exceed "
                                   f"the model's context of {context} positions; shorten the template or the prompt")


def place(layout: Layout, templates: list[list[int] | None], eos_id: int) -> Layout:
    """Write each template (and its closing `eos_id` run) onto the sample's generation slots, in place."""
    starts = layout.gen_start.tolist()
    rows = torch.zeros(len(starts), dtype=torch.bool)
    for i, ids in enumerate(templates):
        if ids is None:
            continue
        g0 = starts[i]
        check(g0 + len(ids) < layout.total, "template: the canvas is shorter than the template (internal budget)")
        layout.tokens[i, g0:g0 + len(ids)] = torch.tensor(ids, dtype=torch.long)
        layout.tokens[i, g0 + len(ids):] = eos_id
        rows[i] = True
    layout.templated = rows
    return layout
