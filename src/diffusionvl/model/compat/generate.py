"""The DiffusionVL reference `generate` call, served by our block decoder.

Contract: `generate_compat(model, inputs, images=, image_grid_thws=, image_sizes=, gen_length=128, steps=4,
temperature=0.0, remasking_strategy="low_confidence_static", confidence_threshold=0.85, top_k=0, top_p=1.0,
block_size=None)` accepts what the reference quick start and its lmms-eval wrappers pass: token ids [N, L] from
the Qwen2.5-VL processor (image pad tokens already expanded) or LLaVA-style ids with one `LLAVA_IMAGE_INDEX` (-200)
per image, an optional `attention_mask` (0 = padding, any side), and the images as their processors return them:
Qwen2.5-VL pixel values + `image_grid_thws`, or, for composed (LLaVA-style, e.g. DiffusionVL-Qwen2.5) models,
per-image tile tensors + `image_sizes` ((width, height) each, needed by anyres layouts).
It returns a LongTensor [N, gen_length] of generated ids on the model's device, like the reference.

Mapping (`decode_config`): gen_length -> max_new_tokens; steps -> steps (capped at the block size: the reference
schedule gives the extra steps zero tokens); remasking_strategy low_confidence_static -> policy 'static',
low_confidence_dynamic -> 'threshold'; confidence_threshold tau -> threshold = the next float32 above tau, so our
`conf >= threshold` is exactly their `conf > tau` (tau >= 1 never fires: 'static'); temperature / top_k / top_p
unchanged; block_size None = the model's (their `bd3lm_block_size`).
Differences kept on purpose (docs/coming-from-diffusionvl.md): each sample stops at its own first stop token and
the rest of its row holds EOS (the reference stops the whole batch when any sample emits EOS and leaves the
undecoded blocks as mask ids); the mask token is never sampled; the finished block is committed inside the next
block's first step. Reference-only options that do not change decoding (max_new_tokens next to gen_length,
stopping_criteria, tokenizer, pad_token_id, use_cache; image_sizes for Qwen2.5-VL) are accepted and ignored.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from diffusionvl.backbone.adapters import Encoded
from diffusionvl.core.config import DecodeConfig
from diffusionvl.core.errors import DiffusionVLError, check

Tensor = torch.Tensor

REMASKING = {"low_confidence_static": "static", "low_confidence_dynamic": "threshold"}
LLAVA_IMAGE_INDEX = -200  # LLaVA's IMAGE_TOKEN_INDEX: a placeholder outside the vocabulary, one per image
IGNORED = frozenset({"max_new_tokens", "stopping_criteria", "tokenizer", "pad_token_id", "use_cache",
                     "position_ids", "modalities"})


def strictly_above(tau: float) -> float:
    """The smallest float32 above float32(tau): `conf >= strictly_above(tau)` <=> `conf > tau` for float32 conf."""
    t = torch.tensor(tau, dtype=torch.float32)
    return float(torch.nextafter(t, torch.tensor(float("inf"))))


def decode_config(gen_length: int = 128, steps: int = 4, temperature: float = 0.0,
                  remasking_strategy: str = "low_confidence_static", confidence_threshold: float = 0.85,
                  top_k: int = 0, top_p: float = 1.0, block_size: int | None = None, *, model_block_size: int,
                  seed: int | None = None, base: DecodeConfig | None = None) -> DecodeConfig:
    """Our DecodeConfig for the reference options (module docstring)."""
    check(remasking_strategy in REMASKING, f"unknown remasking_strategy {remasking_strategy!r}; choose one of "
                                           f"{', '.join(REMASKING)}")
    check(isinstance(steps, int) and steps >= 1, f"steps must be an integer >= 1, got {steps!r}")
    check(isinstance(gen_length, int) and gen_length >= 1, f"gen_length must be an integer >= 1, got {gen_length!r}")
    base = base or DecodeConfig()
    bsz = block_size if block_size is not None else model_block_size
    policy, threshold = REMASKING[remasking_strategy], base.threshold
    if policy == "threshold":
        check(isinstance(confidence_threshold, (int, float)) and 0.0 <= confidence_threshold,
              f"confidence_threshold must be >= 0, got {confidence_threshold!r}")
        if confidence_threshold >= 1.0:
            policy = "static"  # `conf > tau` never holds: the reference takes the top-k every step
        else:
            threshold = strictly_above(float(confidence_threshold))
    return dataclasses.replace(
        base, decoder="block", max_new_tokens=gen_length, block_size=bsz,
        steps=min(steps, bsz) if isinstance(bsz, int) else steps, policy=policy, threshold=threshold,
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        seed=seed if seed is not None else base.seed).validate()


def _expand_placeholders(rows: list[list[int]], image_id: int, per_image: list[int]) -> list[list[int]]:
    """Replace each LLaVA placeholder (-200) by as many image pad ids as that image has tokens (images in order)."""
    if not any(LLAVA_IMAGE_INDEX in r for r in rows):
        return rows
    check(not any(image_id in r for r in rows), "mix of LLaVA image placeholders (-200) and expanded image tokens")
    out, k = [], 0
    for row in rows:
        new: list[int] = []
        for t in row:
            if t != LLAVA_IMAGE_INDEX:
                new.append(t)
                continue
            check(k < len(per_image), "more image placeholders (-200) in the input ids than images")
            new += [image_id] * per_image[k]
            k += 1
        out.append(new)
    return out


def _images_per_sample(rows: list[list[int]], image_id: int, per_image: list[int]) -> list[int]:
    counts, k = [], 0
    for i, row in enumerate(rows):
        need, first = sum(t == image_id for t in row), k
        while need > 0 and k < len(per_image):
            need, k = need - per_image[k], k + 1
        check(need == 0, f"sample {i}: its image tokens do not add up to whole images")
        counts.append(k - first)
    check(k == len(per_image), f"{len(per_image)} images given but the input ids hold tokens for {k}")
    return counts


def _grids(value: Any) -> Tensor:
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
        value = torch.cat([g.view(-1, 3) for g in value])
    return torch.as_tensor(value).long().view(-1, 3).cpu()


def _qwen_vl_images(model: Any, images: Any, image_grid_thws: Any) -> tuple[dict[str, Any], list[int], Tensor]:
    """Qwen2.5-VL pixels + grids -> (vision tensors, visual tokens per image, grids [I, 3])."""
    check(image_grid_thws is not None, "image_grid_thws is required with images (the processor's image_grid_thw)")
    pixels = torch.cat(list(images)) if isinstance(images, (list, tuple)) else images
    grids = _grids(image_grid_thws)  # [I, 3]
    merge = int(model.hf_model.config.vision_config.spatial_merge_size)
    vision = {"pixel_values": pixels.to(model.device), "image_grid_thw": grids.to(model.device)}
    return vision, (grids.prod(-1) // merge ** 2).tolist(), grids


def _llava_images(model: Any, images: Any, image_sizes: Any) -> tuple[dict[str, Any], list[int]]:
    """LLaVA-style images of a composed VLM -> (vision tensors, visual tokens per image).

    `images`: a list with one tensor per image ([tiles, 3, S, S], or [3, S, S] for one tile), or one tensor
    ([N, 3, S, S]: N one-tile images; [N, tiles, 3, S, S]), as their `process_images` returns; `image_sizes`: the
    images' (width, height), needed for anyres layouts."""
    per = list(images) if isinstance(images, (list, tuple)) or images.dim() in (4, 5) else [images]
    per = [im.unsqueeze(0) if im.dim() == 3 else im for im in per]  # each [tiles, 3, S, S]
    check(all(im.dim() == 4 for im in per), "images must be pixel tensors [tiles, 3, S, S] (one per image)")
    tiles = [int(im.shape[0]) for im in per]
    vision: dict[str, Any] = {"pixel_values": torch.cat(per).to(model.device)}
    layout = model.hf_model.config.image_layout
    if layout.is_default:
        return vision, model.processor.image_token_counts([(0, 0)] * len(per), tiles)
    check(image_sizes is not None, "image_sizes (each image's (width, height)) is required with these images")
    sizes = [(int(w), int(h)) for w, h in torch.as_tensor(image_sizes).view(-1, 2).tolist()]
    check(len(sizes) == len(per), f"{len(per)} images given but {len(sizes)} image_sizes")
    vision.update(image_sizes=torch.tensor(sizes, dtype=torch.long), image_tiles=torch.tensor(tiles, dtype=torch.long))
    return vision, model.processor.image_token_counts(sizes, tiles)


