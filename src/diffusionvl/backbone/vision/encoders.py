"""Vision towers for composed VLMs: any encoder -> a sequence of visual tokens, built from a JSON-able spec.

Contract:
- A tower is an `nn.Module` whose `forward(pixels [N, 3, H, W]) -> [N, T, C]` returns T visual tokens of width C
  per image; `.encoder` is the wrapped backbone. Towers are rebuilt from a spec dict saved in the model config:
  `{"kind": "efficientnet_lite0"}` (our native `EfficientNetLite0`, classifier dropped; `"extra_stages": [i, ...]`
  appends the outputs of those stages, pooled to the token grid (`"pooling"`: "avg" (default), "max", "avgmax",
  "maxmin" or "avgmaxmin": those poolings side by side) and rescaled per token to the final features' energy (squared norm), to the 1280
  final channels (`"final": false` drops the final channels and keeps the mid-level ones, each group scaled per image
  to unit mean energy per channel; `"standardize": {"mean": [C], "std": [C]}` then maps every channel to zero mean
  and unit variance with statistics measured once on sample images, `token_statistics`, so that a projector sees
  well-conditioned inputs): ImageNet's
  final features are nearly colour-invariant, early stages are not),
  `{"kind": "hf", "config": <transformers vision config dict>}` (SigLIP, CLIP, ... through `AutoModel`),
  `{"kind": "timm", "name": <timm model name>}` (built by name with `timm.create_model`; timm is imported lazily and
  its absence is a one-line `DiffusionVLError`). `TOWERS` is the registry, `build_tower(spec, pool, feature_layer)`
  the constructor; the weights are loaded separately (state dict / safetensors).
- Token selection: CNN feature maps [N, C, h, w] become h*w tokens in row-major order; ViT hidden states (layer
  `feature_layer` for HF towers) keep their patch tokens only (leading CLS/register tokens dropped). `pool = k`
  average-pools the patch grid to k x k (k*k tokens), which keeps CPU sequences short.
- A tower whose parameters are all frozen keeps its normalization layers (BatchNorm) in eval mode even while the
  model trains, so a frozen encoder is really frozen (no drifting running statistics); such a tower reads its
  tokens from `token_cache` (vision/cache.py) when one is attached.
- `resolve_vision(vision)` turns what a user passes (a name, a path, a module) into (spec, encoder state dict,
  `ImageTransform`); `preprocess_images(images, transform)` is the torchvision-free preprocessing.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from importlib import import_module
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from diffusionvl.core.errors import DiffusionVLError

Tensor = torch.Tensor
TIMM_MISSING = "timm is not installed: run `pip install timm` to use timm vision backbones (timm:NAME)"


# ------------------------------------------------------------------------------------------- preprocessing


@dataclass
class ImageTransform:
    """How images become pixels for one encoder (resize, optional center crop, normalize)."""

    size: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    crop_pct: float | None = None  # None: resize to size x size; else short side to size / crop_pct, center crop

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ImageTransform":
        return cls(size=int(data["size"]), mean=tuple(data["mean"]), std=tuple(data["std"]),
                   crop_pct=data.get("crop_pct"))


CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _resize(image: Image.Image, size: int, crop_pct: float | None) -> Image.Image:
    """Square bicubic resize, or (with crop_pct) timm's resize-short-side-then-center-crop."""
    if crop_pct is None:
        return image.convert("RGB").resize((size, size), Image.BICUBIC)
    from diffusionvl.backbone.vision.efficientnet import resize_and_crop

    return resize_and_crop(image, size, crop_pct)


