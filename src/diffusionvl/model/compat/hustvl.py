"""Checkpoints of the DiffusionVL reference code (hustvl/DiffusionVL) loaded as a DiffusionVLModel.

Contract:
- `detect(path) -> HustvlCheckpoint | None` recognizes the reference layouts from config.json and the file names
  alone (no weights are read); anything else gives None.
    kind "qwenvl"      DiffusionVL-Qwen2.5VL-3B/-7B: config `model_type` `diffusionvl_qwenvl` (older: `llada_qwen`),
                       `text_config` + `vision_config`, `bd3lm_block_size`, `enable_bd3lm`. Weights either as their
                       conversion script writes them (`model.safetensors`: the language model under `model.` and
                       `lm_head.` unless tied; `vision_config.json`; `vision_tower.safetensors`: the Qwen2.5-VL vision
                       transformer without its merger; `projector.safetensors`: the merger) or as their trainer saves
                       them (one or sharded `model*.safetensors` that also hold `model.vision_tower.vision_tower.*` and
                       `model.mm_projector.merger.*`). Where both exist, the tower comes from vision_tower.safetensors
                       and the merger from the model weights, as in their inference loader.
    kind "llava_qwen"  DiffusionVL-Qwen2.5-7B (`diffusionvl_qwen`: SigLIP tower + mlp2x_gelu projector + Qwen2.5, anyres
                       tiles with spatial_unpad; one or sharded `model*.safetensors`): loaded as a composed VLM by
                       compat/llava_qwen.py.
- `load_checkpoint(ckpt, device, dtype)` dispatches on the kind ("llava_qwen": compat/llava_qwen.py). For "qwenvl"
  it translates the config into a transformers `qwen2_5_vl` config (never trust_remote_code), builds
  `Qwen2_5_VLForConditionalGeneration` without initializing weights, fills every tensor through a strict key map
  (`map_key`; missing or unexpected tensors: one-line error), loads the processor from the folder, and gives the
  reference mask row (`MASK_ROW`, a row with no token in the Qwen vocabulary) the name `<|mask|>` without moving
  any id or touching any weight (`name_row`). Diffusion settings: block size =
  `bd3lm_block_size`, prediction 'same' (their logits at position i predict token i), EOS `<|im_end|>`, positions
  'sequential' (their training and decoding give every token, image tokens included, positions 0, 1, 2, ...).
- `compat.format_loader(path, device=, dtype=)` is the `conversion.FORMAT_LOADERS` entry; `path` is a folder
  or a hub id already in the local Hugging Face cache (`local_folder`; nothing is downloaded).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from diffusionvl.backbone.tokens import find_token_id
from diffusionvl.core.config import DEFAULT_MASK_TOKEN, DiffusionConfig
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.model.modeling import DiffusionVLModel
from diffusionvl.model.wrapping import wrap

# The reference code writes its mask token as the literal embedding row 151671 (bd3lm code of both model files);
# in the Qwen2.5 vocabulary that row is padding with no token name. We name it once, here, and look it up by name.
MASK_ROW = 151671
EOS_TOKEN = "<|im_end|>"
QWENVL_TYPES = ("diffusionvl_qwenvl", "llada_qwen")
LLAVA_QWEN_TYPES = ("diffusionvl_qwen",)
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}
_META_KEYS = {"model_type", "architectures", "auto_map", "transformers_version", "_name_or_path", "torch_dtype",
              "dtype", "text_config", "vision_config"}
_NOT_TEXT_PREFIXES = ("mm_", "bd3lm_", "vision_", "image_", "video_", "tokenizer_", "enable_bd3lm", "use_mm_proj",
                      "tune_mm", "freeze_mm", "unfreeze_mm", "add_faster_video", "faster_token", "pos_skipping")

TEXT, VISION, MERGER = "language model", "vision tower", "projector (merger)"
_HINTS = {TEXT: "model.* and lm_head.* in model.safetensors",
          VISION: "vision_tower.safetensors, or model.vision_tower.vision_tower.* in the model weights",
          MERGER: "projector.safetensors, or model.mm_projector.merger.* in the model weights"}
# which file wins when a part is stored twice (their inference loader: tower file first, projector from the model)
_PRIORITY = {TEXT: ("model",), VISION: ("vision_tower", "model"), MERGER: ("model", "projector")}


@dataclass(frozen=True)
class HustvlCheckpoint:
    path: Path
    kind: str  # "qwenvl" | "llava_qwen"
    config: dict[str, Any]
    model_files: tuple[Path, ...]  # model.safetensors, or the shards of model.safetensors.index.json
    vision_file: Path | None  # vision_tower.safetensors
    projector_file: Path | None  # projector.safetensors
    vision_config: dict[str, Any] | None  # vision_config.json (wins over config["vision_config"], as in theirs)


# ---- detection ---------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DiffusionVLError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    check(isinstance(data, dict), f"{path} must hold a JSON object")
    return data


def _kind(cfg: dict[str, Any], folder: Path) -> str | None:
    if "diffusionvl" in cfg:
        return None  # our own format
    model_type = str(cfg.get("model_type", ""))
    archs = " ".join(map(str, cfg.get("architectures") or []))
    tower = str(cfg.get("mm_vision_tower", "")).lower()
    if model_type in QWENVL_TYPES or "DiffusionVLQwenVL" in archs:
        return "qwenvl"
    if model_type in LLAVA_QWEN_TYPES or "DiffusionVLQwenForCausalLM" in archs or "siglip" in tower:
        return "llava_qwen"
    if (folder / "vision_tower.safetensors").is_file() and (folder / "projector.safetensors").is_file():
        return "qwenvl"  # their conversion script's side files, whatever the config says
    return None


def _model_files(folder: Path) -> tuple[Path, ...]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        check(isinstance(weight_map, dict) and weight_map, f"{index} has no weight_map")
        files = tuple(folder / name for name in sorted(set(weight_map.values())))
        absent = [f.name for f in files if not f.is_file()]
        check(not absent, f"{folder}: shard(s) {', '.join(absent)} listed in {index.name} are missing")
        return files
    if (folder / "model.safetensors").is_file():
        return (folder / "model.safetensors",)
    if any(folder.glob("*.bin")):
        raise DiffusionVLError(f"{folder} holds only .bin weights; re-save them as safetensors "
                               "(model.save_pretrained(..., safe_serialization=True)) and load again")
    raise DiffusionVLError(f"{folder} has no model.safetensors (nor model.safetensors.index.json): the language "
                           "model weights of this DiffusionVL checkpoint are missing")


def local_folder(path: str | os.PathLike[str]) -> Path | None:
    """`path` itself if it is a folder; for a hub id ("hustvl/DiffusionVL-Qwen2.5VL-7B") the snapshot already in
    the local Hugging Face cache, if any (nothing is downloaded)."""
    if os.path.isdir(path):
        return Path(path)
    text = os.fspath(path)
    if text.count("/") != 1 or text.startswith((".", "/", "~")) or os.path.exists(text):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached, not a valid id, no hub library: not ours to load
        return None


def detect(path: str | os.PathLike[str]) -> HustvlCheckpoint | None:
    """The reference layout stored at `path` (a folder or a cached hub id), or None (see module docstring)."""
    folder = local_folder(path)
    if folder is None or not (folder / "config.json").is_file():
        return None
    cfg = _read_json(folder / "config.json")
    kind = _kind(cfg, folder)
    if kind is None:
        return None
    if kind == "llava_qwen":
        return HustvlCheckpoint(folder, kind, cfg, _model_files(folder), None, None, None)
    side = {name: folder / name for name in ("vision_tower.safetensors", "projector.safetensors")}
    vision_json = folder / "vision_config.json"
    return HustvlCheckpoint(
        folder, kind, cfg, _model_files(folder),
        side["vision_tower.safetensors"] if side["vision_tower.safetensors"].is_file() else None,
        side["projector.safetensors"] if side["projector.safetensors"].is_file() else None,
        _read_json(vision_json) if vision_json.is_file() else None)


# ---- config ------------------------------------------------------------------------------------------------------
def text_config_dict(cfg: dict[str, Any]) -> dict[str, Any]:
    """The language-model fields: `text_config` when present (authoritative: their config class rewrites the
    top-level copies from it), else the top-level fields minus the LLaVA / BD3-LM / vision ones."""
    source = cfg.get("text_config") or {k: v for k, v in cfg.items() if not k.startswith(_NOT_TEXT_PREFIXES)}
    return {k: v for k, v in source.items() if k not in _META_KEYS}


def qwen_vl_config(ckpt: HustvlCheckpoint, token_ids: dict[str, int], tied: bool) -> Any:
    """A transformers Qwen2_5_VLConfig equivalent to the reference config (old rope_scaling forms included)."""
    from transformers import Qwen2_5_VLConfig

    vision = ckpt.vision_config or ckpt.config.get("vision_config")
    check(isinstance(vision, dict) and vision, f"{ckpt.path}: no vision_config (neither in config.json nor "
                                               "vision_config.json)")
    text = dict(text_config_dict(ckpt.config), tie_word_embeddings=tied)
    vision = {k: v for k, v in vision.items() if k not in _META_KEYS}
    try:
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tied, **token_ids)
    except (TypeError, ValueError) as exc:
        raise DiffusionVLError(f"{ckpt.path}: cannot translate config.json to a qwen2_5_vl config: "
                               f"{str(exc).splitlines()[0]}") from None


def vision_token_ids(tokenizer: Any, cfg: dict[str, Any]) -> dict[str, int]:
    """Image/video/vision-boundary ids by token name (the config's numbers only where a name is absent)."""
    out = {}
    for field, name in VISION_TOKENS.items():
        found = find_token_id(tokenizer, name)
        value = found if found is not None else cfg.get(field)
        if value is not None:
            out[field] = int(value)
    check("image_token_id" in out, "the tokenizer has no <|image_pad|> token and config.json no image_token_id")
    return out


# ---- weights -----------------------------------------------------------------------------------------------------
def _visual(rest: str) -> tuple[str, str]:
    return (MERGER if rest.startswith("merger.") else VISION), "model.visual." + rest


def map_key(key: str, source: str) -> tuple[str, str] | None:
    """(part, transformers key) for a tensor `key` of file kind `source` ('model' | 'vision_tower' |
    'projector'), or None when the key belongs to no part of a Qwen2.5-VL model."""
    if source == "projector":
        return MERGER, "model.visual.merger." + key.removeprefix("merger.")
    if source == "vision_tower":
        for prefix in ("model.vision_tower.vision_tower.", "model.visual.", "visual.", "vision_tower."):
            if key.startswith(prefix):
                return _visual(key[len(prefix):])
        return _visual(key)
    if key.startswith("lm_head."):
        return TEXT, key
    for prefix in ("model.vision_tower.vision_tower.", "model.visual.", "visual."):
        if key.startswith(prefix):
            return _visual(key[len(prefix):])
    if key.startswith("model.mm_projector.merger."):
        return MERGER, "model.visual.merger." + key[len("model.mm_projector.merger."):]
    if key.startswith("model.language_model."):
        return TEXT, key
    llava_extras = ("model.mm_projector.", "model.vision_tower.", "model.vision_resampler.", "model.image_newline",
                    "model.faster_token")
    if key.startswith("model.") and not key.startswith(llava_extras):
        return TEXT, "model.language_model." + key[len("model."):]
    return None


def _file_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            return list(fh.keys())
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes one line
        raise DiffusionVLError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None


def plan_weights(ckpt: HustvlCheckpoint) -> tuple[dict[str, tuple[Path, str]], list[str]]:
    """Which stored tensor fills each transformers key, and the stored keys that fit nowhere."""
    found: dict[str, dict[str, dict[str, tuple[Path, str]]]] = {}  # part -> source -> target -> (file, key)
    stray: list[str] = []
    files = [(f, "model") for f in ckpt.model_files]
    files += [(f, s) for f, s in ((ckpt.vision_file, "vision_tower"), (ckpt.projector_file, "projector")) if f]
    for path, source in files:
        for key in _file_keys(path):
            mapped = map_key(key, source)
            if mapped is None:
                stray.append(f"{path.name}:{key}")
                continue
            part, target = mapped
            found.setdefault(part, {}).setdefault(source, {})[target] = (path, key)
    plan: dict[str, tuple[Path, str]] = {}
    for part, by_source in found.items():
        order = [s for s in _PRIORITY[part] if s in by_source]
        if not order:
            stray += [f"{f.name}:{k}" for src in by_source.values() for f, k in src.values()]
            continue
        plan.update(by_source[order[0]])
    return plan, stray


def _part(target: str) -> str:
    if target.startswith("model.visual.merger."):
        return MERGER
    return VISION if target.startswith("model.visual.") else TEXT


def check_keys(path: Path, expected: set[str], plan: dict[str, Any], stray: list[str],
               part_of: Callable[[str], str] = _part, hints: dict[str, str] = _HINTS,
               what: str = "DiffusionVL-Qwen2.5VL") -> None:
    """One-line error naming what is missing (per part, with where it should be: `hints`) and what is unexpected."""
    missing = sorted(expected - set(plan))
    unexpected = sorted(set(plan) - expected) + stray
    if not missing and not unexpected:
        return
    parts = []
    for part, hint in hints.items():
        keys = [k for k in missing if part_of(k) == part]
        if keys:
            parts.append(f"missing {len(keys)} tensor(s) of the {part} (e.g. {keys[0]}; expected in {hint})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) (e.g. {', '.join(unexpected[:3])})")
    raise DiffusionVLError(f"{path}: weights do not match a {what} checkpoint: {'; '.join(parts)}")


def read_tensors(plan: dict[str, tuple[Path, str]], dtype: torch.dtype | None,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, (path, key) in plan.items():
        by_file.setdefault(path, []).append((target, key))
    out = {}
    for path, items in by_file.items():
        with safe_open(str(path), framework="pt", device=str(device)) as fh:
            for target, key in items:
                tensor = fh.get_tensor(key)
                out[target] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


def _stored_dtype(plan: dict[str, tuple[Path, str]],
                  key: str = "model.language_model.embed_tokens.weight") -> torch.dtype:
    from safetensors import safe_open

    entry = plan.get(key) or next(iter(plan.values()), None)
    if entry is None:
        return torch.float32  # nothing stored: check_keys reports it
    path, key = entry
    with safe_open(str(path), framework="pt") as fh:
        name = fh.get_slice(key).get_dtype()
    return {"BF16": torch.bfloat16, "F16": torch.float16}.get(name, torch.float32)


# ---- mask token --------------------------------------------------------------------------------------------------
def name_row(tokenizer: Any, row: int, name: str = DEFAULT_MASK_TOKEN) -> str:
    """Give embedding row `row` the token name `name` in place, keeping every id (the row's existing name if it
    has one). The name goes into the BPE vocabulary at exactly that id and is marked special, so it encodes to
    `row`, decodes to nothing with skip_special_tokens, and survives save_pretrained.

    Added tokens that live outside the model vocabulary (Qwen's <|endoftext|>, <|im_end|>, ... and any token added
    later, such as <image>) are written into it at their ids too: on reload `tokenizers` renumbers such tokens from
    the model vocabulary's size, which the new entry would otherwise shift by one."""
    import tokenizers

    existing = tokenizer.convert_ids_to_tokens(row)
    if existing is not None:
        return existing
    taken = find_token_id(tokenizer, name)
    check(taken is None, f"the tokenizer already uses {name} for id {taken}, but the checkpoint's mask row is {row}")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    check(backend is not None, "naming the mask row needs a fast (tokenizers) tokenizer; save tokenizer.json")
    before = tokenizer.get_vocab()
    data = json.loads(backend.to_str())
    vocab = data.get("model", {}).get("vocab")
    check(isinstance(vocab, dict), f"cannot name row {row}: the {data.get('model', {}).get('type')} tokenizer "
                                   "model has no id-addressable vocabulary")
    added = data.setdefault("added_tokens", [])
    vocab.update({tok["content"]: tok["id"] for tok in added if tok["content"] not in vocab})  # pin their ids
    vocab[name] = row
    added.append({"id": row, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                  "normalized": False, "special": True})
    tokenizer._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(data))  # how transformers swaps backends too
    after = tokenizer.get_vocab()
    check(after.get(name) == row, f"could not give row {row} the name {name}")
    moved = [k for k, v in before.items() if after.get(k) != v]
    check(not moved, f"naming row {row} {name} moved the ids of {len(moved)} token(s) (e.g. {moved[:3]})")
    return name


# ---- loading -----------------------------------------------------------------------------------------------------
def _empty_model(config: Any, dtype: torch.dtype) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    with init_empty_weights():  # parameters on the meta device; buffers (rotary frequencies) computed normally
        return AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")


def _fill(model: Any, tensors: dict[str, torch.Tensor], tied: bool) -> None:
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as exc:  # shape mismatch between config.json and the stored tensors
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise DiffusionVLError(f"weights do not fit config.json: {lines[0] if lines else str(exc)[:200]}") from None
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    check(not meta, f"{len(meta)} parameter(s) were not loaded (e.g. {meta[:1]})")


def _generation_config(model: Any, folder: Path) -> None:
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)


