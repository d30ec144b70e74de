"""DiffusionVL-Qwen2.5-7B (the reference code's `diffusionvl_qwen`, "modality shift") loaded as a composed VLM.

Contract: `load_llava_qwen(ckpt, device, dtype, mask_row)` builds a `ComposedVLM` (compose.py) + `ComposedProcessor`
from a detected `hustvl.HustvlCheckpoint` of kind "llava_qwen" and wraps it as a DiffusionVLModel. Nothing runs
their code and nothing is downloaded.
- Layout (their trainer's save of `DiffusionVLQwenForCausalLM`): one or sharded `model*.safetensors` with the Qwen2
  language model under `model.*` + `lm_head.weight`, the SigLIP tower under `model.vision_tower.vision_tower.*` (its
  last encoder layer already deleted, no pooling head), the projector under `model.mm_projector.*` (`mlp2x_gelu`:
  `0`, `2`; `linear`) and `model.image_newline` (with `spatial_unpad`). Strict key map (`map_key`); missing or
  unexpected tensors are a one-line error that names the part.
- Vision tower: transformers' `SiglipVisionModel` (their SigLIP class, loaded with google/siglip(2)-so400m-patch14-384
  fixed-resolution weights; no NaFlex). Their tower config is hard-coded (so400m: 16 heads, 384 px, GELU-tanh,
  eps 1e-6) and not saved, so it is rebuilt from those constants plus the stored tensor shapes (width, MLP width,
  patch size, layer count, position table); the image size is 384 when the position table fits it (27 x 27 for
  patch 14), else side x patch. Features = the last stored layer's output before `post_layernorm`
  (`feature_layer=-1`; their `mm_vision_select_layer=-2` on the full tower is the same tensor).
- Images: `image_aspect_ratio` (anyres_max_N / anyres / pad / square), `image_grid_pinpoints`, `mm_patch_merge_type`
  (spatial_unpad / flat) become the composed model's image layout (vision/anyres.py); prompts with several images
  use "pad" per image, as their trainer and lmms-eval wrapper do. Preprocessing: SigLIP's [-1, 1] normalization.
- Tokens: the image placeholder `<image>` (their prompt text) is added by name; an image part of a chat message
  renders as "<image>\n" (their data format). The mask row 151671 (`hustvl.MASK_ROW`) is named `<|mask|>` in place.
- Diffusion settings: `bd3lm_block_size`, prediction "same", EOS `<|im_end|>`, positions "sequential" (their
  generate and training give every token, image tokens included, positions 0, 1, 2, ...). A checkpoint of this
  layout that was never diffusion-trained (no `enable_bd3lm`, e.g. an AR LLaVA-OneVision-Qwen2) is wrapped like any
  AR model instead (prediction "shift", a new mask token).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from diffusionvl.backbone.tokens import find_token_id
from diffusionvl.core.config import DiffusionConfig
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.model.compat import hustvl
from diffusionvl.model.modeling import DiffusionVLModel
from diffusionvl.model.wrapping import wrap

TEXT, VISION, PROJECTOR, NEWLINE = "language model", "vision tower", "projector", "image newline"
HINTS = {TEXT: "model.* and lm_head.weight", VISION: "model.vision_tower.vision_tower.*",
         PROJECTOR: "model.mm_projector.*", NEWLINE: "model.image_newline (mm_patch_merge_type spatial_unpad)"}
TOWER_PREFIX = "model.vision_tower.vision_tower."
OUR_TOWER = "vision_tower.encoder."
IMAGE_TOKEN = "<image>"  # LLaVA's DEFAULT_IMAGE_TOKEN: what their prompts contain
# their SigLipVisionConfig / SigLipImageProcessor defaults (siglip-so400m-patch14-384); never read from the folder
SIGLIP = {"num_attention_heads": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "image_size": 384}
SIGLIP_MEAN = (0.5, 0.5, 0.5)
ASPECTS = {"square": "square", "pad": "pad", None: "square"}  # + anyres, anyres_max_N (kept as they are)
MERGES = ("flat", "spatial_unpad")
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# their `qwen_2_5` conversation template, for a tokenizer folder without a chat template
CHATML_QWEN = ("{%- if messages and messages[0]['role'] == 'system' -%}{%- set _sys = messages[0]['content'] -%}"
               "{%- set messages = messages[1:] -%}{%- else -%}{%- set _sys = '" + QWEN_SYSTEM + "' -%}{%- endif -%}"
               "{{ '<|im_start|>system\\n' + _sys + '<|im_end|>\\n' }}"
               "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


# ---- keys ---------------------------------------------------------------------------------------------------------
def map_key(key: str) -> tuple[str, str] | None:
    """(part, name) of a stored tensor: our ComposedVLM key, except the vision tower, whose name is kept relative
    to their tower (`vision_model.X`) until it is aligned with the transformers version's own key names."""
    if key.startswith(TOWER_PREFIX):
        return VISION, key[len(TOWER_PREFIX):]
    if key.startswith("model.mm_projector."):
        rest = key[len("model.mm_projector."):]
        return PROJECTOR, "projector." + (rest if rest[:1].isdigit() else "0." + rest)  # linear: a bare nn.Linear
    if key == "model.image_newline":
        return NEWLINE, "image_newline"
    if key.startswith("lm_head."):
        return TEXT, "language_model." + key
    if key.startswith("model.") and not key.startswith(("model.vision_tower.", "model.vision_resampler.",
                                                        "model.faster_token", "model.mm_projector")):
        return TEXT, "language_model." + key
    return None


