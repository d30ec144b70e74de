"""DiffusionVLModel: a Hugging Face AR backbone used as a block-diffusion model.

Contract: wraps (never forks) a transformers model and its tokenizer/processor. The backbone's weights and
architecture are unchanged; what is added is a mask token (looked up by name), the BD3 training objective
(`training_loss`) and block decoding (`generate`, `stream`, with `decoder="ar"` and `decoder="full"` baselines on
the same weights). Special token ids (mask, EOS/stop, pad) are resolved once, by name, at construction.

Training batch (what the collator produces; all [N, L], right padded):
    input_ids   clean ids x0 (block-aligned EOS already appended to each sample)
    labels      x0 on loss (assistant) tokens, -100 elsewhere
    attention_mask  1 on real tokens, 0 on batch padding
    pixel_values / image_grid_thw / image_grid_thw_per_sample   (vision models, images in sample order)
    image_sizes / image_tiles   (composed VLMs with variable-resolution images: (width, height), tiles per image)
    ... and whatever else the adapter's `vision_keys` name (pixel_attention_mask, batch_num_images, ...)
    position_ids    optional [P, N, L]; computed by the adapter when absent
    segment_ids / context_ids   optional [N, L] long: packed rows (several isolated segments and shared prefixes,
                    core/masks.py; built by train/packing.py); absent = one segment per row
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffusionvl.backbone.adapters import Adapter, adapter_class
from diffusionvl.backbone.prompts import normalize_batch
from diffusionvl.backbone.tokens import end_of_turn_token, find_token_id
from diffusionvl.core import attention, masks, objective
from diffusionvl.core.atomic import check_target, write_folder
from diffusionvl.core.config import DecodeConfig, DiffusionConfig
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.decoding import GenerationOutput, run

Tensor = torch.Tensor


@dataclass
class LossOutput:
    loss: Tensor
    metrics: dict[str, float]
    per_sample: Tensor | None = None  # [N] each row's mean over its loss tokens
    per_segment: Tensor | None = None  # [N, L + 1] each packed segment's mean, indexed by segment id


class DiffusionVLModel(nn.Module):
    def __init__(self, hf_model: nn.Module, processor: Any, config: DiffusionConfig):
        super().__init__()
        self.hf_model = hf_model
        self.processor = processor
        self.config = config.validate()
        self.adapter: Adapter = adapter_class(hf_model.config.model_type)(hf_model, processor)
        tok = self.tokenizer
        mask_id = find_token_id(tok, config.mask_token)
        if mask_id is None:
            raise DiffusionVLError(f"mask token {config.mask_token!r} is not in the tokenizer; convert the model first "
                                   "(diffusionvl convert) or pass the right mask_token")
        self.mask_token_id = mask_id
        eos_name = config.eos_token or end_of_turn_token(tok) or tok.eos_token
        eos_id = find_token_id(tok, eos_name) if eos_name else None
        if eos_id is None:
            raise DiffusionVLError("cannot determine the end-of-answer token; set eos_token when converting")
        self.eos_token_id = eos_id
        gen_eos = getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None)
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
        self.stop_token_ids = sorted({eos_id, *gen_eos, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
        self.autoregressive_only = False  # True for an AR parent: every decode then uses the AR decoder (decoding/)
        self.train(hf_model.training)  # mirror the wrapped model's mode: generate() restores it afterwards

    # ---- basic properties ----------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.adapter.input_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        return getattr(self.adapter.text_config, "max_position_embeddings", None)

    def check_prompt_lengths(self, prompts: list[list[int]], max_new_tokens: int,
                             block_size: int | None = None) -> None:
        """One-line errors for an empty prompt, a prompt + budget over the context, and (block decoding) a canvas over
        it: the block decoder lays prompt + budget out in whole blocks, up to ceil((prompt + budget) / B) * B
        positions, and would build attention masks for positions the model has not got."""
        if any(len(p) == 0 for p in prompts):
            raise DiffusionVLError("empty prompt: give at least one token of text")
        limit = self.max_positions
        longest = max(len(p) for p in prompts)
        if limit and longest + max_new_tokens > limit:
            raise DiffusionVLError(f"prompt too long: {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                                   f"model's context of {limit} positions; shorten the prompt or max_new_tokens")
        canvas = -(-(longest + max_new_tokens) // block_size) * block_size if block_size else 0
        if limit and canvas > limit:
            raise DiffusionVLError(f"block size {block_size} lays the {longest}-token prompt and max_new_tokens "
                                   f"{max_new_tokens} out over {canvas} positions, more than the model's context of "
                                   f"{limit}; use a smaller block size or fewer tokens")

    # ---- training ------------------------------------------------------------------------------------------------
    def positions_for(self, input_ids: Tensor, valid: Tensor, vision: dict[str, Any] | None) -> Tensor:
        """[P, N, L] positions of a right-padded batch (padding slots get 0)."""
        n, length = input_ids.shape
        pos = torch.zeros(self.adapter.position_dims, n, length, dtype=torch.long)
        for i in range(n):
            ids = input_ids[i][valid[i]].tolist()
            p, _ = self.adapter.prompt_positions(ids, vision, i)
            pos[:, i, : len(ids)] = p
        return pos.to(input_ids.device)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Normalize a training batch: bool validity, positions, length padded to a multiple of B."""
        x0, labels = batch["input_ids"], batch["labels"].clone()
        valid = batch.get("attention_mask", torch.ones_like(x0)).bool()
        vision = {k: batch[k] for k in self.adapter.vision_keys if k in batch}
        positions = batch.get("position_ids")
        if positions is None:
            positions = self.positions_for(x0, valid, vision)
        segment, context = masks.default_segments(valid, batch.get("segment_ids"), batch.get("context_ids"))
        x0, labels, valid, positions, segment, context = _pad_to_multiple(
            x0, labels, valid, positions, segment, context, self.config.block_size, self.pad_token_id)
        if self.config.prediction == "shift":
            labels[:, 0] = objective.IGNORE_INDEX  # token 0 has no predecessor to predict it
        return {"x0": x0, "labels": labels, "valid": valid, "positions": positions, "vision": vision,
                "segment": segment, "context": context}

    def bd3_hidden(self, x_t: Tensor, prepared: dict[str, Any]) -> Tensor:
        """The 2L training forward: hidden states [N, 2L, D] of [x_t ; x0] under the BD3 mask."""
        x0, valid, positions = prepared["x0"], prepared["valid"], prepared["positions"]
        embeds, residuals = self.embed_pair(x_t, x0, prepared["vision"])  # [N, 2L, D], [K, N, 2L, D] | None
        text_cfg = self.adapter.text_config
        groups = self.adapter.image_groups(x0) if prepared["vision"] else None  # [N, L] | None
        if groups is not None:  # open only what a decoder's prefill holds: a prompt's complete blocks
            groups = masks.open_groups(groups, prepared["labels"], self.config.block_size)
        mask = attention.bd3_training_masks(valid, self.config.block_size, text_cfg, text_cfg, embeds.dtype,
                                            prepared["segment"], prepared["context"], groups)
        return self.adapter.run_decoder(embeds, mask, torch.cat([positions, positions], dim=-1), residuals=residuals)

    def training_loss(self, batch: dict[str, Any], generator: torch.Generator | None = None,
                      rates: Tensor | None = None, draw: Tensor | None = None, norm: str = "sample") -> LossOutput:
        """One BD3 forward on a batch (module docstring) -> 1/t-weighted masked CE and metrics.

        `rates` [N, L/B] and `draw` [N, L] (L = the batch length, a multiple of B) replace the random masking rates
        and masking uniforms drawn from `generator` (the trainer passes split-invariant ones). `norm` is how token
        losses are averaged (objective.reduce_units: per sample, per packed segment, or per token)."""
        cfg = self.config
        if self.training and torch.is_grad_enabled():
            cfg.bd3_trained = True  # a BD3 training step: what is saved from now on is no fresh conversion
        prep = self.prepare_batch(batch)
        x0, labels = prep["x0"], prep["labels"]
        n, length = x0.shape
        if rates is None:
            rates = objective.sample_block_rates(n, length // cfg.block_size, cfg.noise_eps, cfg.antithetic,
                                                 generator, x0.device)
        x_t, masked, t = objective.noise_tokens(x0, labels, rates, cfg.block_size, self.mask_token_id, generator,
                                                draw)
        hidden = self.bd3_hidden(x_t, prep)  # [N, 2L, D]
        rows = objective.prediction_index(length, cfg.block_size, cfg.prediction, x0.device)  # [L]
        where = masked.nonzero()  # [M, 2]
        logits = self.adapter.head(hidden[where[:, 0], rows[where[:, 1]]])  # [M, V]: lm_head on masked rows only
        ce = F.cross_entropy(logits.float(), x0[masked], reduction="none") / t[masked]  # [M]
        out = self._reduce(ce, where, prep, norm)
        n_loss = int((labels != objective.IGNORE_INDEX).sum())
        out.metrics.update(loss_tokens=float(n_loss), masked_tokens=float(where.shape[0]),
                           mask_rate=float(where.shape[0]) / max(n_loss, 1))
        return out

    @staticmethod
    def _reduce(values: Tensor, where: Tensor, prep: dict[str, Any], norm: str) -> LossOutput:
        """Per-token losses at positions `where` [M, 2] -> LossOutput averaged as `norm` says."""
        segment, labels = prep["segment"], prep["labels"]
        sums, counts = objective.unit_losses(values, where[:, 0], segment[where[:, 0], where[:, 1]], labels, segment)
        loss, per_sample, per_segment = objective.reduce_units(sums, counts, norm)
        return LossOutput(loss, {}, per_sample, per_segment)

    def ar_loss(self, batch: dict[str, Any], norm: str = "sample") -> LossOutput:
        """Next-token cross entropy of the same backbone (AR instruction tuning before translation), averaged as
        `norm` says (objective.reduce_units; 'sample': each sample's mean over its loss tokens, averaged over the
        batch). Same batch format as `training_loss`, packed rows included."""
        prep = self.prepare_batch(batch)
        x0, labels, valid, vision = prep["x0"], prep["labels"], prep["valid"], prep["vision"]
        feats = self.adapter.image_features(vision) if vision else None
        embeds = self.adapter.embed(x0, features=feats) if feats is not None else self.adapter.input_embeddings()(x0)
        text_cfg = self.adapter.text_config
        seg, ctx = prep["segment"], prep["context"]
        groups = self.adapter.image_groups(x0) if vision else None  # one full forward: every group, as transformers

        def rule(w: int | None) -> Tensor:
            mask = masks.causal_dense_mask(valid, w, seg, ctx)
            return mask if groups is None else mask | masks.group_pairs(groups, w)

        mask = attention.build(rule, text_cfg, text_cfg, embeds.dtype)
        residuals = self.adapter.layer_residuals(x0, feats)  # [K, N, L, D] | None
        hidden = self.adapter.run_decoder(embeds, mask, prep["positions"], residuals=residuals)  # [N, L, D]
        where = (labels[:, 1:] != objective.IGNORE_INDEX).nonzero()  # [M, 2]: token i+1 is predicted at position i
        logits = self.adapter.head(hidden[where[:, 0], where[:, 1]])  # [M, V]
        ce = F.cross_entropy(logits.float(), labels[where[:, 0], where[:, 1] + 1], reduction="none")  # [M]
        out = self._reduce(ce, torch.stack([where[:, 0], where[:, 1] + 1], dim=1), prep, norm)
        out.metrics["loss_tokens"] = float(where.shape[0])  # every loss token is predicted: M, known from nonzero
        return out

    def bd3_prediction_logits(self, x_t: Tensor, prepared: dict[str, Any]) -> Tensor:
        """Logits predicting every x_t position, [N, L, V] (for tests and likelihood evaluation)."""
        hidden = self.bd3_hidden(x_t, prepared)
        rows = objective.prediction_index(x_t.shape[1], self.config.block_size, self.config.prediction, x_t.device)
        return self.adapter.head(hidden[:, rows])

    def embed_pair(self, x_t: Tensor, x0: Tensor, vision: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Embeddings of [x_t ; x0] along the sequence, [N, 2L, D], and the layer residuals there ([K, N, 2L, D],
        adapter.layer_residuals, or None). Images enter both halves at the same positions (never noised): the noisy
        half's image tokens are what a per-block forward of [clean blocks < k ; noisy block k] holds there."""
        if not vision:
            emb = self.adapter.input_embeddings()
            return torch.cat([emb(x_t), emb(x0)], dim=1), None
        feats = self.adapter.image_features(vision)  # [image tokens, F], computed once for both halves
        ids, feats2 = torch.cat([x_t, x0], dim=0), torch.cat([feats, feats])  # [2N, L], both halves' images
        both = self.adapter.embed(ids, features=feats2)  # [2N, L, D]
        residuals = self.adapter.layer_residuals(ids, feats2)  # [K, 2N, L, D] | None
        n = x0.shape[0]
        if residuals is not None:
            residuals = torch.cat([residuals[:, :n], residuals[:, n:]], dim=2)
        return torch.cat([both[:n], both[n:]], dim=1), residuals

    # ---- generation ----------------------------------------------------------------------------------------------
    def _decode_config(self, config: DecodeConfig | None, kwargs: dict[str, Any]) -> DecodeConfig:
        import dataclasses

        base = config or DecodeConfig()
        known = {f.name for f in dataclasses.fields(DecodeConfig)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise DiffusionVLError(f"unknown generation option(s): {', '.join(unknown)}")
        return dataclasses.replace(base, **kwargs)

    def generate(self, prompts: Any = None, images: Any = None, config: DecodeConfig | None = None,
                 template: str | list[str | None] | None = None, **kwargs: Any) -> GenerationOutput:
        """Generate answers. prompts: str | list[str] | messages | list[messages]; images: per sample.

        Keyword options are DecodeConfig fields (decoder, max_new_tokens, block_size, steps, policy, threshold,
        temperature, top_k, top_p, seed, use_cache, stop_early). `template`: an answer template (literal text and
        `<mask:N>` slots, decoding/template.py) for every sample, or one per sample (None = a free answer); a
        templated answer is the template with its slots filled. Returns a GenerationOutput (texts, token_ids, stats).
        The DiffusionVL reference form (token id tensor, `inputs=`/`gen_length=`, a LongTensor back) is its own
        function, `diffusionvl.model.compat.generate_compat(model, inputs=..., gen_length=...)`.
        """
        if prompts is None or isinstance(prompts, Tensor) or "gen_length" in kwargs:
            raise DiffusionVLError("generate takes prompts (text or messages); for the DiffusionVL reference call "
                                   "(token ids, gen_length=) use diffusionvl.model.compat.generate_compat(model, inputs=...)")
        final = None
        for event in self.stream_events(prompts, images, config, template=template, **kwargs):
            final = event
        return final.output

    def stream_events(self, prompts: Any, images: Any = None, config: DecodeConfig | None = None,
                      template: str | list[str | None] | None = None, **kwargs: Any) -> Iterator[Any]:
        cfg = self._decode_config(config, kwargs)
        conversations = normalize_batch(prompts, images)
        templates = [template] * len(conversations) if isinstance(template, str) else template
        if templates is not None and not isinstance(templates, list):
            raise DiffusionVLError(f"template must be text, or a list with one per prompt, got "
                                   f"{type(template).__name__}")
        was_training = self.training
        self.eval()
        try:
            yield from run(self, conversations, cfg, templates)
        finally:
            self.train(was_training)

    def stream(self, prompt: Any, images: Any = None, config: DecodeConfig | None = None,
               template: str | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the answer's text block by block (one prompt)."""
        for event in self.stream_events(prompt, images, config, template=template, **kwargs):
            if not event.final and event.new_texts[0]:
                yield event.new_texts[0]

    # ---- persistence ---------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Save atomically; an existing `path` that is not a diffusionvl model folder is refused unless
        `overwrite` (atomic.check_target)."""
        save_atomic(self, path, overwrite=overwrite)


MODEL_MARKER = "diffusionvl.json"  # the file that makes a folder a diffusionvl model folder


def save_atomic(model: DiffusionVLModel, path: str | os.PathLike[str],
                state_dict: dict[str, torch.Tensor] | None = None, overwrite: bool = False) -> Path:
    """Write model + tokenizer/processor + diffusion config to `path` through a temporary sibling folder.

    `state_dict`: the backbone's full weights when they live elsewhere (gathered from FSDP / ZeRO-3 shards).
    An existing `path` is replaced only when it is a diffusionvl model folder, an empty folder, or `overwrite`
    (see `check_target`): nothing a user keeps there is deleted without being asked."""
    check_target(path, MODEL_MARKER, overwrite)
    model.hf_model.config.diffusionvl = model.config.to_dict()

    def write(tmp: Path) -> None:
        model.hf_model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        model.processor.save_pretrained(tmp)
        (tmp / MODEL_MARKER).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")

    return write_folder(path, write)


def _pad_to_multiple(x0: Tensor, labels: Tensor, valid: Tensor, positions: Tensor, segment: Tensor, context: Tensor,
                     block: int, pad_id: int) -> tuple[Tensor, ...]:
    extra = (-x0.shape[1]) % block
    if extra == 0:
        return x0, labels, valid, positions, segment, context
    n = x0.shape[0]
    x0 = torch.cat([x0, x0.new_full((n, extra), pad_id)], dim=1)
    labels = torch.cat([labels, labels.new_full((n, extra), objective.IGNORE_INDEX)], dim=1)
    valid = torch.cat([valid, valid.new_zeros(n, extra)], dim=1)
    positions = torch.cat([positions, positions.new_zeros(*positions.shape[:2], extra)], dim=-1)
    segment = torch.cat([segment, segment.new_zeros(n, extra)], dim=1)
    context = torch.cat([context, context.new_zeros(n, extra)], dim=1)
    return x0, labels, valid, positions, segment, context
