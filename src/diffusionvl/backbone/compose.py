"""Modality shift: compose a pretrained AR text LM + a vision encoder + a projector into a LLaVA-style AR VLM.

Contract:
- `compose(lm, tokenizer, vision=..., projector="mlp2x_gelu", pool=None, image_token="<image>")` returns
  `(ComposedVLM, ComposedProcessor)`. The LM's and the encoder's weights are copied in unchanged; the projector is
  new (random). The image token is added to the tokenizer by name (special) and the LM's own chat template is
  wrapped so that `{"type": "image"}` content parts render as the image token at their position.
- `ComposedVLM` (`model_type = "diffusionvl_llava"`) is an ordinary transformers model: `.vision_tower`,
  `.projector`, `.language_model` (the full CausalLM); `forward(input_ids, pixel_values, attention_mask, labels)`
  is the plain AR forward (HF's shifted CE on labels) with the projected image features scattered in at the image
  tokens, so it trains and `generate`s as a normal AR VLM. `save_pretrained`/`from_pretrained` round-trip through
  safetensors (vision tower included); `register_auto_classes()` registers them with `AutoConfig` and
  `AutoModelForImageTextToText` (the loaders call it).
- `ComposedProcessor`: tokenizer + torchvision-free image preprocessing; `__call__` expands every image token in
  the text to `num_image_tokens` copies and returns input_ids, attention_mask and pixel_values [N_img, 3, S, S];
  saved as tokenizer files + `processor_config.json` (loaded by `diffusionvl.backbone.processing.load_processor`).
Freezing by part (`set_trainable`, the LLaVA `STAGES`) lives with the trainer's part rules in train/parts.py;
writing a composition to disk (`diffusionvl compose`) is `composition.compose_to_disk`.
The engine then treats the composed model like any other VLM (adapter `ComposedAdapter` in adapters.py):
`diffusionvl.wrap(model, processor)` converts it to block diffusion.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
from dataclasses import replace as dc_replace
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)

from diffusionvl.backbone.adapters import scatter_image_features
from diffusionvl.backbone.tokens import find_token_id
from diffusionvl.backbone.vision.anyres import ImageLayout, assemble, image_tiles, parse_pinpoints
from diffusionvl.backbone.vision.encoders import ImageTransform, build_tower, preprocess_images, resolve_vision
from diffusionvl.core.errors import DiffusionVLError, check

Tensor = torch.Tensor
MODEL_TYPE = "diffusionvl_llava"
PROCESSOR_FILE = "processor_config.json"
TEMPLATE_MARK = "{#- diffusionvl: image parts -> image token -#}"


# ------------------------------------------------------------------------------------------------- projector


class Projector(nn.Sequential):
    """Visual tokens [.., C] -> LM embeddings [.., D].

    A fresh projector starts from PyTorch's nn.Linear init (weights uniform in +-1/sqrt(fan_in), biases too), not from
    the LM's N(0, initializer_range): measured on one-object scenes with four question types mixed, 3 of 3 seeds read
    held-out colour within 750 steps with it and 0 of 3 with N(0, 0.02) (docs/tiny-vlm.md, "The projector's init").
    Its output scale follows its input width instead of shrinking every visual token to the text embeddings' 0.02.
    """

    def reset_parameters(self) -> None:
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()


PROJECTORS = {
    "linear": lambda c, d: Projector(nn.Linear(c, d)),
    "mlp2x_gelu": lambda c, d: Projector(nn.Linear(c, d), nn.GELU(), nn.Linear(d, d)),  # LLaVA-1.5
}


def build_projector(kind: str, vision_width: int, text_width: int) -> Projector:
    if kind not in PROJECTORS:
        raise DiffusionVLError(f"unknown projector {kind!r}; choose one of {', '.join(PROJECTORS)}")
    return PROJECTORS[kind](vision_width, text_width)


# ---------------------------------------------------------------------------------------------------- config


class ComposedVLMConfig(PretrainedConfig):
    """LM config + vision spec + projector + image-token and preprocessing settings.

    text_config: the language model's full transformers config (num_hidden_layers, max_position_embeddings,
        sliding window, ... are read from here). vision: the tower spec (vision/encoders.py: kind efficientnet_lite0,
        hf + config dict, or timm + name). vision_hidden_size: width C of a visual token. projector: "linear" or
        "mlp2x_gelu". image_token / image_token_id: the placeholder token's name and id. num_image_tokens: visual
        tokens per image (fixed by the tower, its input size and pool). pool: grid average-pool size or None.
        feature_layer: hidden layer of HF ViT towers. image_size / image_mean / image_std / image_crop_pct: the
        preprocessing (crop_pct None = plain resize to a square).
        Variable-resolution images (vision/anyres.py; the defaults keep one tile and num_image_tokens per image):
        image_aspect_ratio: "square" | "pad" | "anyres" | "anyres_max_N"; image_grid_pinpoints: [[width, height],
        ...] grid resolutions for anyres; patch_merge: "flat" | "spatial_unpad" (unpadded tile grid + a learned
        `image_newline` vector after each row); multi_image_aspect_ratio: the aspect for each image of a prompt
        with several images. num_image_tokens is then the tokens of one tile (side x side).
        vision_weights: where the frozen tower's weights come from at load: "checkpoint" (saved with the model) or
        "asset" (not saved: read from the offline asset package of `vision["kind"]`, which keeps a shipped model
        folder small; only towers with such a package, e.g. efficientnet_lite0).
    """

    model_type = MODEL_TYPE
    sub_configs = {"text_config": AutoConfig}

    def __init__(self, text_config: Any = None, vision: dict[str, Any] | None = None, vision_hidden_size: int = 0,
                 projector: str = "mlp2x_gelu", image_token: str = "<image>", image_token_id: int | None = None,
                 num_image_tokens: int = 0, pool: int | None = None, feature_layer: int = -2,
                 image_size: int = 224, image_mean: Any = (0.5, 0.5, 0.5), image_std: Any = (0.5, 0.5, 0.5),
                 image_crop_pct: float | None = None, image_aspect_ratio: str = "square",
                 image_grid_pinpoints: Any = None, patch_merge: str = "flat", multi_image_aspect_ratio: str = "pad",
                 vision_weights: str = "checkpoint", **kwargs: Any):
        if isinstance(text_config, dict):
            data = dict(text_config)
            text_config = AutoConfig.for_model(data.pop("model_type"), **data)
        self.text_config = text_config
        self.vision = dict(vision or {})
        self.vision_hidden_size = vision_hidden_size
        self.projector = projector
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.num_image_tokens = num_image_tokens
        self.pool = pool
        self.feature_layer = feature_layer
        self.image_size = image_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.image_crop_pct = image_crop_pct
        self.image_aspect_ratio = image_aspect_ratio
        self.image_grid_pinpoints = [list(p) for p in parse_pinpoints(image_grid_pinpoints, image_size)] or None
        self.patch_merge = patch_merge
        self.multi_image_aspect_ratio = multi_image_aspect_ratio
        self.vision_weights = vision_weights
        kwargs.setdefault("tie_word_embeddings", False)  # tying lives inside the language model's own config
        super().__init__(**kwargs)

    @property
    def image_transform(self) -> ImageTransform:
        return ImageTransform(self.image_size, tuple(self.image_mean), tuple(self.image_std), self.image_crop_pct)

    @property
    def image_layout(self) -> ImageLayout:
        pinpoints = tuple(tuple(p) for p in self.image_grid_pinpoints or ())
        return ImageLayout(aspect=self.image_aspect_ratio, pinpoints=pinpoints, merge=self.patch_merge,
                           multi_image=self.multi_image_aspect_ratio, tile=int(self.image_size),
                           side=math.isqrt(int(self.num_image_tokens)))


# ----------------------------------------------------------------------------------------------------- model


class ComposedVLM(PreTrainedModel, GenerationMixin):
    """vision tower -> projector -> image tokens of the language model's input embeddings (LLaVA)."""

    config_class = ComposedVLMConfig
    config: ComposedVLMConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _skip_keys_device_placement = ["past_key_values"]

    def __init__(self, config: ComposedVLMConfig):
        super().__init__(config)
        text = config.text_config
        self.vision_tower = build_tower(config.vision, config.pool, config.feature_layer)
        self.projector = build_projector(config.projector, config.vision_hidden_size, text.hidden_size)
        self.language_model = AutoModelForCausalLM.from_config(text)
        if config.patch_merge == "spatial_unpad":  # a learned token closing each row of an image's token grid
            self.image_newline = nn.Parameter(torch.empty(text.hidden_size))
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """transformers' loader; a folder saved without its tower (config.vision_weights == "asset") gets the tower's
        weights from the offline asset package (`load_asset_tower`)."""
        from transformers.utils import logging as hf_logging

        config = kwargs.get("config")
        if isinstance(config, ComposedVLMConfig):
            asset = config.vision_weights == "asset"
        else:
            file = os.path.join(str(args[0] if args else kwargs.get("pretrained_model_name_or_path", "")), "config.json")
            asset = os.path.isfile(file) and read_config_field(file, "vision_weights") == "asset"
        if not asset:
            return super().from_pretrained(*args, **kwargs)
        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the tower's weights are missing on purpose
        try:
            model = super().from_pretrained(*args, **kwargs)
        finally:
            hf_logging.set_verbosity(level)
        model.load_asset_tower()
        return model

    @torch.no_grad()
    def load_asset_tower(self) -> None:
        """Fill the vision tower from its offline asset package (one-line error naming the pip command if absent)."""
        kind = self.config.vision.get("kind")
        check(kind == "efficientnet_lite0", f"vision_weights='asset' needs a tower with an asset package "
                                            f"(efficientnet_lite0), not {kind!r}")
        source = resolve_vision(kind)
        ref = next(self.vision_tower.parameters())
        state = self.vision_tower.loadable_state(source.state)
        self.vision_tower.encoder.load_state_dict({k: v.to(ref.device) for k, v in state.items()})

    def _init_weights(self, module: nn.Module) -> None:
        """Only the projector (and the newline vector) are ours to initialize; tower and LM come with weights."""
        if isinstance(module, Projector):
            module.reset_parameters()
        if module is self:
            self.reset_newline()

    def reset_newline(self) -> None:
        """image_newline ~ N(0, 1/D), as LLaVA initializes it."""
        newline = getattr(self, "image_newline", None)
        if newline is not None:
            with torch.no_grad():
                newline.normal_(0.0, newline.shape[0] ** -0.5)

    # ---- embeddings delegate to the language model ------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.language_model.get_decoder()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        return self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    # ---- vision ------------------------------------------------------------------------------------------------
    def image_features(self, pixel_values: Tensor) -> Tensor:
        """pixels [N_tiles, 3, H, W] -> projected visual tokens [N_tiles, T, D_text] (T = num_image_tokens)."""
        tokens = self.vision_tower(pixel_values)  # [N_tiles, T, C]
        return self.projector(tokens.to(next(self.projector.parameters()).dtype))

    def merged_image_features(self, pixel_values: Tensor, image_sizes: Tensor | None = None,
                              image_tiles: Tensor | None = None) -> Tensor:
        """Every image's visual tokens, images in order: [sum of tokens per image, D_text].

        Default layout: T tokens per image (= image_features flattened). Variable-resolution layouts
        (vision/anyres.py) need the processor's `image_sizes` [N_img, 2] (width, height) and `image_tiles` [N_img]."""
        feats = self.image_features(pixel_values)  # [N_tiles, T, D]
        layout = self.config.image_layout
        if layout.is_default:
            return feats.flatten(0, 1)
        check(image_sizes is not None and image_tiles is not None,
              f"{layout.aspect}/{layout.merge} images need image_sizes and image_tiles from the processor")
        tiles = [int(n) for n in image_tiles.tolist()]
        check(sum(tiles) == feats.shape[0], f"image_tiles add up to {sum(tiles)} tiles but {feats.shape[0]} were given")
        sizes = [(int(w), int(h)) for w, h in image_sizes.tolist()]
        newline = getattr(self, "image_newline", None)
        return torch.cat([assemble(f, size, layout, newline) for f, size in zip(feats.split(tiles), sizes)])

    def embed(self, input_ids: Tensor, pixel_values: Tensor | None = None, image_sizes: Tensor | None = None,
              image_tiles: Tensor | None = None) -> Tensor:
        """ids [N, L] (+ pixels) -> embeddings [N, L, D] with image features at the image tokens."""
        embeds = self.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        feats = self.merged_image_features(pixel_values, image_sizes, image_tiles)  # [image tokens, D]
        return scatter_image_features(embeds, input_ids, self.config.image_token_id, feats)

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, labels: Tensor | None = None,
                inputs_embeds: Tensor | None = None, image_sizes: Tensor | None = None,
                image_tiles: Tensor | None = None, **kwargs: Any) -> Any:
        """The AR forward of the language model on the merged embeddings (loss = shifted CE when labels)."""
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, pixel_values, image_sizes, image_tiles)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels,
                                   **kwargs)


