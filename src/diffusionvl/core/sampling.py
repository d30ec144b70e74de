"""Token sampling and unmasking policies, vectorized over the batch (no host syncs, no per-row loops).

Contract: `sample` turns logits into a candidate token and its confidence at every position; a *policy* (from the
`POLICIES` registry) decides which masked positions take their candidate this step. Greedy (temperature 0) uses
argmax and the model's probability of it; sampling uses the Gumbel-max trick on the filtered, tempered
distribution (same law as `torch.multinomial`, but graph-capturable) and reports that distribution's probability.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf everything outside the top-k and outside the top-p nucleus. logits: [..., V] float."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - torch.softmax(sorted_logits, dim=-1)) >= top_p  # keep the first token always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample(logits: Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Candidate tokens and confidences. logits: [..., V] -> (tokens [...] long, confidence [...] float)."""
    logits = logits.float()
    if temperature == 0.0:
        probs = torch.softmax(logits, dim=-1)
        conf, tokens = probs.max(dim=-1)
        return tokens, conf
    filtered = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(filtered, dim=-1)
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp_(1e-20, 1.0)
    gumbel = -torch.log(-torch.log(u))
    tokens = (filtered + gumbel).argmax(dim=-1)
    conf = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, conf


def transfer_schedule(block_size: int, steps: int) -> list[int]:
    """How many tokens the static policy fills at each of `steps` steps (an even split of the block)."""
    base, extra = divmod(block_size, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def _top_k_masked(conf: Tensor, is_mask: Tensor, k: Tensor | int) -> Tensor:
    """The k most confident masked positions of each row (all of them if fewer). conf/is_mask: [N, B]."""
    score = conf.masked_fill(~is_mask, float("-inf"))
    order = torch.argsort(score, dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                             .expand_as(order))
    return is_mask & (rank < k)


Policy = Callable[[Tensor, Tensor, "Tensor | int", float], Tensor]
POLICIES: dict[str, Policy] = {}


def register_policy(name: str) -> Callable[[Policy], Policy]:
    def deco(fn: Policy) -> Policy:
        POLICIES[name] = fn
        return fn

    return deco


@register_policy("static")
def static_policy(conf: Tensor, is_mask: Tensor, k: Tensor | int, threshold: float) -> Tensor:
    """Fill the k most confident masked positions (reference: low_confidence_static)."""
    return _top_k_masked(conf, is_mask, k)


@register_policy("threshold")
def threshold_policy(conf: Tensor, is_mask: Tensor, k: Tensor | int, threshold: float) -> Tensor:
    """Fill every masked position with confidence >= threshold, and at least the static k
    (reference: low_confidence_dynamic; the union equals its either/or rule)."""
    return _top_k_masked(conf, is_mask, k) | (is_mask & (conf >= threshold))