def preprocess_images(images: list[Any], transform: ImageTransform) -> Tensor:
    """PIL images (or HxWx3 uint8 arrays) -> normalized pixels [N, 3, size, size] (float32)."""
    arrays = []
    for image in images:
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise DiffusionVLError(f"expected a PIL image or an HxWx3 array, got {type(image).__name__}")
        arrays.append(np.asarray(_resize(image, transform.size, transform.crop_pct), dtype=np.float32))
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0  # [N, 3, S, S] in [0, 1]
    mean = torch.tensor(transform.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(transform.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (batch - mean) / std


# ----------------------------------------------------------------------------------------------- towers


def grid_tokens(features: Tensor, pool: int | None) -> Tensor:
    """Feature map [N, C, h, w] -> tokens [N, T, C] (T = h*w, or pool*pool after adaptive average pooling)."""
    if pool:
        features = F.adaptive_avg_pool2d(features, pool)
    return features.flatten(2).transpose(1, 2)


def patch_tokens(hidden: Tensor, n_patches: int, pool: int | None) -> Tensor:
    """ViT hidden states [N, prefix + P, C] -> the P patch tokens [N, P, C], grid-pooled to pool*pool if asked."""
    patches = hidden[:, hidden.shape[1] - n_patches:]  # drop CLS / register tokens in front
    if not pool:
        return patches
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise DiffusionVLError(f"cannot pool {n_patches} patch tokens: they do not form a square grid")
    grid = patches.transpose(1, 2).reshape(patches.shape[0], -1, side, side)  # [N, C, side, side]
    return grid_tokens(grid, pool)


class VisionTower(nn.Module):
    """Base class: subclasses set `self.encoder` and implement `tokens(pixels) -> [N, T, C]`."""

    kind = ""

    def __init__(self, spec: dict[str, Any], pool: int | None = None, feature_layer: int = -2):
        super().__init__()
        self.spec = dict(spec)
        self.pool = pool
        self.feature_layer = feature_layer

    def tokens(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError

    def output_shape(self, size: int) -> tuple[int, int]:
        """(tokens per image T, token width C) at `size` x `size` pixels; default: one dummy forward."""
        return probe(self, size)

    def forward(self, pixels: Tensor) -> Tensor:  # [N, 3, H, W] -> [N, T, C]
        trainable = any(p.requires_grad for p in self.encoder.parameters())
        if self.encoder.training != (self.training and trainable):
            self.encoder.train(self.training and trainable)  # frozen: BatchNorm statistics stay fixed
        cache = getattr(self, "token_cache", None)  # vision/cache.py, attached by the trainer for a frozen tower
        if cache is not None and not trainable:
            return cache(pixels, lambda px: self.tokens(px.to(self.dtype)))
        return self.tokens(pixels.to(self.dtype))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def loadable_state(self, encoder_state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The subset of a backbone state dict this tower's encoder takes (classifier heads dropped; a key prefix
        such as `vision_model.` that differs between transformers versions is added or stripped)."""
        own = self.encoder.state_dict()
        encoder_state = align_prefix(list(own), encoder_state)
        missing = sorted(set(own) - set(encoder_state))
        if missing:
            raise DiffusionVLError(f"the {self.kind} vision weights lack {len(missing)} tensors (e.g. {missing[0]}): "
                                   "wrong encoder for this spec")
        return {k: encoder_state[k] for k in own}


def align_prefix(keys: list[str], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` renamed so that its keys line up with `keys` when the two differ only by a leading prefix."""
    if not keys or keys[0] in state:
        return state
    first = keys[0]
    for name in state:
        if name.endswith("." + first):  # state has an extra prefix: strip it
            cut = len(name) - len(first)
            return {k[cut:]: v for k, v in state.items() if k.startswith(name[:cut])}
        if first.endswith("." + name):  # state lacks a prefix: add it
            extra = first[: len(first) - len(name)]
            return {extra + k: v for k, v in state.items()}
    return state


class EfficientNetTower(VisionTower):
    kind = "efficientnet_lite0"

    def __init__(self, spec: dict[str, Any], pool: int | None = None, feature_layer: int = -2):
        super().__init__(spec, pool, feature_layer)
        from diffusionvl.backbone.vision.efficientnet import EfficientNetLite0

        self.encoder = EfficientNetLite0(num_classes=0)

        self.extra_stages = [int(i) for i in spec.get("extra_stages", [])]
        self.pooling = str(spec.get("pooling", "avg"))
        self.use_final = bool(spec.get("final", True))
        # {"mean": [C], "std": [C]}: per-channel token statistics, kept in the spec (not buffers: a model loaded with
        # from_pretrained builds modules on the meta device and would leave non-persistent buffers uninitialized)
        self.standardize = spec.get("standardize")
        if not self.use_final and not self.extra_stages:
            raise DiffusionVLError('"final": false needs at least one of extra_stages')
        if self.pooling not in POOLINGS:
            raise DiffusionVLError(f"unknown pooling {self.pooling!r} for extra_stages; choose one of "
                                   f"{', '.join(POOLINGS)}")
        n_stages = len(self.encoder.blocks)
        bad = [i for i in self.extra_stages if not -1 <= i < n_stages - 1]
        if bad:
            raise DiffusionVLError(f"extra_stages {bad} out of range: EfficientNet-Lite0 stages are -1 (pixels), 0..{n_stages - 2} "
                                   f"(the last one feeds the final features)")

    def tokens(self, pixels: Tensor) -> Tensor:
        out = self._raw_tokens(pixels)  # [N, T, C]
        if not self.standardize:
            return out
        mean = torch.tensor(self.standardize["mean"], dtype=out.dtype, device=out.device)
        std = torch.tensor(self.standardize["std"], dtype=out.dtype, device=out.device)
        return (out - mean) / std

    def _raw_tokens(self, pixels: Tensor) -> Tensor:
        if not self.extra_stages:
            return grid_tokens(self.encoder.forward_features(pixels), self.pool)  # [N, 49 or pool^2, 1280]
        final, kept = self.encoder.features_and_stages(pixels, [i for i in self.extra_stages if i >= 0])
        if -1 in self.extra_stages:  # stage -1: the input pixels themselves (colour, before any ImageNet invariance)
            kept.insert(0, pixels)
        grid = (self.pool, self.pool) if self.pool else final.shape[-2:]
        groups = [m for k in kept for m in _pooled(k, grid, self.pooling)]  # [N, C_i, g, g] each
        if not self.use_final:  # mid-level features only: each group at unit mean energy per channel, per image
            return grid_tokens(torch.cat([_unit_energy(m) for m in groups], dim=1), None)
        final = F.adaptive_avg_pool2d(final, grid)
        energy = final.pow(2).sum(1, keepdim=True)  # [N, 1, g, g]: the final features' energy per token
        maps = [final] + [_energy_matched(m, energy) for m in groups]
        return grid_tokens(torch.cat(maps, dim=1), None)  # [N, T, 1280 + sum C_i * len(pooling)]

    def output_shape(self, size: int) -> tuple[int, int]:
        if self.extra_stages:
            return probe(self, size)
        side = math.ceil(size / 32)  # five stride-2 stages, TF "SAME" padding
        return (self.pool or side) ** 2, self.encoder.num_features


POOLINGS = ("avg", "max", "avgmax", "maxmin", "avgmaxmin")


def _pooled(features: Tensor, grid: tuple[int, int], pooling: str) -> list[Tensor]:
    """A mid-level map [N, C, h, w] pooled to the token grid: its average, maximum and/or minimum (max and min keep
    a small object's colour that averaging over a mostly-background cell dilutes)."""
    out = []
    if pooling.startswith("avg"):
        out.append(F.adaptive_avg_pool2d(features, grid))
    if "max" in pooling:
        out.append(F.adaptive_max_pool2d(features, grid))
    if pooling.endswith("min"):
        out.append(-F.adaptive_max_pool2d(-features, grid))
    return out


def _unit_energy(features: Tensor) -> Tensor:
    """[N, C, h, w] scaled per image so that the mean squared norm per position is C (relative magnitudes between
    positions, i.e. object vs background, are kept)."""
    energy = features.pow(2).sum(1).mean((1, 2)).clamp_min(1e-12)  # [N]
    return features * (features.shape[1] / energy).sqrt().view(-1, 1, 1, 1)


def _energy_matched(features: Tensor, energy: Tensor) -> Tensor:
    """[N, C, h, w] rescaled per position so its squared norm equals `energy` [N, 1, h, w]: each feature group then
    weighs the same in the projector. Raw mid-level EfficientNet channels are about 35x larger than the final ReLU6
    ones (they drowned them), while 40 channels at the final channels' RMS would be 3% of 1320 (barely heard)."""
    return features * (energy / features.pow(2).sum(1, keepdim=True).clamp_min(1e-12)).sqrt()


def hf_vision_config(data: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    data = dict(data)
    model_type = data.pop("model_type", None)
    if not model_type:
        raise DiffusionVLError("the HF vision spec has no model_type in its config")
    return AutoConfig.for_model(model_type, **data)


class HFTower(VisionTower):
    kind = "hf"

    def __init__(self, spec: dict[str, Any], pool: int | None = None, feature_layer: int = -2):
        super().__init__(spec, pool, feature_layer)
        from transformers import AutoModel

        cfg = hf_vision_config(spec["config"])
        self.encoder = AutoModel.from_config(cfg)
        self.n_patches = (int(cfg.image_size) // int(cfg.patch_size)) ** 2
        self.width = int(cfg.hidden_size)

    def tokens(self, pixels: Tensor) -> Tensor:
        out = self.encoder(pixel_values=pixels, output_hidden_states=True)
        return patch_tokens(out.hidden_states[self.feature_layer], self.n_patches, self.pool)

    def output_shape(self, size: int) -> tuple[int, int]:
        return (self.pool ** 2 if self.pool else self.n_patches), self.width


def import_timm() -> Any:
    try:
        return import_module("timm")
    except ImportError:
        raise DiffusionVLError(TIMM_MISSING) from None


class TimmTower(VisionTower):
    kind = "timm"

    def __init__(self, spec: dict[str, Any], pool: int | None = None, feature_layer: int = -2):
        super().__init__(spec, pool, feature_layer)
        self.encoder = import_timm().create_model(spec["name"], pretrained=False, num_classes=0)

    def tokens(self, pixels: Tensor) -> Tensor:
        feats = self.encoder.forward_features(pixels)
        if feats.dim() == 4:  # CNN: [N, C, h, w] (channels-last models such as Swin: [N, h, w, C])
            width = getattr(self.encoder, "num_features", feats.shape[1])
            if feats.shape[1] != width and feats.shape[-1] == width:
                feats = feats.permute(0, 3, 1, 2)
            return grid_tokens(feats, self.pool)
        prefix = int(getattr(self.encoder, "num_prefix_tokens", 0))  # ViT: [N, prefix + P, C]
        return patch_tokens(feats, feats.shape[1] - prefix, self.pool)


TOWERS: dict[str, type[VisionTower]] = {cls.kind: cls for cls in (EfficientNetTower, HFTower, TimmTower)}


def build_tower(spec: dict[str, Any], pool: int | None = None, feature_layer: int = -2) -> VisionTower:
    kind = spec.get("kind")
    if kind not in TOWERS:
        raise DiffusionVLError(f"unknown vision tower kind {kind!r}; choose one of {', '.join(TOWERS)}")
    return TOWERS[kind](spec, pool, feature_layer)


@torch.no_grad()
def probe(tower: VisionTower, size: int) -> tuple[int, int]:
    """(tokens per image T, token width C) of `tower` at `size` x `size` pixels, by one dummy forward."""
    was = tower.training
    tower.eval()
    out = tower(torch.zeros(1, 3, size, size))  # [1, T, C]
    tower.train(was)
    return int(out.shape[1]), int(out.shape[2])


# ------------------------------------------------------------------------------- what users pass -> a spec

@dataclass
class VisionSource:
    """A resolved vision encoder: its spec, the backbone's weights and its preprocessing."""

    spec: dict[str, Any]
    state: dict[str, Tensor]
    transform: ImageTransform


def _efficientnet_source(module: nn.Module) -> VisionSource:
    from diffusionvl.backbone.vision import efficientnet as eff

    state = {k: v for k, v in module.state_dict().items() if not k.startswith("classifier.")}
    transform = ImageTransform(eff.INPUT_SIZE, eff.MEAN, eff.STD, eff.CROP_PCT)
    return VisionSource({"kind": EfficientNetTower.kind}, state, transform)


def _hf_default_transform(config: Any) -> ImageTransform:
    size = int(config.image_size)
    if "clip" in config.model_type:  # CLIP: short side to size, center crop, CLIP statistics
        return ImageTransform(size, CLIP_MEAN, CLIP_STD, 1.0)
    return ImageTransform(size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), None)  # SigLIP and most others: squash, [-1, 1]


def _hf_source(model: nn.Module, transform: ImageTransform | None = None) -> VisionSource:
    config = model.config
    if getattr(config, "vision_config", None) is not None and hasattr(model, "vision_model"):
        config = config.vision_config  # dual encoder (CLIPModel, SiglipModel): keep the vision half
        state = {f"vision_model.{k}": v for k, v in model.vision_model.state_dict().items()}
    else:
        state = model.state_dict()
    if not hasattr(config, "image_size") or not hasattr(config, "patch_size"):
        raise DiffusionVLError(f"{config.model_type} is not a ViT-style vision model (no image_size/patch_size)")
    spec = {"kind": HFTower.kind, "config": config.to_dict()}
    return VisionSource(spec, state, transform or _hf_default_transform(config))


def _timm_source(model: nn.Module, name: str | None = None) -> VisionSource:
    cfg = dict(getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {})
    name = name or cfg.get("architecture")
    if not name:
        raise DiffusionVLError("this timm model has no pretrained_cfg['architecture']; pass vision='timm:NAME'")
    size = int(cfg.get("input_size", (3, 224, 224))[-1])
    transform = ImageTransform(size, tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
                               tuple(cfg.get("std", (0.229, 0.224, 0.225))), cfg.get("crop_pct", 0.875))
    return VisionSource({"kind": TimmTower.kind, "name": name}, model.state_dict(), transform)


def _transform_from_preprocessor(path: str, fallback: ImageTransform) -> ImageTransform:
    """Mean/std/size from a saved HF `preprocessor_config.json`, when the folder has one."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.isfile(file):
        return fallback
    with open(file, encoding="utf-8") as fh:
        data = json.load(fh)
    crop = data.get("crop_size")
    size = crop.get("height") if isinstance(crop, dict) else crop
    size = int(size or fallback.size)
    center = bool(data.get("do_center_crop", False))
    return ImageTransform(size, tuple(data.get("image_mean", fallback.mean)), tuple(data.get("image_std", fallback.std)),
                          1.0 if center else None)


def _from_path(path: str) -> VisionSource:
    from transformers import AutoModel

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise DiffusionVLError(f"vision encoder not found: {path} (give efficientnet_lite0, timm:NAME or a HF folder)")
    model = AutoModel.from_pretrained(path)
    source = _hf_source(model)
    source.transform = _transform_from_preprocessor(path, source.transform)
    return source


def _is_timm_model(module: nn.Module) -> bool:
    return hasattr(module, "forward_features") and hasattr(module, "pretrained_cfg")


def resolve_vision(vision: Any, pretrained: bool = True) -> VisionSource:
    """"efficientnet_lite0" | "timm:NAME" | HF folder path | EfficientNetLite0 / HF / timm module -> VisionSource."""
    from diffusionvl.backbone.vision.efficientnet import EfficientNetLite0

    if isinstance(vision, str):
        if vision == EfficientNetTower.kind:
            from diffusionvl.backbone import assets

            return _efficientnet_source(assets.efficientnet_lite0(pretrained=pretrained, progress=False))
        if vision.startswith("timm:"):
            model = import_timm().create_model(vision[5:], pretrained=pretrained, num_classes=0)
            return _timm_source(model, vision[5:])
        return _from_path(os.path.expanduser(vision))
    if isinstance(vision, EfficientNetLite0):
        return _efficientnet_source(vision)
    if _is_timm_model(vision):
        return _timm_source(vision)
    if hasattr(vision, "config") and isinstance(vision, nn.Module):
        return _hf_source(vision)
    raise DiffusionVLError(f"unsupported vision encoder {type(vision).__name__}: give efficientnet_lite0, timm:NAME, "
                           "a HF vision model (or its folder) or an EfficientNetLite0 module")



@torch.inference_mode()
def token_statistics(tower: VisionTower, transform: ImageTransform, images: list[Any], batch: int = 32) -> dict:
    """Per-channel mean and std of `tower`'s tokens over `images` (all tokens of all images), as JSON-able lists for
    the `"standardize"` spec field. The tower is run in eval mode."""
    tower.eval()
    toks = torch.cat([tower(preprocess_images(images[i:i + batch], transform)).float().flatten(0, 1)
                      for i in range(0, len(images), batch)])  # [N * T, C]
    return {"mean": toks.mean(0).tolist(), "std": toks.std(0).clamp_min(1e-4).tolist()}