def encoded_from_ids(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None, images: Any = None,
                     image_grid_thws: Any = None, image_sizes: Any = None) -> Encoded:
    """Reference-style tensors -> our `Encoded` batch (unpadded ids per sample, vision tensors, images per sample)."""
    ids = input_ids.view(1, -1) if input_ids.dim() == 1 else input_ids  # [N, L]
    check(ids.dim() == 2 and not ids.is_floating_point(), "inputs must be token ids, a LongTensor [batch, length]")
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.view_as(ids).bool()
    rows = [row[m].tolist() for row, m in zip(ids.cpu(), valid.cpu())]
    adapter = model.adapter
    if images is None:
        check(not any(LLAVA_IMAGE_INDEX in r for r in rows), "the input ids hold image placeholders but no images")
        return Encoded(input_ids=rows, images_per_sample=[0] * len(rows))
    check(adapter.has_vision, f"this {model.hf_model.config.model_type} model has no vision encoder: drop images")
    grids = None
    if hasattr(model.hf_model.config, "image_layout"):  # a composed (LLaVA-style) VLM
        vision, per_image = _llava_images(model, images, image_sizes)
    else:
        vision, per_image, grids = _qwen_vl_images(model, images, image_grid_thws)
    rows = _expand_placeholders(rows, adapter.image_token_id, per_image)
    counts = _images_per_sample(rows, adapter.image_token_id, per_image)
    if grids is not None:
        vision["image_grid_thw_per_sample"] = list(torch.split(grids, counts))
    return Encoded(input_ids=rows, vision=vision, images_per_sample=counts)