def _chat_template(folder: Path, tokenizer: Any) -> str | None:
    path = folder / "chat_template.json"  # Qwen2.5-VL ships its processor template here
    if path.is_file():
        template = _read_json(path).get("chat_template")
        if isinstance(template, str):
            return template
    return getattr(tokenizer, "chat_template", None)


def load_reference_processor(folder: Path, cfg: dict[str, Any]) -> Any:
    """Tokenizer + Qwen2.5-VL image processor of the folder, as a processor (torchvision-free where needed).

    transformers would pick the tokenizer class from config.json, which it cannot read (`diffusionvl_qwenvl`), so it
    is told the model family instead. Their trainer records the image size range it trained with in config.json
    (`min_pixels` / `max_pixels`, default 384^2 .. 512^2); when present it overrides preprocessor_config.json."""
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from diffusionvl.backbone.processing import make_qwen_vl_processor

    sizes = {k: int(cfg[k]) for k in ("min_pixels", "max_pixels") if cfg.get(k)}
    try:
        tok = AutoTokenizer.from_pretrained(folder, config=Qwen2_5_VLConfig())
        images = Qwen2VLImageProcessorPil.from_pretrained(folder, **sizes)
    except (OSError, ValueError) as exc:
        raise DiffusionVLError(f"cannot load the tokenizer/image processor from {folder}: "
                               f"{str(exc).splitlines()[0]}") from None
    return make_qwen_vl_processor(Qwen2_5_VLProcessor, images, tok, _chat_template(folder, tok))


