"""Watching a VLM learn to look, while it trains: image dependence and accuracy per question type.

Contract:
- `roll_images(batch)` returns the same collated batch with every sample's image replaced by the next sample's
  (rolled by one across the batch), or None when that is not well defined (a sample without exactly one image,
  images of different shapes). The eval loss on it minus the eval loss on the right images is the *image
  dependence*: about 0 for a model that ignores the picture, clearly positive for one that reads it.
- `GroundingProbe(path, limit)` loads the first `limit` questions of an eval JSONL (image, question, answers, type;
  `diffusionvl eval --task jsonl` format) and `probe(model, objective)` answers them as written, without the jsonl
  task's short-answer instruction (AR decoding for an AR model, block threshold decoding for a BD3 one) and returns {"accuracy": overall, "accuracy/<type>": ...}.
Nothing here writes files or steps an optimizer; the trainer logs what these return.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusionvl.core.config import DecodeConfig
from diffusionvl.jobs.evaluation.runner import EvalConfig, evaluate, load_samples

Tensor = torch.Tensor


def roll_images(batch: dict[str, Any]) -> dict[str, Any] | None:
    """The batch with images rolled by one sample (module docstring), or None."""
    n = batch["input_ids"].shape[0]
    pixels = batch.get("pixel_values")
    if n < 2 or pixels is None:
        return None
    grids = batch.get("image_grid_thw")
    if grids is not None:  # Qwen-VL style: patches of all images concatenated; equal grids roll by whole images
        if grids.shape[0] != n or not bool((grids == grids[:1]).all()):
            return None
        per_image = pixels.shape[0] // n
        return {**batch, "pixel_values": torch.roll(pixels, per_image, dims=0)}
    if pixels.shape[0] != n or batch.get("image_tiles") is not None:
        return None
    return {**batch, "pixel_values": torch.roll(pixels, 1, dims=0)}


class GroundingProbe:
    """Held-out short questions answered at every eval (module docstring)."""

    def __init__(self, path: str, limit: int):
        self.task, samples = load_samples(EvalConfig(task="jsonl", data=path).validate())
        self.samples = samples[:limit]

    @torch.no_grad()
    def probe(self, model: Any, objective: str) -> dict[str, float]:
        block = model.config.block_size
        decode = (DecodeConfig(decoder="ar", max_new_tokens=16) if objective == "ar" else
                  DecodeConfig(decoder="block", policy="threshold", steps=block, threshold=0.9, max_new_tokens=16))
        cfg = EvalConfig(task="jsonl", batch_size=16, prompt_suffix="").validate()  # asked as the data asks them
        was_training = model.training
        model.eval()
        try:
            summary, _ = evaluate(model, self.samples, self.task, cfg, decode, progress=False)
        finally:
            model.train(was_training)
        out = {"accuracy": float(summary["accuracy"])}
        out.update({f"accuracy/{k}": float(v["accuracy"]) for k, v in summary["per_type"].items()})
        return out
