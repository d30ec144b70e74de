"""Torchvision-free processors: Qwen-VL style (image pad tokens expanded per image grid), Pixtral's rows, and
transformers' own processor classes without their video half.

Contract: transformers' Qwen2-VL/Qwen2.5-VL processors require a video processor, which needs torchvision; on
machines without it (CPU CI, minimal installs) `ImagePadProcessor` provides the part of the processor API the
engine uses, with the same token layout: `__call__(text=[...], images=[...], return_tensors="pt", padding=True)`
returns input_ids/attention_mask/pixel_values/image_grid_thw, each `<|image_pad|>` in the text expanded to
grid_t * grid_h * grid_w / merge^2 copies; `apply_chat_template`, `tokenizer`, `image_processor`,
`save_pretrained`/`from_pretrained` (standard tokenizer + preprocessor_config.json files, so the real processor
loads the same folder). `load_processor` prefers the transformers processor and falls back to this one; a folder
saved by `diffusionvl.backbone.compose.ComposedProcessor` (its `processor_config.json` names the class) loads as that.
`PixtralRowsProcessor` is the same stand-in for Mistral 3's PixtralProcessor (whose module imports torchvision):
its row layout, its saved settings; `STAND_INS` maps the class name a folder saves to the stand-in.

`image_only(cls)`: a transformers processor class whose family also takes video (InternVL, LLaVA-OneVision, SmolVLM)
without its video processor, which needs torchvision: the family's own `__call__`, token layout, chat template and
saved files (`processor_class` is the family's name, so a machine with torchvision loads the full class).
`load_processor` builds a folder's named processor class from its saved parts (`saved_family_processor`: the PIL
image processor, image_only where the class takes video) when AutoProcessor cannot build it here.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

from diffusionvl.backbone.tokens import find_token_id
from diffusionvl.core.errors import DiffusionVLError


class ImagePadProcessor:
    def __init__(self, image_processor: Any, tokenizer: Any, chat_template: str | None = None,
                 image_token: str = "<|image_pad|>"):
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        self.image_token = image_token
        self.image_token_id = find_token_id(tokenizer, image_token)

    def apply_chat_template(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        kwargs.setdefault("chat_template", self.chat_template)
        return self.tokenizer.apply_chat_template(messages, **kwargs)

    def __call__(self, text: list[str] | str, images: list[Any] | None = None, return_tensors: str = "pt",
                 padding: bool = True, **kwargs: Any) -> Any:
        from transformers import BatchFeature

        texts = [text] if isinstance(text, str) else list(text)
        image_inputs: dict[str, Any] = {}
        if images:
            image_inputs = dict(self.image_processor(images=images, return_tensors="pt", **self.image_kwargs()))
            texts = self._expand(texts, self.replacements(image_inputs))
        enc = dict(self.tokenizer(texts, padding=padding, return_tensors=return_tensors, **kwargs))
        if self.token_types:
            enc["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()  # 1 = image token, as HF
        return BatchFeature({**enc, **image_inputs})

    token_types = True  # the output carries mm_token_type_ids, as the Qwen-VL processors' does

    def image_kwargs(self) -> dict[str, Any]:
        """Extra arguments of the image processor call."""
        return {}

    def replacements(self, image_inputs: dict[str, Any]) -> list[str]:
        """Each image's text in place of its placeholder: grid_t * grid_h * grid_w / merge^2 pad tokens."""
        counts = (image_inputs["image_grid_thw"].prod(-1) // self.image_processor.merge_size ** 2).tolist()
        return [self.image_token * n for n in counts]

    def _expand(self, texts: list[str], replacements: list[str]) -> list[str]:
        out, k = [], 0
        for t in texts:
            pieces = t.split(self.image_token)
            if k + len(pieces) - 1 > len(replacements):
                raise DiffusionVLError("more image placeholders in the prompt than images")
            expanded = pieces[0]
            for piece in pieces[1:]:
                expanded += replacements[k] + piece
                k += 1
            out.append(expanded)
        if k != len(replacements):
            raise DiffusionVLError(f"{len(replacements)} images given but the prompts have {k} image placeholders")
        return out

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        if self.chat_template:
            self.tokenizer.chat_template = self.chat_template
        self.tokenizer.save_pretrained(path)
        self.image_processor.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> "ImagePadProcessor":
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tok = AutoTokenizer.from_pretrained(path, **kwargs)
        images = Qwen2VLImageProcessorPil.from_pretrained(path)
        return cls(images, tok)


class PixtralRowsProcessor(ImagePadProcessor):
    """A torchvision-free stand-in for transformers' PixtralProcessor (Mistral 3), with its token layout: each [IMG]
    in the text becomes one row of [IMG] per patch_size * spatial_merge_size pixels of the resized image's width,
    each row closed by [IMG_BREAK], the last by [IMG_END]; pixel_values and image_sizes from the PIL Pixtral image
    processor. It saves what PixtralProcessor reads (processor_config.json with its settings)."""

    token_types = False

    def __init__(self, image_processor: Any, tokenizer: Any, patch_size: int = 16, spatial_merge_size: int = 1,
                 chat_template: str | None = None, image_token: str = "[IMG]",
                 image_break_token: str = "[IMG_BREAK]", image_end_token: str = "[IMG_END]"):
        super().__init__(image_processor, tokenizer, chat_template, image_token)
        self.settings = {"patch_size": patch_size, "spatial_merge_size": spatial_merge_size, "image_token": image_token,
                         "image_break_token": image_break_token, "image_end_token": image_end_token}

    def image_kwargs(self) -> dict[str, Any]:
        return {"patch_size": self.settings["patch_size"] * self.settings["spatial_merge_size"]}

    def replacements(self, image_inputs: dict[str, Any]) -> list[str]:
        step = self.image_kwargs()["patch_size"]
        brk, end = self.settings["image_break_token"], self.settings["image_end_token"]
        rows = [(self.image_token * (w // step) + brk) * (h // step) for h, w in image_inputs["image_sizes"].tolist()]
        return [r[: -len(brk)] + end for r in rows]

    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        super().save_pretrained(path)
        config = {"processor_class": "PixtralProcessor", **self.settings}
        (Path(path) / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> "PixtralRowsProcessor":
        from transformers import AutoTokenizer
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        saved = json.loads((Path(path) / "processor_config.json").read_text(encoding="utf-8"))
        settings = {k: saved[k] for k in inspect.signature(cls.__init__).parameters if k in saved}
        return cls(PixtralImageProcessorPil.from_pretrained(path), AutoTokenizer.from_pretrained(path, **kwargs),
                   **settings)


STAND_INS = {"PixtralProcessor": PixtralRowsProcessor}  # transformers processors that need torchvision


def load_processor(path: str | os.PathLike[str], vision: bool, **kwargs: Any) -> Any:
    """The tokenizer (text models) or processor (VLMs) saved at `path`."""
    from transformers import AutoProcessor, AutoTokenizer

    if not vision:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    from diffusionvl.backbone.compose import ComposedProcessor, read_processor_config

    if read_processor_config(path) is not None:  # a composed VLM (diffusionvl.backbone.compose)
        return ComposedProcessor.from_pretrained(path, **kwargs)
    try:
        return AutoProcessor.from_pretrained(path, **kwargs)
    except (AttributeError, TypeError, ValueError, ImportError, OSError):
        return saved_family_processor(path, **kwargs) or ImagePadProcessor.from_pretrained(path, **kwargs)


def saved_family_processor(path: str | os.PathLike[str], **kwargs: Any) -> Any | None:
    """The transformers processor class named in the folder's processor_config.json, built from its saved parts when
    AutoProcessor cannot build it here (its video processor or its image processor's fast variant needs
    torchvision): the tokenizer, the PIL variant of the saved image processor, the saved settings; a class that
    also takes video goes through `image_only`. None when the folder names no such class or image processor."""
    import transformers
    from transformers import AutoTokenizer

    config = Path(path) / "processor_config.json"
    saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    cls = getattr(transformers, str(saved.get("processor_class")), None)
    if saved.get("processor_class") in STAND_INS and (cls is None or getattr(cls, "is_dummy", False)):
        return STAND_INS[saved["processor_class"]].from_pretrained(path, **kwargs)
    images = saved.get("image_processor")
    images = pil_image_processor(images) if isinstance(images, dict) and "image_processor_type" in images else None
    if cls is None or images is None:
        return None
    if "video_processor" in inspect.signature(cls.__init__).parameters:
        cls = image_only(cls)
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "image_processor", "tokenizer"}
    settings = {k: v for k, v in saved.items() if k in known}
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    settings.setdefault("chat_template", getattr(tok, "chat_template", None))
    return cls(images, tok, **settings)


def pil_image_processor(saved: dict[str, Any]) -> Any | None:
    """The PIL (torchvision-free) variant of a saved image processor, `XImageProcessor` -> `XImageProcessorPil` from
    transformers.models.x.image_processing_pil_x (x: X in snake case, or in lower case as SmolVLM -> smolvlm),
    imported directly (some releases mark the PIL class as needing torchvision in the package
    index although its module does not); None where there is no such module."""
    name = str(saved["image_processor_type"]).removesuffix("Pil").removesuffix("Fast")
    stem = name.removesuffix("ImageProcessor")
    module = _pil_module(re.sub(r"(?<!^)(?=[A-Z])", "_", stem).lower()) or _pil_module(stem.lower())
    pil = getattr(module, name + "Pil", None)
    return pil.from_dict({k: v for k, v in saved.items() if k != "image_processor_type"}) if pil else None


def _pil_module(family: str) -> Any | None:
    import importlib

    try:
        return importlib.import_module(f"transformers.models.{family}.image_processing_pil_{family}")
    except ImportError:
        return None


class NoVideo:
    """The video processor of an `image_only` class: the frame sampling defaults a family reads off it outside video
    calls (SmolVLM's `apply_chat_template`) are unset."""

    num_frames = None
    fps = None


@functools.lru_cache(maxsize=None)
def image_only(cls: type) -> type:
    """`cls` (a transformers ProcessorMixin taking image_processor, tokenizer, video_processor) without the video
    processor. transformers reads a processor's parts, and the settings it saves, from its `__init__` signature: the
    subclass's signature is `cls`'s without `video_processor`; its `video_processor` is a class-level `NoVideo`."""
    sig = inspect.signature(cls.__init__)

    def __init__(self: Any, image_processor: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> None:
        cls.__init__(self, image_processor, tokenizer, None, *args, **kwargs)

    __init__.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[p for p in sig.parameters.values() if p.name != "video_processor"])
    body = {"__init__": __init__, "__module__": cls.__module__, "video_processor": NoVideo()}
    return type(cls.__name__, (cls,), body)


def make_qwen_vl_processor(cls: Any, image_processor: Any, tokenizer: Any, chat_template: str | None) -> Any:
    """transformers' processor class `cls` when it can be built here, else the torchvision-free equivalent."""
    try:
        return cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                   chat_template=chat_template)
    except (AttributeError, TypeError, ValueError, ImportError):
        return ImagePadProcessor(image_processor, tokenizer, chat_template)