def load_qwenvl(ckpt: HustvlCheckpoint, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                mask_row: int | None = None) -> DiffusionVLModel:
    """Build the DiffusionVLModel of a detected "qwenvl" reference checkpoint (dtype None = the stored dtype)."""
    check(ckpt.kind == "qwenvl", f"{ckpt.path}: a {ckpt.kind} checkpoint, not a Qwen2.5-VL one")
    plan, stray = plan_weights(ckpt)
    tied = "lm_head.weight" not in plan  # 3B: tied, lm_head skipped by their conversion script
    processor = load_reference_processor(ckpt.path, ckpt.config)
    tok = processor.tokenizer
    config = qwen_vl_config(ckpt, vision_token_ids(tok, ckpt.config), tied)
    row = MASK_ROW if mask_row is None else mask_row
    check(0 <= row < config.text_config.vocab_size,
          f"{ckpt.path}: the reference mask row {row} is outside the vocabulary of {config.text_config.vocab_size}")
    dtype = dtype or _stored_dtype(plan)
    model = _empty_model(config, dtype)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if tied else set())
    check_keys(ckpt.path, expected, plan, stray)  # before reading any tensor
    _fill(model, read_tensors(plan, dtype, device), tied)
    _generation_config(model, ckpt.path)
    eos = EOS_TOKEN if find_token_id(tok, EOS_TOKEN) is not None else None
    dcfg = DiffusionConfig(block_size=int(ckpt.config.get("bd3lm_block_size", 4)), mask_token=name_row(tok, row),
                           prediction="same", eos_token=eos, positions="sequential").validate()
    model.config.diffusionvl = dcfg.to_dict()
    return wrap(model.to(device).eval(), processor)