def part_of(target: str) -> str:
    for part, prefix in ((VISION, "vision_tower."), (PROJECTOR, "projector."), (NEWLINE, "image_newline")):
        if target.startswith(prefix):
            return part
    return TEXT


def stored_keys(ckpt: hustvl.HustvlCheckpoint) -> tuple[dict[str, tuple[Path, str]], dict[str, tuple[Path, str]],
                                                         list[str]]:
    """(our key -> stored tensor, tower-relative key -> stored tensor, stray keys)."""
    plan: dict[str, tuple[Path, str]] = {}
    tower: dict[str, tuple[Path, str]] = {}
    stray: list[str] = []
    for path in ckpt.model_files:
        for key in hustvl._file_keys(path):
            mapped = map_key(key)
            if mapped is None:
                stray.append(f"{path.name}:{key}")
            elif mapped[0] == VISION:
                tower[mapped[1]] = (path, key)
            else:
                plan[mapped[1]] = (path, key)
    return plan, tower, stray


def _shapes(tower: dict[str, tuple[Path, str]]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key) in tower.items():
        by_file.setdefault(path, []).append((name, key))
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt") as fh:
            for name, key in items:
                out[name.removeprefix("vision_model.")] = tuple(fh.get_slice(key).get_shape())
    return out


# ---- config -------------------------------------------------------------------------------------------------------
def siglip_config(tower: dict[str, tuple[Path, str]], cfg: dict[str, Any], where: Path) -> Any:
    """transformers SiglipVisionConfig of the stored tower: their fixed so400m constants + the stored shapes."""
    from transformers import SiglipVisionConfig

    shapes = _shapes(tower)
    need = ("embeddings.patch_embedding.weight", "embeddings.position_embedding.weight",
            "encoder.layers.0.mlp.fc1.weight")
    absent = [n for n in need if n not in shapes]
    if absent:
        raise DiffusionVLError(f"{where}: weights do not match a DiffusionVL-Qwen2.5 checkpoint: missing the SigLIP "
                               f"{VISION} (e.g. {TOWER_PREFIX}vision_model.{absent[0]})")
    width, channels, patch = shapes[need[0]][:3]
    side = math.isqrt(shapes[need[1]][0])
    check(side * side == shapes[need[1]][0], f"{where}: the vision position table is not a square grid")
    layers = 1 + max(int(n.split(".")[2]) for n in shapes if n.startswith("encoder.layers."))
    check(width % SIGLIP["num_attention_heads"] == 0, f"{where}: vision width {width} does not split into "
                                                      f"{SIGLIP['num_attention_heads']} SigLIP heads")
    mm_hidden = cfg.get("mm_hidden_size")
    check(mm_hidden in (None, width), f"{where}: mm_hidden_size {mm_hidden} but the stored tower is {width} wide")
    image_size = SIGLIP["image_size"] if SIGLIP["image_size"] // patch == side else side * patch
    return SiglipVisionConfig(hidden_size=width, intermediate_size=shapes[need[2]][0], num_hidden_layers=layers,
                              num_channels=channels, patch_size=patch, image_size=image_size, vision_use_head=False,
                              num_attention_heads=SIGLIP["num_attention_heads"], hidden_act=SIGLIP["hidden_act"],
                              layer_norm_eps=SIGLIP["layer_norm_eps"])


