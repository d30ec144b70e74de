"""One record -> training ids, labels on exactly the assistant tokens, and the sample's vision tensors.

Contract (`SampleEncoder(model, max_length, overlong)(record) -> EncodedSample`):
- The text is the model's own chat template (`model.adapter.render`) of the conversation up to its last assistant
  turn; VLMs are tokenized by their processor (which inserts the image tokens, and for some families layout tokens
  around them), exactly as at inference; labels follow each token through that expansion (`expansion_index`).
- Assistant spans are found by rendering prefixes: assistant turn j starts where the render of the turns before
  it with the generation prompt ends, and ends after the last end-of-turn token (`model.eos_token_id`) inside the
  render of the turns up to it. Tokens overlapping a span (fast-tokenizer offsets) are loss tokens; everything
  else is -100: system/user text, image tokens, the template's role headers. Text after the final end-of-turn
  token (e.g. "\\n") is dropped. A template whose prefixes are not prefixes of the full render is a SampleError.
- A sample whose answer does not end with the end-of-answer token gets one appended; then, for the BD3 objective,
  block-aligned EOS (`objective.pad_to_block`: EOS as input and label up to a multiple of the block size B). The AR
  objective gets no block padding (`objective="ar"`: alignment 1): padding EOS would be supervised tokens that carry
  nothing, and a one-word answer would be 1/8 of its sample's loss.
- Length: the limit is `max_length` rounded down to a multiple of B. Longer samples are either cut at the limit
  (`overlong="truncate"`; no EOS is added to a cut answer; a cut through an image, or no answer token left, is a
  SampleError) or are a SampleError (`overlong="skip"`).
- The text part (render, tokenize, label) depends on the messages alone and is remembered per encoder (each
  DataLoader worker holds its own) for later epochs, up to TEXT_MEMO_BYTES; images are read and processed
  every time.
Problems with one sample raise `SampleError` (counted and skipped by the dataset), never a crash.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from diffusionvl.backbone.prompts import Conversation, to_conversation
from diffusionvl.core import objective
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train.data import Record, SampleError

Tensor = torch.Tensor
IGNORE = objective.IGNORE_INDEX
TEXT_MEMO_BYTES = 1 << 28  # text encodings kept for later epochs: 256 MB (keys, texts, int32 ids + labels)
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


@dataclass
class EncodedSample:
    input_ids: Tensor  # [L] long, L a multiple of B
    labels: Tensor  # [L] long, -100 off the loss tokens
    vision: dict[str, Tensor] = field(default_factory=dict)  # e.g. pixel_values [P, C], image_grid_thw [k, 3]
    truncated: bool = False
    segment: Tensor | None = None  # [L] long: packed rows only (train/packing.py), else one segment
    context: Tensor | None = None  # [L] long: the prefix segment each token may read
    prefix: int = 0  # packed rows: tokens of the shared prefix
    pieces: list[tuple[int, int]] = field(default_factory=list)  # packed rows: (start, length) of each segment


def assistant_spans(render: Any, conv: Conversation, eos_text: str) -> tuple[str, list[tuple[int, int]]]:
    """(text up to the final end-of-turn token, [start, end) character spans of the assistant turns)."""
    messages = conv.messages
    turns = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    last = turns[-1]

    def rendered(k: int, generation_prompt: bool) -> str:
        n_images = sum(1 for m in messages[:k] for p in m["content"] if p["type"] == "image")
        try:
            return render(Conversation(messages[:k], conv.images[:n_images]), generation_prompt)
        except DiffusionVLError:
            raise
        except Exception as exc:  # noqa: BLE001 - a template that rejects this conversation
            raise SampleError("chat template failed", str(exc).splitlines()[0][:120]) from None

    full = rendered(last + 1, False)
    spans = []
    for j in turns:
        prefix, upto = rendered(j, True), rendered(j + 1, False)
        if not (full.startswith(prefix) and full.startswith(upto) and len(prefix) <= len(upto)):
            raise SampleError("chat template not prefix-consistent", f"turn {j} renders differently in context")
        at = upto.rfind(eos_text, len(prefix)) if eos_text else -1
        end = at + len(eos_text) if at >= 0 else len(upto.rstrip())
        spans.append((len(prefix), max(end, len(prefix))))
    return full[: spans[-1][1]], spans


def span_mask(offsets: Tensor, spans: list[tuple[int, int]]) -> Tensor:
    """Tokens whose character range [start, end) overlaps any span: [T] bool. offsets: [T, 2]."""
    sp = torch.tensor(spans, dtype=torch.long).view(-1, 2)  # [S, 2]
    start, end = offsets[:, :1], offsets[:, 1:]  # [T, 1]
    overlap = (end > sp[None, :, 0]) & (start < sp[None, :, 1]) & (end > start)  # [T, S]
    return overlap.any(dim=1)


def expansion_index(ids: Tensor, expanded: Tensor, image_token_id: int) -> Tensor:
    """Where each token of `ids` (the plain tokenizer's) sits in `expanded` (the processor's ids): [T] long, -1 at
    the image placeholders.

    A processor turns each image placeholder into its image's tokens, plus, for some families, layout tokens around
    and between them (InternVL's <img>, Idefics3's tile tags, Pixtral's [IMG_BREAK]); everything else must come
    through unchanged and in order, which is matched exactly (the text between placeholders, as a whole)."""
    def chars(xs: Any) -> str:
        return "".join(chr(0x1000 + int(x)) for x in xs)

    where = (ids == image_token_id).nonzero().flatten().tolist()
    bounds = [-1, *where, int(ids.numel())]
    pieces = [ids[a + 1:b] for a, b in zip(bounds[:-1], bounds[1:])]
    image = re.escape(chr(0x1000 + image_token_id))
    pattern = f"(?:.*?{image}.*?)".join(f"({re.escape(chars(piece))})" for piece in pieces)
    found = re.fullmatch(pattern, chars(expanded), re.S)
    if found is None:
        raise SampleError("image tokens mismatch", "the processor's ids differ from the tokenizer's beyond images")
    index = torch.full((int(ids.numel()),), -1, dtype=torch.long)
    for j, (a, piece) in enumerate(zip(bounds[:-1], pieces)):
        index[a + 1:a + 1 + len(piece)] = torch.arange(found.start(j + 1), found.end(j + 1))
    return index


class SampleEncoder:
    """Record -> EncodedSample for one model (module docstring). Holds the model's template and tokenizer."""

    def __init__(self, model: Any, max_length: int, overlong: str = "truncate", objective: str = "bd3"):
        tok = model.tokenizer
        if not getattr(tok, "is_fast", False):
            raise DiffusionVLError("training needs a fast (Rust) tokenizer for exact assistant-token labels; "
                                   "save the model with a tokenizer.json")
        self.render = model.adapter.render
        self.tokenizer = tok
        self.processor = model.processor if model.adapter.has_vision else None
        self.image_token_id = model.adapter.image_token_id if model.adapter.has_vision else None
        self.placeholder_id = model.adapter.image_placeholder_id if model.adapter.has_vision else None
        self.eos_id = model.eos_token_id
        self.eos_text = tok.decode([self.eos_id])
        self.block = model.config.block_size
        self.align = self.block if objective == "bd3" else 1  # block-aligned EOS is for BD3 only
        self.limit = max(self.block, max_length // self.block * self.block)
        self.overlong = overlong
        self.add_special = not bool(getattr(tok, "chat_template", None))
        self._memo: dict[str, tuple[str, Tensor, Tensor]] = {}  # messages -> text encoding (_text)
        self._memo_bytes = 0

    def __call__(self, record: Record) -> EncodedSample:
        try:
            conv = to_conversation(record.messages, record.images or None)
        except DiffusionVLError as exc:  # a corrupt / unreadable image
            raise SampleError("bad image", str(exc)) from None
        text, ids, labels = self._text(record, conv)
        vision: dict[str, Tensor] = {}
        if self.processor is not None:
            try:
                out = self.processor(text=[text], images=conv.images or None, return_tensors="pt")
            except DiffusionVLError as exc:
                raise SampleError("processor rejected the sample", str(exc)) from None
            except Exception as exc:  # noqa: BLE001 - e.g. an image with an extreme aspect ratio
                raise SampleError("processor rejected the sample", str(exc).splitlines()[0][:160]) from None
            expanded = out["input_ids"][0][out["attention_mask"][0].bool()]
            index = expansion_index(ids, expanded, self.placeholder_id)
            keep = index >= 0
            placed = torch.full_like(expanded, IGNORE)
            placed[index[keep]] = labels[keep]
            ids, labels = expanded, placed
            if conv.images:  # every image tensor the processor gives (Qwen-VL: pixel_values, image_grid_thw)
                vision = {k: v for k, v in out.items() if k not in TEXT_KEYS and isinstance(v, torch.Tensor)}
        return self._finish(ids, labels, vision)

    def _text(self, record: Record, conv: Conversation) -> tuple[str, Tensor, Tensor]:
        """(rendered text, token ids [T], labels [T]) of the conversation before any image expansion: a function of
        the messages alone (images are placeholders in them), remembered for later epochs up to TEXT_MEMO_BYTES
        in all (rendering the template three times and tokenizing was half of a short sample's encoding)."""
        key = json.dumps(record.messages, sort_keys=True, default=str)
        hit = self._memo.get(key)
        if hit is not None:
            return hit[0], hit[1].long(), hit[2].long()
        text, spans = assistant_spans(self.render, conv, self.eos_text)
        enc = self.tokenizer(text, add_special_tokens=self.add_special, return_offsets_mapping=True)
        ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # [T]
        labels = torch.where(span_mask(torch.tensor(enc["offset_mapping"]).view(-1, 2), spans), ids, IGNORE)
        size = len(key) + len(text) + 8 * int(ids.numel())
        if self._memo_bytes + size <= TEXT_MEMO_BYTES:
            self._memo[key] = (text, ids.int(), labels.int())
            self._memo_bytes += size
        return text, ids, labels

    def _finish(self, ids: Tensor, labels: Tensor, vision: dict[str, Tensor]) -> EncodedSample:
        if labels[-1] != self.eos_id:  # a template without an end-of-turn token: end the answer explicitly
            eos = ids.new_tensor([self.eos_id])
            ids, labels = torch.cat([ids, eos]), torch.cat([labels, eos])
        id_list, label_list = objective.pad_to_block(ids.tolist(), labels.tolist(), self.align, self.eos_id)
        ids, labels = torch.tensor(id_list), torch.tensor(label_list)
        if ids.numel() <= self.limit:
            return EncodedSample(ids, labels, vision)
        if self.overlong == "skip":
            raise SampleError("too long", f"{ids.numel()} tokens > max_length {self.limit}")
        if self.image_token_id is not None and bool((ids[self.limit:] == self.image_token_id).any()):
            raise SampleError("too long", f"cutting at max_length {self.limit} would cut an image")
        ids, labels = ids[: self.limit], labels[: self.limit]
        if not bool((labels != IGNORE).any()):
            raise SampleError("too long", f"no answer token within max_length {self.limit}")
        return EncodedSample(ids, labels, vision, truncated=True)
