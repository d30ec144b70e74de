"""Per-architecture adapters: everything that differs between backbones, behind one small interface.

Contract: the engine (modeling.py, decoding/) never looks inside a Hugging Face model. It asks the adapter for
- `decoder`: the transformer stack, called with (inputs_embeds, attention_mask, position_ids, cache) where the cache
  goes under the keyword the installed transformers expects (`cache` from 5.x releases that deprecate
  `past_key_values`, else `past_key_values`; `cache_keyword`, detected once per decoder class);
- `head(hidden)`: hidden states -> logits (lm_head, plus final soft-capping where the architecture has it);
- `embed(ids, vision)`: token embeddings with image features scattered in at the image placeholder tokens;
- `prompt_positions(ids, vision, i)`: the positions of one unpadded prompt, [P, n] (P = 1, or 3 for M-RoPE),
  and `delta`: the position of the token at index s >= n is s + delta (in every one of the P dimensions);
- `image_features(vision)`: [M, F] per image token, everything the decoder takes from the images (F = D, the token
  embedding; Qwen3-VL: (1 + K) D, the embedding then its K deepstack rows), read by `embed` and `layer_residuals`;
- `layer_residuals(ids, features)`: [K, N, L, D] that `run_decoder(..., residuals=)` adds to the hidden states after
  decoder layers 0..K-1 (zero off image tokens: Qwen3-VL's deepstack), or None where a family adds nothing there;
- `image_groups(ids)`: [N, L] long, tokens sharing a group g > 0 attend to each other both ways inside a clean
  prompt (Gemma 3's image tokens), 0 elsewhere; None where attention is causal throughout;
- `encode(conversations)`: chat template + tokenizer/processor -> unpadded ids per sample and vision tensors;
- `vision_keys`: the entries of a batch that carry its images (what `image_features` reads), and
  `collate_vision(per_sample)`: the vision tensors of several samples as one batch's, as the processor would
  batch them (each tensor zero-padded at the end of every dimension after the first, then concatenated).
Adapters are found by `config.model_type` in `ADAPTERS`; an unknown type raises a one-line error listing the
supported ones.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from diffusionvl.backbone.prompts import Conversation
from diffusionvl.backbone.tokens import find_token_id
from diffusionvl.core.errors import DiffusionVLError

Tensor = torch.Tensor



@functools.lru_cache(maxsize=None)
def cache_keyword(decoder_class: type) -> str:
    """The keyword a decoder stack's forward takes its KV cache under: `cache` where it has that parameter (newer
    transformers, which deprecate `past_key_values`), else `past_key_values`. Read from the signature, not a version."""
    try:
        params = inspect.signature(decoder_class.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@dataclass
class Encoded:
    """A tokenized batch: unpadded ids per sample and the model-specific vision tensors (images in sample order)."""

    input_ids: list[list[int]]
    vision: dict[str, Tensor] = field(default_factory=dict)
    images_per_sample: list[int] = field(default_factory=list)


class Adapter:
    """Text-only causal LMs whose CausalLM has `.model` (decoder stack with `.embed_tokens`) and `.lm_head`."""

    model_types: ClassVar[tuple[str, ...]] = ()
    auto_class: ClassVar[str] = "AutoModelForCausalLM"
    has_vision: ClassVar[bool] = False
    position_dims: ClassVar[int] = 1
    vision_keys: ClassVar[tuple[str, ...]] = ()  # batch entries that carry the images (module docstring)

    def __init__(self, model: nn.Module, processor: Any):
        self.model = model
        self.processor = processor
        self.cache_key = cache_keyword(type(self.decoder))  # once: traced forwards read a plain attribute

    # ---- model parts ------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def text_config(self) -> Any:
        cfg = self.model.config
        return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg

    @property
    def causal_lm(self) -> nn.Module:
        """The module holding `.model` (decoder stack) and `.lm_head`."""
        return self.model

    @property
    def decoder(self) -> nn.Module:
        return self.causal_lm.model

    def input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def head(self, hidden: Tensor) -> Tensor:
        logits = self.causal_lm.lm_head(hidden)
        cap = getattr(self.text_config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def run_decoder(self, embeds: Tensor, mask: Any, positions: Tensor, cache: Any = None,
                    residuals: Tensor | None = None) -> Tensor:
        """embeds [N, Q, D], positions [P, N, Q] -> hidden [N, Q, D]; `residuals` [K, N, Q, D] from
        `layer_residuals` (None: nothing to add)."""
        pos = positions[0] if self.position_dims == 1 else positions
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                           **{self.cache_key: cache}, use_cache=cache is not None, **self.residual_kwargs(residuals))
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def residual_kwargs(self, residuals: Tensor | None) -> dict[str, Any]:
        """The decoder's keyword arguments that carry `residuals` (families without layer residuals take none)."""
        if residuals is not None:
            raise DiffusionVLError(f"{self.model.config.model_type} decoders take no per-layer image residuals")
        return {}

    # ---- inputs -----------------------------------------------------------------------------------------------
    image_token_id: int | None = None

    def embed(self, input_ids: Tensor, vision: dict[str, Tensor] | None = None,
              features: Tensor | None = None) -> Tensor:
        """ids [N, L] -> embeddings [N, L, D]; `features` = precomputed `image_features(vision)` if any."""
        if vision or features is not None:
            raise DiffusionVLError(f"{self.model.config.model_type} models have no vision encoder: remove the images")
        return self.input_embeddings()(input_ids)

    def image_features(self, vision: dict[str, Tensor]) -> Tensor:
        raise DiffusionVLError(f"{self.model.config.model_type} models have no vision encoder: remove the images")

    def layer_residuals(self, input_ids: Tensor, features: Tensor | None) -> Tensor | None:
        """[K, N, L, D] added after decoder layers 0..K-1 (module docstring); None: this family adds none."""
        return None

    def image_groups(self, input_ids: Tensor) -> Tensor | None:
        """[N, L] bidirectional groups (module docstring); None: attention is causal throughout."""
        return None

    def prompt_positions(self, ids: list[int], vision: dict[str, Tensor] | None, index: int) -> tuple[Tensor, int]:
        return torch.arange(len(ids)).view(1, -1), 0

    def render(self, conv: Conversation, add_generation_prompt: bool = True) -> str:
        """Conversation -> prompt text through the tokenizer's chat template (plain text if it has none)."""
        if conv.images:
            raise DiffusionVLError(
                f"this {self.model.config.model_type} model has no vision encoder; drop the images or compose a VLM "
                "first (diffusionvl.backbone.compose)")
        tok = self.tokenizer
        msgs = conv.text_messages()
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt, tokenize=False)
        return "\n".join(m["content"] for m in msgs)

    def encode(self, conversations: list[Conversation]) -> Encoded:
        tok = self.tokenizer
        has_template = bool(getattr(tok, "chat_template", None))
        ids = [tok(self.render(c), add_special_tokens=not has_template)["input_ids"] for c in conversations]
        return Encoded(input_ids=[list(map(int, x)) for x in ids], images_per_sample=[0] * len(ids))

    def collate_vision(self, per_sample: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The vision tensors of the samples with images -> one batch's, images along dim 0 in sample order; each
        tensor zero-padded at the end of its other dimensions to the largest (more tiles, a larger image), which is
        how the processors batch them and what the models ignore (all-zero tiles, image_sizes crops)."""
        keys = [k for k in self.vision_keys if per_sample and k in per_sample[0]]
        return {k: torch.cat(pad_to_largest([v[k] for v in per_sample])) for k in keys}


class VisionAdapter(Adapter):
    """Base of VLM adapters: image features replace the embeddings of the image tokens, in order."""

    has_vision = True
    vision_keys = ("pixel_values", "image_grid_thw", "image_grid_thw_per_sample", "image_sizes", "image_tiles")

    @property
    def image_placeholder_id(self) -> int:
        """The token the chat template writes for each image, which the processor expands (training labels are
        placed through that expansion); the image token itself for most families."""
        return self.image_token_id

    def render(self, conv: Conversation, add_generation_prompt: bool = True) -> str:
        """Conversation (image parts included) -> prompt text through the processor's chat template."""
        return self.processor.apply_chat_template(conv.messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def encode(self, conversations: list[Conversation]) -> Encoded:
        return self.tokenize([self.render(c) for c in conversations], [c.images for c in conversations])

    def tokenize(self, texts: list[str], images: list[list[Any]]) -> Encoded:
        """Rendered texts + per-sample images -> ids and the processor's vision tensors (each family's own)."""
        raise NotImplementedError

    def embed(self, input_ids: Tensor, vision: dict[str, Tensor] | None = None,
              features: Tensor | None = None) -> Tensor:
        embeds = self.input_embeddings()(input_ids)
        if features is None and (not vision or vision.get("pixel_values") is None):
            return embeds
        feats = features if features is not None else self.image_features(vision)
        return scatter_image_features(embeds, input_ids, self.image_token_id, feats)


class QwenVLAdapter(VisionAdapter):
    """Qwen2-VL and Qwen2.5-VL: vision tower + merger inside the model, image pad tokens, 3-D M-RoPE positions."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    auto_class = "AutoModelForImageTextToText"
    position_dims = 3

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def image_features(self, vision: dict[str, Tensor]) -> Tensor:
        """[sum of image tokens, D] in sample/image order."""
        inner = self.model.model
        weight = next(inner.visual.parameters())  # the processor's tensors are on the CPU
        pixels = vision["pixel_values"].to(device=weight.device, dtype=weight.dtype)
        out = inner.get_image_features(pixels, vision["image_grid_thw"].to(weight.device))
        out = getattr(out, "pooler_output", out)
        return torch.cat(list(out), dim=0) if isinstance(out, (list, tuple)) else out

    def prompt_positions(self, ids: list[int], vision: dict[str, Tensor] | None, index: int) -> tuple[Tensor, int]:
        if (getattr(self.model.config, "diffusionvl", None) or {}).get("positions") == "sequential":
            return torch.arange(len(ids)).expand(3, -1).clone(), 0  # DiffusionConfig.positions: one 1-D ramp
        grids = vision["image_grid_thw_per_sample"][index] if vision and "image_grid_thw_per_sample" in vision else None
        merge = int(self.model.config.vision_config.spatial_merge_size)
        return mrope_positions(ids, self.image_token_id, grids, merge)

    def tokenize(self, texts: list[str], images: list[list[Any]]) -> Encoded:
        flat = [im for ims in images for im in ims]
        out = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        ids = [row[m.bool()].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
        counts = [len(ims) for ims in images]
        vision: dict[str, Any] = {}
        if flat:
            grid = out["image_grid_thw"]
            vision = {"pixel_values": out["pixel_values"], "image_grid_thw": grid,
                      "image_grid_thw_per_sample": list(torch.split(grid, counts))}
        return Encoded(input_ids=ids, vision=vision, images_per_sample=counts)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL (dense and MoE): Qwen2-VL's image layout and 3-D positions (its rotary embedding interleaves the
    three axes over the frequencies, inside the model), plus deepstack: features of K intermediate vision layers are
    added to the image tokens' hidden states after decoder layers 0..K-1, in every forward that holds them."""

    model_types = ("qwen3_vl", "qwen3_vl_moe")

    def image_features(self, vision: dict[str, Tensor]) -> Tensor:
        """[image tokens, (1 + K) D] in sample/image order: the token embedding, then the K deepstack rows."""
        inner = self.model.model
        weight = next(inner.visual.parameters())
        pixels = vision["pixel_values"].to(device=weight.device, dtype=weight.dtype)
        out = inner.get_image_features(pixels, vision["image_grid_thw"].to(weight.device), return_dict=True)
        parts = [out.pooler_output, *out.deepstack_features]  # each a tensor or a tuple per image (by release)
        return torch.cat([torch.cat(list(p)) if isinstance(p, (list, tuple)) else p for p in parts], dim=-1)

    def embed(self, input_ids: Tensor, vision: dict[str, Tensor] | None = None,
              features: Tensor | None = None) -> Tensor:
        if features is None and vision and vision.get("pixel_values") is not None:
            features = self.image_features(vision)
        width = self.input_embeddings().weight.shape[1]
        return super().embed(input_ids, features=None if features is None else features[:, :width])

    def layer_residuals(self, input_ids: Tensor, features: Tensor | None) -> Tensor | None:
        if features is None:
            return None
        width = self.input_embeddings().weight.shape[1]
        rows = features[:, width:].reshape(features.shape[0], -1, width).transpose(0, 1)  # [K, M, D]
        out = rows.new_zeros(rows.shape[0], *input_ids.shape, width)  # [K, N, L, D]
        where = input_ids == self.image_token_id  # [N, L]
        if int(where.sum()) != rows.shape[1]:
            raise DiffusionVLError(f"prompt has {int(where.sum())} image tokens but the images give {rows.shape[1]}")
        out[:, where] = rows
        return out

    def residual_kwargs(self, residuals: Tensor | None) -> dict[str, Any]:
        """Qwen3-VL's own deepstack arguments, dense: every position selected, zero rows off the image tokens (the
        model adds them; x + 0 is x), so the shapes stay static."""
        if residuals is None:
            return {}
        k, n, q, d = residuals.shape
        everywhere = torch.ones(n, q, dtype=torch.bool, device=residuals.device)
        return {"visual_pos_masks": everywhere, "deepstack_visual_embeds": list(residuals.reshape(k, n * q, d))}


class Gemma3VisionAdapter(VisionAdapter):
    """Gemma 3 with its SigLIP tower (`gemma3`; the 1B text-only checkpoints are `gemma3_text`): each image is
    image_seq_length soft tokens between <start_of_image> and <end_of_image>, pooled and projected by the model;
    1-D positions; the soft tokens of one image attend to each other bidirectionally (`image_groups`), the rest
    is causal, with sliding-window layers."""

    model_types = ("gemma3",)
    auto_class = "AutoModelForImageTextToText"

    @property
    def decoder(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def image_placeholder_id(self) -> int:
        """The chat template writes <start_of_image> per image; the processor expands it into the soft tokens."""
        return int(self.model.config.boi_token_index)

    def image_features(self, vision: dict[str, Tensor]) -> Tensor:
        """[images x image_seq_length, D] in sample/image order."""
        weight = self.input_embeddings().weight
        pixels = vision["pixel_values"].to(device=weight.device, dtype=weight.dtype)
        out = self.model.model.get_image_features(pixels)
        out = getattr(out, "pooler_output", out)  # [images, T, D]
        return out.reshape(-1, out.shape[-1])

    def image_groups(self, input_ids: Tensor) -> Tensor:
        """Runs of image soft tokens numbered 1, 2, ... along each row (transformers' token_type_ids groups)."""
        image = input_ids == self.image_token_id  # [N, L]
        starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
        return torch.cumsum(starts.long(), dim=1) * image

    def tokenize(self, texts: list[str], images: list[list[Any]]) -> Encoded:
        nested = [list(ims) for ims in images] if any(images) else None  # the processor pairs images per sample
        out = self.processor(text=texts, images=nested, return_tensors="pt", padding=True)
        ids = [row[m.bool()].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
        vision = {"pixel_values": out["pixel_values"]} if nested else {}
        return Encoded(input_ids=ids, vision=vision, images_per_sample=[len(ims) for ims in images])


class ComposedAdapter(VisionAdapter):
    """LLaVA-style VLMs composed by `diffusionvl.backbone.compose`: vision tower + projector + a causal LM, 1-D positions,
    `num_image_tokens` copies of the image token per image (expanded by the ComposedProcessor)."""

    model_types = ("diffusionvl_llava",)
    auto_class = "AutoModelForImageTextToText"
    position_dims = 1

    def __init__(self, model: nn.Module, processor: Any):
        super().__init__(model, processor)
        cfg = model.config
        tok = self.tokenizer
        found = find_token_id(tok, cfg.image_token)
        if found is None:
            raise DiffusionVLError(f"the tokenizer lacks the image token {cfg.image_token!r} of this composed model")
        if cfg.image_token_id is not None and int(found) != int(cfg.image_token_id):
            raise DiffusionVLError(f"image token {cfg.image_token!r} is id {found} in the tokenizer but "
                                   f"{cfg.image_token_id} in the model config: tokenizer and model do not match")
        self._image_token_id = int(found)

    @property
    def causal_lm(self) -> nn.Module:
        return self.model.language_model

    @property
    def image_token_id(self) -> int:
        return self._image_token_id

    def image_features(self, vision: dict[str, Tensor]) -> Tensor:
        """[sum of visual tokens per image, D] in sample/image order (T per image, or anyres counts)."""
        return self.model.merged_image_features(vision["pixel_values"], vision.get("image_sizes"),
                                                vision.get("image_tiles"))

    def tokenize(self, texts: list[str], images: list[list[Any]]) -> Encoded:
        flat = [im for ims in images for im in ims]
        out = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        ids = [row[m.bool()].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
        keys = ("pixel_values", "image_sizes", "image_tiles")  # the last two: variable-resolution layouts
        vision = {k: out[k] for k in keys if k in out} if flat else {}
        return Encoded(input_ids=ids, vision=vision, images_per_sample=[len(ims) for ims in images])


class MultimodalAdapter(VisionAdapter):
    """transformers VLMs of the LLaVA shape (InternVL, Mistral 3, Idefics3 / SmolVLM, LLaVA-OneVision): the model holds
    a vision tower, a projector and `language_model` (1-D positions), the head holds `lm_head`, and the processor
    expands each image placeholder into the family's layout (tiles, rows, newline tokens). `get_image_features` of
    the inner model turns the processor's `vision_keys` tensors into the image tokens' features in prompt order, so
    the family's own vision path (pixel shuffle, anyres packing with newline rows, Pixtral's 2-D patches) runs as is."""

    auto_class = "AutoModelForImageTextToText"
    vision_keys = ("pixel_values",)  # the processor outputs get_image_features reads
    language_model: ClassVar[str] = "language_model"  # the inner model's attribute holding the decoder stack

    @property
    def decoder(self) -> nn.Module:
        return getattr(self.model.model, self.language_model)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def image_features(self, vision: dict[str, Tensor]) -> Tensor:
        """[sum of image tokens, D] in sample/image order."""
        weight = self.input_embeddings().weight
        kwargs = {k: vision[k].to(weight.device) for k in self.vision_keys if vision.get(k) is not None}
        kwargs["pixel_values"] = kwargs["pixel_values"].to(weight.dtype)
        out = self.model.model.get_image_features(**kwargs)
        out = getattr(out, "pooler_output", out)
        parts = list(out) if isinstance(out, (list, tuple)) else [out]
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts], dim=0)

    def processor_images(self, images: list[list[Any]]) -> Any:
        """Per-sample image lists -> the processor's `images` argument (a flat list in sample order)."""
        return [im for ims in images for im in ims] or None

    def tokenize(self, texts: list[str], images: list[list[Any]]) -> Encoded:
        has_images = any(images)
        out = self.processor(text=texts, images=self.processor_images(images) if has_images else None,
                             return_tensors="pt", padding=True)
        ids = [row[m.bool()].tolist() for row, m in zip(out["input_ids"], out["attention_mask"])]
        vision = {k: out[k] for k in self.vision_keys if k in out} if has_images else {}
        return Encoded(input_ids=ids, vision=vision, images_per_sample=[len(ims) for ims in images])


class InternVLAdapter(MultimodalAdapter):
    """InternVL (transformers' `internvl`): each image is cropped into tiles plus a thumbnail by its processor, and
    every tile gives image_seq_length tokens after the pixel shuffle, between <img> and </img>."""

    model_types = ("internvl",)


class Mistral3Adapter(MultimodalAdapter):
    """Mistral 3 (Pixtral vision): images keep their aspect ratio; rows of [IMG] tokens end in [IMG_BREAK], the
    last in [IMG_END]; the vision tower needs each image's size to cut its patches out of the padded batch."""

    model_types = ("mistral3",)
    vision_keys = ("pixel_values", "image_sizes")


class Idefics3Adapter(MultimodalAdapter):
    """Idefics3 and SmolVLM: the processor splits an image into a grid of tiles plus a global view, each tile one
    run of <image> tokens framed by <fake_token_around_image> and its <row_r_col_c> tag; the connector's pixel
    shuffle makes each tile image_seq_len tokens. The processor takes images nested per sample."""

    model_types = ("idefics3", "smolvlm")
    vision_keys = ("pixel_values", "pixel_attention_mask")
    language_model = "text_model"

    def processor_images(self, images: list[list[Any]]) -> Any:
        return [list(ims) for ims in images]


class LlavaOnevisionAdapter(MultimodalAdapter):
    """LLaVA-OneVision: anyres tiles of a single image (the base view plus the best grid for its size), features
    unpadded to the image's aspect ratio with an image_newline token's feature after each row; several images in one
    prompt take the base view only (`batch_num_images`)."""

    model_types = ("llava_onevision",)
    vision_keys = ("pixel_values", "image_sizes", "batch_num_images")


def pad_to_largest(tensors: list[Tensor]) -> list[Tensor]:
    """Tensors of equal rank, each zero-padded at the end of every dimension after the first to the largest size."""
    size = [max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim())]
    out = []
    for t in tensors:
        pad = [p for d in reversed(range(1, t.dim())) for p in (0, size[d - 1] - t.shape[d])]
        out.append(torch.nn.functional.pad(t, pad) if any(pad) else t)
    return out


def scatter_image_features(embeds: Tensor, input_ids: Tensor, image_token_id: int, features: Tensor) -> Tensor:
    """embeds [N, L, D] with `features` [M, D] written, in order, at the M image-token positions of input_ids."""
    where = (input_ids == image_token_id).unsqueeze(-1)  # [N, L, 1]
    n_tokens = int(where.sum())
    if n_tokens != features.shape[0]:
        raise DiffusionVLError(f"prompt has {n_tokens} image tokens but the images give {features.shape[0]} features")
    return embeds.masked_scatter(where, features.to(embeds.dtype))


def mrope_positions(ids: list[int], image_token_id: int, grids: Tensor | None, merge: int) -> tuple[Tensor, int]:
    """Qwen-VL 3-D positions of one unpadded prompt: [3, n] and the text delta for positions after it.

    Text tokens advance all three dimensions together; a run of image tokens with grid (t, h, w) (in patches)
    gets (t, h / merge, w / merge) grid coordinates offset by the running position, after which text resumes at
    offset + max(h, w) / merge (t = 1 for still images).
    """
    n = len(ids)
    pos = torch.zeros(3, n, dtype=torch.long)
    cur, i, k = 0, 0, 0
    while i < n:
        if ids[i] != image_token_id:
            pos[:, i] = cur
            cur, i = cur + 1, i + 1
            continue
        if grids is None or k >= len(grids):
            raise DiffusionVLError("prompt has more image placeholders than images")
        t, h, w = (int(v) for v in grids[k])
        h, w = h // merge, w // merge
        count = t * h * w
        tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
        hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
        ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
        pos[:, i:i + count] = torch.stack([tt, hh, ww]) + cur
        cur += max(t, h, w)
        i, k = i + count, k + 1
    delta = int(pos.max()) + 1 - n if n else 0
    return pos, delta


ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter], model_types: tuple[str, ...] | None = None) -> type[Adapter]:
    for mt in model_types or cls.model_types:
        ADAPTERS[mt] = cls
    return cls


TEXT_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3", "smollm3",
                    "granite", "olmo2")
register_adapter(Adapter, TEXT_MODEL_TYPES)
register_adapter(QwenVLAdapter)
register_adapter(Qwen3VLAdapter)
register_adapter(Gemma3VisionAdapter)
register_adapter(ComposedAdapter)
for _family in (InternVLAdapter, Mistral3Adapter, Idefics3Adapter, LlavaOnevisionAdapter):
    register_adapter(_family)


def adapter_class(model_type: str) -> type[Adapter]:
    cls = ADAPTERS.get(model_type)
    if cls is None:
        raise DiffusionVLError(f"unsupported architecture {model_type!r}; supported model types: "
                               f"{', '.join(sorted(ADAPTERS))}")
    return cls