def qwen2_config(cfg: dict[str, Any], tied: bool) -> Any:
    """The Qwen2 text config from the top-level fields (their model forces rope_scaling=None)."""
    from transformers import Qwen2Config

    known = set(Qwen2Config().to_dict()) | {"rope_theta"}
    fields = {k: v for k, v in hustvl.text_config_dict(cfg).items()
              if k in known and k not in ("dtype", "rope_scaling", "tie_word_embeddings")}
    try:
        return Qwen2Config(**fields, tie_word_embeddings=tied)
    except (TypeError, ValueError) as exc:
        raise DiffusionVLError(f"cannot translate config.json to a qwen2 config: {str(exc).splitlines()[0]}") from None


def image_settings(cfg: dict[str, Any]) -> dict[str, Any]:
    """ComposedVLMConfig image-layout fields from their config keys (unsupported values: one-line error)."""
    from diffusionvl.backbone.vision.anyres import is_anyres

    aspect = cfg.get("image_aspect_ratio")
    aspect = aspect if isinstance(aspect, str) and is_anyres(aspect) else ASPECTS.get(aspect)
    check(aspect is not None, f"image_aspect_ratio {cfg.get('image_aspect_ratio')!r} is not supported "
                              "(square, pad, anyres, anyres_max_N)")
    merge = cfg.get("mm_patch_merge_type") or "flat"
    check(merge in MERGES, f"mm_patch_merge_type {merge!r} is not supported ({', '.join(MERGES)})")
    projector = cfg.get("mm_projector_type") or "linear"
    check(projector in ("linear", "mlp2x_gelu"), f"mm_projector_type {projector!r} is not supported "
                                                 "(linear, mlp2x_gelu)")
    return {"image_aspect_ratio": aspect, "image_grid_pinpoints": cfg.get("image_grid_pinpoints"),
            "patch_merge": merge, "multi_image_aspect_ratio": "pad", "projector": projector}


def composed_config(ckpt: hustvl.HustvlCheckpoint, vision: Any, tied: bool, image_token_id: int) -> Any:
    from diffusionvl.backbone.compose import ComposedVLMConfig

    settings = image_settings(ckpt.config)
    side = int(vision.image_size) // int(vision.patch_size)
    return ComposedVLMConfig(
        text_config=qwen2_config(ckpt.config, tied), vision={"kind": "hf", "config": vision.to_dict()},
        vision_hidden_size=int(vision.hidden_size), image_token=IMAGE_TOKEN, image_token_id=image_token_id,
        num_image_tokens=side * side, pool=None, feature_layer=-1, image_size=int(vision.image_size),
        image_mean=SIGLIP_MEAN, image_std=SIGLIP_MEAN, image_crop_pct=None, **settings)


# ---- tokenizer / processor ------------------------------------------------------------------------------------
def load_tokenizer(folder: Path, mask_row: int | None) -> tuple[Any, str | None]:
    """The folder's tokenizer with `<image>` added (before naming the mask row, so no id ever moves) and, for a
    diffusion-trained checkpoint, the mask row named; returns (tokenizer, mask token name or None)."""
    from transformers import AutoTokenizer, Qwen2Config

    try:  # transformers cannot read config.json (`diffusionvl_qwen`): tell it the model family instead
        tok = AutoTokenizer.from_pretrained(folder, config=Qwen2Config())
    except (OSError, ValueError) as exc:
        raise DiffusionVLError(f"cannot load the tokenizer from {folder}: {str(exc).splitlines()[0]}") from None
    if find_token_id(tok, IMAGE_TOKEN) is None:
        tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    if mask_row is None:
        return tok, None
    check(find_token_id(tok, IMAGE_TOKEN) != mask_row, f"{IMAGE_TOKEN} landed on the mask row {mask_row}")
    return tok, hustvl.name_row(tok, mask_row)


