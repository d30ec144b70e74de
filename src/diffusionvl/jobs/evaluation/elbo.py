"""Likelihood evaluation of a block-diffusion model: the negative ELBO (NELBO) of reference tokens.

Contract: for a batch of scored sequences (`encode_scored`: plain texts, every token scored; or a prompt with an
answer as the assistant turn, the answer tokens scored), `nelbo(model, batch, levels, generator)` returns each
sample's NELBO in nats and its number of scored tokens. The BD3 NELBO of a sequence is
    sum over blocks b of  integral_0^1 (1/t) E[ sum over masked tokens i of block b of -log p(x_i | x_t^b, x_<b) ] dt,
estimated by the midpoint rule at fixed noise levels t_k = (k + 1/2) / K with one seeded masking draw per level;
every block shares the level (the blocks' terms are independent given t, so this is the same integral).
NELBO / tokens bounds the per-token negative log-likelihood from above, so exp(NELBO / tokens) is an upper bound
on perplexity. With B = 1 and the 'shift' prediction every token is predicted from the clean tokens before it, so
at t = 1 this is exactly the AR next-token cross entropy (tested).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from diffusionvl.backbone.prompts import Conversation, to_conversation
from diffusionvl.core import objective
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.evaluation.tasks import Sample

Tensor = torch.Tensor


def noise_levels(k: int) -> list[float]:
    """Midpoint-rule noise levels (k + 1/2) / K, k = 0..K-1."""
    if k < 1:
        raise DiffusionVLError(f"noise levels must be >= 1, got {k}")
    return [(i + 0.5) / k for i in range(k)]


def _cut_at_end(ids: list[int], end_id: int, include_end: bool) -> list[int]:
    if end_id in ids:
        k = ids.index(end_id)
        return ids[: k + 1] if include_end else ids[:k]
    return ids


def _answer_suffix(model: Any, prompt: Conversation, answer: str) -> str:
    """The chat-template text that follows the generation prompt when `answer` is the assistant turn."""
    head = model.adapter.render(prompt, add_generation_prompt=True)
    full = Conversation(prompt.messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                        prompt.images)
    text = model.adapter.render(full, add_generation_prompt=False)
    if not text.startswith(head):
        raise DiffusionVLError("the chat template renders the answer turn in a way that changes the prompt; "
                               "score plain texts ({'text'} lines) instead")
    return text[len(head):]


def encode_scored(model: Any, samples: list[Sample], include_end: bool = True,
                  images: list[Any] | None = None) -> dict[str, Any]:
    """Right-padded training-format batch (input_ids, labels, attention_mask, vision) of scored sequences.

    All samples must be of one kind: plain texts (`sample.text`) or question + answer. `images[i]` is sample i's
    loaded image, a list of images, or None.
    """
    tok = model.tokenizer
    rows: list[tuple[list[int], list[int]]] = []
    vision: dict[str, Any] = {}
    if all(s.text is not None for s in samples):
        for s in samples:
            ids = list(map(int, tok(s.text)["input_ids"]))
            rows.append((ids, list(ids)))
    elif all(s.text is None for s in samples):
        images = images or [None] * len(samples)
        per_sample = [im if isinstance(im, (list, tuple)) else ([] if im is None else [im]) for im in images]
        prompts = [to_conversation([{"role": "user", "content": s.question}], list(ims) or None)
                   for s, ims in zip(samples, per_sample)]
        encoded = model.adapter.encode(prompts)
        vision = encoded.vision
        for s, conv, prompt_ids in zip(samples, prompts, encoded.input_ids):
            answer = tok(_answer_suffix(model, conv, s.answers[0]), add_special_tokens=False)["input_ids"]
            answer = _cut_at_end(list(map(int, answer)), model.eos_token_id, include_end)
            rows.append((prompt_ids + answer, [objective.IGNORE_INDEX] * len(prompt_ids) + answer))
    else:
        raise ValueError("encode_scored needs samples of one kind (texts or answers)")
    length = max(len(ids) for ids, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, length), model.pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), objective.IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask, **vision}


@torch.inference_mode()
def nelbo(model: Any, batch: dict[str, Any], levels: list[float],
          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Per-sample NELBO in nats [N] and scored-token counts [N] (module docstring)."""
    device = model.device
    batch = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in batch.items()}
    prep = model.prepare_batch(batch)
    x0, labels = prep["x0"], prep["labels"]
    n, length = x0.shape
    bsz = model.config.block_size
    rows = objective.prediction_index(length, bsz, model.config.prediction, x0.device)  # [L]
    total = torch.zeros(n, dtype=torch.float64, device=x0.device)
    for t in levels:
        rates = torch.full((n, -(-length // bsz)), float(t), device=x0.device)
        x_t, masked, _ = objective.noise_tokens(x0, labels, rates, bsz, model.mask_token_id, generator)
        where = masked.nonzero()  # [M, 2]
        if where.shape[0] == 0:
            continue
        hidden = model.bd3_hidden(x_t, prep)  # [N, 2L, D]
        logits = model.adapter.head(hidden[where[:, 0], rows[where[:, 1]]])  # [M, V]
        ce = F.cross_entropy(logits.float(), x0[masked], reduction="none")  # [M]
        total.index_add_(0, where[:, 0], (ce / t).double())
    counts = (labels != objective.IGNORE_INDEX).sum(dim=1)  # [N]
    return (total / len(levels)).cpu(), counts.cpu()
