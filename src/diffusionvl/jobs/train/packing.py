"""Packed training rows: the independent questions of one record as isolated segments over one shared prefix.

Contract (`PackingEncoder(encoder)(record) -> EncodedSample`, a drop-in for `SampleEncoder`):
- A record with k > 1 user/assistant turn pairs whose images all sit in its first user turn (LLaVA's layout) is
  split into k single-turn conversations, each with all of the record's images and the record's system turn, and
  each is encoded alone by the wrapped encoder (same template, labels and block-aligned EOS as without packing;
  the record's images are decoded once and shared by the k encodings).
  No question can read another's text or answer: they are independent samples that share a picture.
- The shared prefix is the longest run of tokens the k encodings start with, cut before the token that precedes
  the first loss token (so every segment starts on a prompt token and the AR shift never crosses a segment) and
  rounded down to a multiple of the encoder's alignment (B for BD3, 1 for AR). It must hold every image token.
- The row is [prefix ; rest_1 ; ... ; rest_k] with `segment` = 1 on the prefix and i + 1 on rest_i, `context` = 1
  everywhere (every segment may read the prefix, core/masks.py). Each rest_i is a whole number of blocks, so the
  block rules see each segment exactly as they see it alone. `pieces` lists each segment's (start, length) in
  the row; the collator gives each piece the positions it has alone (positions restart after the prefix).
- Segments that would take the row past the encoder's length limit are left out (the first always stays).
  A record that cannot be split this way is encoded unchanged (one segment).
Result: each segment's loss in the packed row equals its loss as a sample of its own (tests/test_packing.py),
while the image and the template are paid once per picture.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from diffusionvl.core import objective
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.core.media import load_image
from diffusionvl.jobs.train.data import Record, SampleError
from diffusionvl.jobs.train.encode import EncodedSample, SampleEncoder

Tensor = torch.Tensor


def split_turns(record: Record) -> list[Record] | None:
    """One single-turn record per user/assistant pair, or None when the record is not in the packable layout."""
    system = [m for m in record.messages if m["role"] == "system"]
    turns = [m for m in record.messages if m["role"] != "system"]
    if len(turns) < 4 or len(turns) % 2 or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
        return None
    if any(p["type"] == "image" for m in turns[1:] for p in m["content"]):
        return None  # images after the first user turn: questions are not about one shared picture
    images = [p for p in turns[0]["content"] if p["type"] == "image"]
    out = []
    for j in range(0, len(turns), 2):
        text = [p for p in turns[j]["content"] if p["type"] != "image"]
        user = {"role": "user", "content": images + text}
        out.append(Record(system + [user, turns[j + 1]], record.images, f"{record.where} (question {j // 2 + 1})"))
    return out


def shared_prefix(encoded: list[EncodedSample], align: int) -> int:
    """Length of the prefix the encodings share, cut before the first loss token's predecessor, a multiple of
    `align`."""
    first_loss = min(int((e.labels != objective.IGNORE_INDEX).nonzero()[0, 0]) for e in encoded)
    shortest = min(int(e.input_ids.numel()) for e in encoded)
    limit = min(first_loss - 1, shortest)
    ids = torch.stack([e.input_ids[:limit] for e in encoded])  # [k, limit]
    differs = (ids != ids[:1]).any(dim=0).nonzero()
    common = int(differs[0, 0]) if differs.numel() else limit
    return max(0, common) // align * align


class PackingEncoder:
    """Record -> one packed EncodedSample (module docstring). Wraps a SampleEncoder."""

    def __init__(self, encoder: SampleEncoder):
        self.encoder = encoder
        self.align = encoder.align
        self.limit = encoder.limit
        self.image_token_id = encoder.image_token_id

    def __call__(self, record: Record) -> EncodedSample:
        parts = split_turns(record)
        if parts is None:
            return self.encoder(record)
        try:  # the shared pictures are read and decoded once per record, not once per question
            images = [load_image(source) for source in record.images]
        except DiffusionVLError as exc:
            raise SampleError("bad image", str(exc)) from None
        encoded = [self.encoder(dataclasses.replace(p, images=images)) for p in parts]
        if any(e.truncated for e in encoded):
            raise SampleError("too long", "a question of the record is longer than max_length on its own")
        p = shared_prefix(encoded, self.align)
        if self.image_token_id is not None and any(bool((e.input_ids[p:] == self.image_token_id).any())
                                                   for e in encoded):
            return self.encoder(record)  # the questions do not share the image tokens as a prefix
        return self._pack(encoded, p)

    def _pack(self, encoded: list[EncodedSample], p: int) -> EncodedSample:
        ids, labels = [encoded[0].input_ids[:p]], [encoded[0].labels[:p]]
        segment, pieces, used = [torch.ones(p, dtype=torch.long)], [], p
        for i, e in enumerate(encoded):
            rest = int(e.input_ids.numel()) - p
            if pieces and used + rest > self.limit:
                continue
            pieces.append((used, rest))
            ids.append(e.input_ids[p:])
            labels.append(e.labels[p:])
            segment.append(torch.full((rest,), i + 2, dtype=torch.long))
            used += rest
        seg = torch.cat(segment)
        return EncodedSample(torch.cat(ids), torch.cat(labels), encoded[0].vision, segment=seg,
                             context=torch.ones_like(seg), prefix=p, pieces=pieces)