def as_reference_tensor(token_ids: list[list[int]], gen_length: int, fill_id: int, device: Any) -> Tensor:
    """Per-sample answers (stop token excluded) -> [N, gen_length], each row's tail (from its stop on) = fill_id."""
    out = torch.full((len(token_ids), gen_length), fill_id, dtype=torch.long)
    for i, ids in enumerate(token_ids):
        out[i, : len(ids)] = torch.tensor(ids[:gen_length], dtype=torch.long)
    return out.to(device)


def generate_compat(model: Any, prompts: Any = None, *, inputs: Tensor | None = None, images: Any = None,
                    image_grid_thws: Any = None, image_sizes: Any = None, attention_mask: Tensor | None = None,
                    gen_length: int = 128,
                    steps: int = 4, temperature: float = 0.0, remasking_strategy: str = "low_confidence_static",
                    confidence_threshold: float = 0.85, top_k: int = 0, top_p: float = 1.0,
                    block_size: int | None = None, seed: int | None = None, config: DecodeConfig | None = None,
                    **extra: Any) -> Tensor:
    """The reference `model.generate(inputs=..., images=..., image_grid_thws=..., gen_length=..., steps=...,
    temperature=..., remasking_strategy=...)` -> LongTensor [N, gen_length] (module docstring)."""
    from diffusionvl.decoding import run_encoded

    check(prompts is None or inputs is None, "give the input ids once (positionally or as inputs=)")
    ids = inputs if inputs is not None else prompts
    if not isinstance(ids, Tensor):
        raise DiffusionVLError("the DiffusionVL-style generate (inputs=/gen_length=) takes token ids as a LongTensor; "
                               "for text prompts call model.generate(prompt, max_new_tokens=...)")
    unknown = sorted(set(extra) - IGNORED)
    check(not unknown, f"unknown generation option(s): {', '.join(unknown)}")
    check("video" not in (extra.get("modalities") or []), "video inputs are not supported by generate_compat")
    cfg = decode_config(gen_length, steps, temperature, remasking_strategy, confidence_threshold, top_k, top_p,
                        block_size, model_block_size=model.config.block_size, seed=seed, base=config)
    encoded = encoded_from_ids(model, ids, attention_mask, images, image_grid_thws, image_sizes)
    was_training = model.training
    model.eval()
    try:
        final = None
        for event in run_encoded(model, encoded, cfg):
            final = event
    finally:
        model.train(was_training)
    return as_reference_tensor(final.output.token_ids, gen_length, model.eos_token_id, model.device)
