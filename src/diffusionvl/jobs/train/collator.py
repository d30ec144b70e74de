"""Encoded samples -> one right-padded training batch in the format of `DiffusionVLModel.training_loss`.

Contract: `Collator(pad_id, block_size, adapter)(items)` returns
    input_ids [N, L] (pad id after each sample), labels [N, L] (-100 on padding), attention_mask [N, L],
    position_ids [P, N, L] (the adapter's own positions, M-RoPE included; 0 on padding),
    position [N] (each sample's place in its global batch: keys the masking noise),
    the processor's vision tensors (Qwen-VL: pixel_values, image_grid_thw), images of all samples in order, and
    image_grid_thw_per_sample (one [k, 3] per sample, k = 0 for text-only samples), only when the batch has images,
    segment_ids, context_ids [N, L] long, only when a sample is a packed row (train/packing.py): each piece of a
      packed row gets the positions it has alone (the prefix's, then its own restarting after the prefix),
    meta: plain-Python bookkeeping (dataset indices, skipped / truncated samples, token counts, segments) for the
      trainer.
L is the longest sample rounded up to a multiple of the block size. Runs on CPU in the DataLoader workers, so the
per-sample work (positions) stays off the training step.
"""

from __future__ import annotations

from typing import Any

import torch

from diffusionvl.core import objective

Tensor = torch.Tensor


class Collator:
    def __init__(self, pad_id: int, block_size: int, adapter: Any = None):
        self.pad_id = pad_id
        self.block_size = block_size
        self.adapter = adapter

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        samples = [it["sample"] for it in items]
        n = len(samples)
        lengths = [int(s.input_ids.numel()) for s in samples]
        length = -(-max(lengths) // self.block_size) * self.block_size
        ids = torch.full((n, length), self.pad_id, dtype=torch.long)
        labels = torch.full((n, length), objective.IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, s in enumerate(samples):
            ids[i, : lengths[i]], labels[i, : lengths[i]], mask[i, : lengths[i]] = s.input_ids, s.labels, 1
        batch: dict[str, Any] = {"input_ids": ids, "labels": labels, "attention_mask": mask,
                                 "position": torch.tensor([it["position"] for it in items], dtype=torch.long)}
        batch.update(self._vision(samples))
        if any(s.segment is not None for s in samples):
            batch.update(self._segments(samples, lengths, length))
        if self.adapter is not None:
            batch["position_ids"] = self._positions(ids, lengths, batch, samples)
        batch["meta"] = {
            "indices": [it["index"] for it in items],
            "skipped": [s for it in items for s in it["skipped"]],
            "truncated": [it["index"] for it, s in zip(items, samples) if s.truncated],
            "tokens": int(sum(lengths)),
            "segments": sum(max(1, len(s.pieces)) for s in samples),
        }
        return batch

    @staticmethod
    def _segments(samples: list[Any], lengths: list[int], length: int) -> dict[str, Tensor]:
        """segment_ids / context_ids [N, L]: a packed row's own, 1 on an unpacked sample, 0 on padding."""
        seg = torch.zeros(len(samples), length, dtype=torch.long)
        ctx = torch.zeros_like(seg)
        for i, s in enumerate(samples):
            seg[i, : lengths[i]] = s.segment if s.segment is not None else 1
            ctx[i, : lengths[i]] = s.context if s.context is not None else 1
        return {"segment_ids": seg, "context_ids": ctx}

    def _vision(self, samples: list[Any]) -> dict[str, Any]:
        """The vision tensors of the samples with images in sample order (images along dim 0), batched as the
        adapter says (zero-padded where tiles or sizes differ: adapters.Adapter.collate_vision)."""
        with_images = [s.vision for s in samples if s.vision]
        if not with_images:
            return {}
        if self.adapter is not None:
            out: dict[str, Any] = self.adapter.collate_vision(with_images)
        else:
            out = {k: torch.cat([v[k] for v in with_images]) for k in with_images[0]}
        if "image_grid_thw" in out:  # per-sample grids for M-RoPE positions ([0, 3] for text-only samples)
            out["image_grid_thw_per_sample"] = [s.vision.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
                                                for s in samples]
        return out

    def _positions(self, ids: Tensor, lengths: list[int], batch: dict[str, Any], samples: list[Any]) -> Tensor:
        """[P, N, L] positions from the adapter, sample by sample (0 on padding); each piece of a packed row gets
        the positions of [prefix ; piece] laid out alone."""
        vision = {k: batch[k] for k in ("image_grid_thw_per_sample",) if k in batch}
        pos = torch.zeros(self.adapter.position_dims, *ids.shape, dtype=torch.long)
        for i, (n, s) in enumerate(zip(lengths, samples)):
            pieces = s.pieces or [(0, n)]
            for start, size in pieces:
                alone = torch.cat([ids[i, : s.prefix], ids[i, start: start + size]]).tolist()
                p, _ = self.adapter.prompt_positions(alone, vision or None, i)
                pos[:, i, : s.prefix] = p[:, : s.prefix]
                pos[:, i, start: start + size] = p[:, s.prefix:]
        return pos