def make_processor(tok: Any, config: Any) -> Any:
    from diffusionvl.backbone.compose import ComposedProcessor, checked_layout, image_chat_template

    template = getattr(tok, "chat_template", None) or CHATML_QWEN
    tok.chat_template = image_chat_template(template, IMAGE_TOKEN, IMAGE_TOKEN + "\n")
    return ComposedProcessor(tok, IMAGE_TOKEN, config.num_image_tokens, config.image_transform,
                             checked_layout(config))


# ---- loading ------------------------------------------------------------------------------------------------------
def _empty_model(config: Any, dtype: torch.dtype) -> Any:
    from accelerate import init_empty_weights

    from diffusionvl.backbone.compose import ComposedVLM

    with init_empty_weights():  # parameters on the meta device; buffers (rotary, position ids) computed normally
        return ComposedVLM._from_config(config, dtype=dtype, attn_implementation="sdpa")


def _with_tower(plan: dict[str, tuple[Path, str]], tower: dict[str, tuple[Path, str]],
                expected: set[str]) -> dict[str, tuple[Path, str]]:
    """The tower's tensors renamed onto this transformers version's SiglipVisionModel keys (with or without the
    `vision_model.` level)."""
    from diffusionvl.backbone.vision.encoders import align_prefix

    own = sorted(k[len(OUR_TOWER):] for k in expected if k.startswith(OUR_TOWER))
    return {**plan, **{OUR_TOWER + k: v for k, v in align_prefix(own, tower).items()}}


def diffusion_trained(cfg: dict[str, Any]) -> bool:
    return bool(cfg.get("enable_bd3lm")) or (cfg.get("enable_bd3lm") is None and "bd3lm_block_size" in cfg)


def load_llava_qwen(ckpt: hustvl.HustvlCheckpoint, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, mask_row: int | None = None) -> DiffusionVLModel:
    """Build the DiffusionVLModel of a DiffusionVL-Qwen2.5 checkpoint (dtype None = the stored dtype)."""
    trained = diffusion_trained(ckpt.config)
    plan, tower, stray = stored_keys(ckpt)
    vision = siglip_config(tower, ckpt.config, ckpt.path)
    tied = "language_model.lm_head.weight" not in plan
    row = (hustvl.MASK_ROW if mask_row is None else mask_row) if trained else None
    rows = int(hustvl.text_config_dict(ckpt.config).get("vocab_size") or 0)
    check(row is None or 0 <= row < rows,
          f"{ckpt.path}: the reference mask row {row} is outside the vocabulary of {rows}")
    tok, mask_name = load_tokenizer(ckpt.path, row)
    config = composed_config(ckpt, vision, tied, find_token_id(tok, IMAGE_TOKEN))
    processor = make_processor(tok, config)
    dtype = dtype or hustvl._stored_dtype(plan, "language_model.model.embed_tokens.weight")
    model = _empty_model(config, dtype)
    expected = set(model.state_dict()) - ({"language_model.lm_head.weight"} if tied else set())
    plan = _with_tower(plan, tower, expected)
    hustvl.check_keys(ckpt.path, expected, plan, stray, part_of, HINTS, "DiffusionVL-Qwen2.5")
    hustvl._fill(model, hustvl.read_tensors(plan, dtype, device), tied)
    if config.image_token_id >= model.get_input_embeddings().weight.shape[0]:  # no spare row (never for Qwen2.5)
        model.resize_token_embeddings(config.image_token_id + 1, mean_resizing=False)  # the row is never read
    hustvl._generation_config(model, ckpt.path)
    if not trained:
        return wrap(model.to(device).eval(), processor)
    eos = hustvl.EOS_TOKEN if find_token_id(tok, hustvl.EOS_TOKEN) is not None else None
    dcfg = DiffusionConfig(block_size=int(ckpt.config.get("bd3lm_block_size", 4)), mask_token=mask_name,
                           prediction="same", eos_token=eos, positions="sequential").validate()
    model.config.diffusionvl = dcfg.to_dict()
    return wrap(model.to(device).eval(), processor)