def read_config_field(file: str, name: str) -> Any:
    """One field of a config.json (None when absent), read before transformers builds the config."""
    with open(file, encoding="utf-8") as fh:
        return json.load(fh).get(name)


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForImageTextToText.from_pretrained` know `diffusionvl_llava` (idempotent;
    called explicitly by the loaders, never as an import side effect)."""
    AutoConfig.register(MODEL_TYPE, ComposedVLMConfig, exist_ok=True)
    AutoModelForImageTextToText.register(ComposedVLMConfig, ComposedVLM, exist_ok=True)


# ------------------------------------------------------------------------------------------------ processor


def image_chat_template(template: str, image_token: str, image_text: str | None = None) -> str:
    """Wrap a text chat template so list contents are flattened to text, image parts becoming `image_text`
    (default: the image token itself; LLaVA-trained models expect "<image>\n")."""
    if template.startswith(TEMPLATE_MARK):
        return template
    literal = json.dumps(image_token if image_text is None else image_text)
    preamble = (
        TEMPLATE_MARK
        + "{%- set _dvl = namespace(messages=[]) -%}"
        "{%- for _m in messages -%}"
        "{%- if _m.content is defined and _m.content is not string and _m.content is iterable"
        " and _m.content is not mapping -%}"
        "{%- set _t = namespace(text='') -%}"
        "{%- for _p in _m.content -%}"
        "{%- if _p is string -%}{%- set _t.text = _t.text + _p -%}"
        "{%- elif _p['type'] in ('image', 'image_url') -%}{%- set _t.text = _t.text + " + literal + " -%}"
        "{%- elif _p['type'] == 'text' -%}{%- set _t.text = _t.text + _p['text'] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set _dvl.messages = _dvl.messages + [dict(_m, content=_t.text)] -%}"
        "{%- else -%}{%- set _dvl.messages = _dvl.messages + [_m] -%}{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = _dvl.messages -%}"
    )
    return preamble + template


class ComposedProcessor:
    """Tokenizer + image preprocessing of a composed VLM (module docstring)."""

    def __init__(self, tokenizer: Any, image_token: str = "<image>", num_image_tokens: int = 49,
                 transform: ImageTransform | None = None, layout: ImageLayout | None = None):
        self.tokenizer = tokenizer
        self.image_token = image_token
        self.num_image_tokens = int(num_image_tokens)
        self.transform = transform or ImageTransform()
        self.layout = (layout or ImageLayout()).validate()  # default: one tile of num_image_tokens per image
        self.image_token_id = find_token_id(tokenizer, image_token)
        if self.image_token_id is None:
            raise DiffusionVLError(f"the tokenizer has no image token {image_token!r}; compose the model first")

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=tokenize, **kwargs)

    def preprocess(self, images: list[Any]) -> Tensor:
        """PIL images -> pixels [N_img, 3, S, S]."""
        return preprocess_images(list(images), self.transform)

    def _as_pil(self, image: Any) -> Any:
        import numpy as np
        from PIL import Image

        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise DiffusionVLError(f"expected a PIL image or an HxWx3 array, got {type(image).__name__}")
        return image

    def tile_images(self, images: list[Any], per_text: list[int]) -> tuple[Tensor, list[tuple[int, int]], list[int]]:
        """Variable-resolution layouts: images (in text order; `per_text` images per text) -> pixels of all tiles
        [N_tiles, 3, S, S], each image's (width, height) and its tile count."""
        aspects = [self.layout.aspect_for(n) for n in per_text for _ in range(n)]
        color = tuple(int(m * 255) for m in self.transform.mean)
        tiles, sizes, counts = [], [], []
        for image, aspect in zip(images, aspects):
            image = self._as_pil(image)
            parts = image_tiles(image, aspect, self.layout, color)
            sizes.append(image.size)
            counts.append(len(parts))
            transform = self.transform if aspect == "square" else ImageTransform(self.layout.tile, self.transform.mean,
                                                                                 self.transform.std, None)
            tiles.append(preprocess_images(parts, transform))
        return torch.cat(tiles), sizes, counts

    def image_token_counts(self, sizes: list[tuple[int, int]], tiles: list[int]) -> list[int]:
        """Placeholders per image: exactly the visual tokens the model will produce for it."""
        if self.layout.is_default:
            return [self.num_image_tokens] * len(sizes)
        return [self.layout.num_tokens(size, n) for size, n in zip(sizes, tiles)]

    def __call__(self, text: str | list[str], images: Any = None, return_tensors: str = "pt",
                 padding: bool | str = True, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else ([images] if not isinstance(images, (list, tuple)) else list(images))
        images = [im for item in images for im in (item if isinstance(item, (list, tuple)) else [item])]  # nested
        n_placeholders = sum(t.count(self.image_token) for t in texts)
        if n_placeholders != len(images):
            raise DiffusionVLError(f"{len(images)} image(s) given but the text has {n_placeholders} "
                                   f"{self.image_token} placeholder(s)")
        kwargs.setdefault("add_special_tokens", not self.chat_template)  # the chat template writes BOS itself
        if self.layout.is_default:
            expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
            enc = dict(self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs))
            if images:
                enc["pixel_values"] = self.preprocess(images)
            return BatchFeature(enc)
        per_text = [t.count(self.image_token) for t in texts]
        vision: dict[str, Tensor] = {}
        counts: list[int] = []
        if images:
            pixels, sizes, tiles = self.tile_images(images, per_text)
            counts = self.image_token_counts(sizes, tiles)
            vision = {"pixel_values": pixels, "image_sizes": torch.tensor(sizes, dtype=torch.long).view(-1, 2),
                      "image_tiles": torch.tensor(tiles, dtype=torch.long)}
        expanded, k = [], 0
        for text, n in zip(texts, per_text):
            pieces = text.split(self.image_token)
            expanded.append(pieces[0] + "".join(self.image_token * counts[k + i] + p for i, p in enumerate(pieces[1:])))
            k += n
        enc = dict(self.tokenizer(expanded, padding=padding, return_tensors=return_tensors, **kwargs))
        return BatchFeature({**enc, **vision})

    def batch_decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> Any:
        return self.tokenizer.decode(*args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = {"processor_class": type(self).__name__, "image_token": self.image_token,
               "num_image_tokens": self.num_image_tokens, "image_transform": self.transform.to_dict()}
        if not self.layout.is_default:
            out["image_layout"] = self.layout.to_dict()
        return out

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        os.makedirs(path, exist_ok=True)
        self.tokenizer.save_pretrained(path)
        with open(os.path.join(path, PROCESSOR_FILE), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> "ComposedProcessor":
        from transformers import AutoTokenizer

        data = read_processor_config(path)
        if data is None:
            raise DiffusionVLError(f"{path} has no {PROCESSOR_FILE} of a composed VLM")
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        layout = ImageLayout.from_dict(data["image_layout"]) if data.get("image_layout") else None
        return cls(tokenizer, data["image_token"], data["num_image_tokens"],
                   ImageTransform.from_dict(data["image_transform"]), layout)


def read_processor_config(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The saved ComposedProcessor settings at `path`, or None when the folder holds another kind of processor."""
    file = os.path.join(path, PROCESSOR_FILE)
    try:
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("processor_class") == ComposedProcessor.__name__ else None


# -------------------------------------------------------------------------------------------------- compose


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """Skip random initialization of modules whose weights are copied in right after (saves seconds)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: initialize, then overwrite
        return contextlib.nullcontext()
    return no_init_weights()


def _prepare_tokenizer(tokenizer: Any, image_token: str, chat_template: str | None) -> Any:
    """A copy of the LM tokenizer with the image token (special) and an image-aware chat template."""
    tok = copy.deepcopy(tokenizer)
    if find_token_id(tok, image_token) is None:
        tok.add_tokens([image_token], special_tokens=True)
    template = chat_template or getattr(tok, "chat_template", None)
    if not template:
        raise DiffusionVLError("the language model's tokenizer has no chat template; pass chat_template=... "
                               "(a Jinja chat template) to compose")
    tok.chat_template = image_chat_template(template, image_token)
    return tok


def compose(lm: Any, tokenizer: Any, vision: Any = "efficientnet_lite0", projector: str = "mlp2x_gelu",
            pool: int | None = None, image_token: str = "<image>", feature_layer: int = -2,
            chat_template: str | None = None, vision_pretrained: bool = True, image_aspect_ratio: str = "square",
            image_grid_pinpoints: Any = None, patch_merge: str = "flat",
            vision_options: dict[str, Any] | None = None,
            transform_options: dict[str, Any] | None = None) -> tuple[ComposedVLM, ComposedProcessor]:
    """AR text LM + vision encoder -> (ComposedVLM, ComposedProcessor); see the module docstring.

    vision: "efficientnet_lite0" (offline ImageNet weights), "timm:NAME", a HF vision model folder, or a module
    (EfficientNetLite0, a transformers vision model such as SiglipVisionModel/CLIPVisionModel or a dual encoder,
    a timm model). pool: average-pool the encoder's grid to pool x pool tokens per image.
    image_aspect_ratio / image_grid_pinpoints / patch_merge: variable-resolution images (ComposedVLMConfig; e.g.
    "anyres_max_4", "(1x1),...,(3x3)", "spatial_unpad" for LLaVA-OneVision-style tiling).
    vision_options: extra tower spec fields, saved with the model (e.g. {"extra_stages": [2]} for EfficientNet).
    transform_options: changes to the encoder's preprocessing (e.g. {"crop_pct": None}: resize the whole image,
    crop nothing), saved with the model.
    """
    check(projector in PROJECTORS, f"unknown projector {projector!r}; choose one of {', '.join(PROJECTORS)}")
    check(pool is None or (isinstance(pool, int) and pool >= 1), f"pool must be an integer >= 1, got {pool!r}")
    source = resolve_vision(vision, pretrained=vision_pretrained)
    if vision_options:
        source = dc_replace(source, spec={**source.spec, **vision_options})
    if transform_options:
        source = dc_replace(source, transform=dc_replace(source.transform, **transform_options))
    tower = build_tower(source.spec, pool, feature_layer)
    tower.encoder.load_state_dict(tower.loadable_state(source.state))
    n_tokens, width = tower.output_shape(source.transform.size)
    tok = _prepare_tokenizer(tokenizer, image_token, chat_template)
    t = source.transform
    config = ComposedVLMConfig(
        text_config=copy.deepcopy(lm.config), vision=source.spec, vision_hidden_size=width, projector=projector,
        image_token=image_token, image_token_id=find_token_id(tok, image_token), num_image_tokens=n_tokens, pool=pool,
        feature_layer=feature_layer, image_size=t.size, image_mean=t.mean, image_std=t.std, image_crop_pct=t.crop_pct,
        image_aspect_ratio=image_aspect_ratio, image_grid_pinpoints=image_grid_pinpoints, patch_merge=patch_merge)
    layout = checked_layout(config)
    with _no_init():
        model = ComposedVLM(config)
    model.vision_tower.load_state_dict(tower.state_dict())
    model.language_model.load_state_dict(lm.state_dict())
    model.tie_weights()  # construction without init skipped the tying of a tied LM head
    model.projector.reset_parameters()
    model.reset_newline()
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=False)  # the image token's row is never read
    model.generation_config = copy.deepcopy(lm.generation_config)
    first = next(lm.parameters())
    model.to(device=first.device, dtype=first.dtype)
    processor = ComposedProcessor(tok, image_token, n_tokens, source.transform, layout)
    return model.train(lm.training), processor


def checked_layout(config: ComposedVLMConfig) -> ImageLayout:
    """The config's image layout, validated (variable-resolution layouts need a square token grid per tile)."""
    layout = config.image_layout.validate()
    check(layout.is_default or layout.side ** 2 == config.num_image_tokens,
          f"{layout.aspect}/{layout.merge} images need a square grid of tokens per tile, but the tower gives "
          f"{config.num_image_tokens}")
    return layout
