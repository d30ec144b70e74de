"""Typed configuration: the diffusion settings saved with a model, and the decoding settings of one call.

Contract: every user-tunable knob is a dataclass field with a `help` string in its metadata; the CLI builds its
flags from these fields (`add_dataclass_arguments`), so `--help` and the docstrings never drift apart. `validate()`
turns a bad value into a one-line `DiffusionVLError`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from diffusionvl.core.errors import DiffusionVLError, check

DEFAULT_MASK_TOKEN = "<|mask|>"
# Names under which pretrained vocabularies already carry a mask token (looked up in this order).
KNOWN_MASK_TOKENS = ("<|mask|>", "<|MASK|>", "<|mdm_mask|>", "[MASK]", "<mask>")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help text (used for `--help` and the docs)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class DiffusionConfig:
    """How a backbone is used as a block-diffusion model. Saved in the model's config under `diffusionvl`."""

    block_size: int = option(8, "Tokens per block B: the model fills B tokens in parallel, block after block.")
    mask_token: str = option(DEFAULT_MASK_TOKEN, "Name of the mask token [M] in the tokenizer (looked up by name).")
    prediction: Literal["shift", "same"] = option(
        "shift",
        "Which position's logits predict token i: 'shift' = position i-1, as in the AR model (Fast-dLLM v2); "
        "'same' = position i itself (BD3-LM, LLaDA, the DiffusionVL checkpoints).",
    )
    eos_token: str | None = option(
        None, "Name of the end-of-answer token: block padding in training and the stop token in decoding "
        "(default: the chat template's end-of-turn token, else the tokenizer's EOS).")
    positions: Literal["model", "sequential"] = option(
        "model",
        "Prompt position ids: 'model' = the backbone's own scheme (3-D M-RoPE grid positions for Qwen-VL image "
        "tokens); 'sequential' = 0, 1, 2, ... on every channel, image tokens included (how the DiffusionVL "
        "reference trains and decodes its Qwen2.5-VL checkpoints).",
    )
    noise_eps: float = option(1e-3, "Smallest masking rate t drawn in training (t ~ U[eps, 1]).")
    antithetic: bool = option(True, "Stratify the per-block masking rates over the batch (lower-variance loss).")
    bd3_trained: bool = option(
        True, "False on a fresh conversion of an AR model (recorded by convert), until BD3 training sets it: block "
        "and full decoding of such a model print a one-line hint once per process.")

    def validate(self) -> "DiffusionConfig":
        check(isinstance(self.block_size, int) and self.block_size >= 1,
              f"block_size must be an integer >= 1, got {self.block_size!r}")
        check(self.prediction in ("shift", "same"), f"prediction must be 'shift' or 'same', got {self.prediction!r}")
        check(self.positions in ("model", "sequential"),
              f"positions must be 'model' or 'sequential', got {self.positions!r}")
        check(0.0 < self.noise_eps < 1.0, f"noise_eps must be in (0, 1), got {self.noise_eps!r}")
        check(bool(self.mask_token), "mask_token must be a non-empty token name")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionConfig":
        check(isinstance(data, dict), f"the model's diffusion settings (config.json 'diffusionvl') must be a mapping, "
                                      f"got {str(data)[:80]!r}; convert the model again")
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).validate()


SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # the range torch.Generator.manual_seed accepts
MIN_TEMPERATURE = 1e-5  # below this a temperature is greedy (as vLLM treats it)


@dataclass
class DecodeConfig:
    """Settings of one generation call. `None` means: take the model's own value (block size) or a derived one."""

    decoder: Literal["block", "ar", "full"] = option(
        "block", "'block' = block diffusion with KV cache; 'ar' = autoregressive baseline; 'full' = LLaDA-style "
        "full-sequence diffusion (no cache)."
    )
    max_new_tokens: int = option(128, "Most tokens to generate per sample (each sample stops at its own EOS).")
    block_size: int | None = option(None, "Block size B for decoding (default: the model's training block size).")
    steps: int | None = option(None, "Denoising steps per block S, 1 <= S <= B (default: B, one token per step).")
    policy: Literal["static", "threshold"] = option(
        "static", "Which masked positions to fill per step: 'static' = the k most confident (k = B/S); "
        "'threshold' = all with confidence >= threshold, at least k."
    )
    threshold: float = option(0.9, "Confidence threshold of the 'threshold' policy, in (0, 1].")
    temperature: float = option(0.0, "Sampling temperature; 0 (or below 1e-5) = greedy.")
    top_k: int = option(0, "Keep only the k most likely tokens before sampling (0 = off).")
    top_p: float = option(1.0, "Nucleus sampling: keep the smallest set with this much probability (1 = off).")
    seed: int | None = option(None, "Random seed for sampling (None = nondeterministic).")
    use_cache: bool = option(True, "Keep finished blocks in the KV cache (False recomputes the prefix every step).")
    stop_early: bool = option(
        True, "Block decoder: end a sample's block as soon as every position up to and including its first stop token "
        "is filled, instead of denoising the positions after it. Same greedy answers, fewer forwards; adds a host sync "
        "per step to static blocks."
    )
    fast: Literal["auto", "on", "off", "compile"] = option(
        "auto", "Fast path (static shapes, CUDA graphs on GPU): 'auto' uses it where it helps (GPU), 'on' always "
        "(eager static shapes without CUDA), 'compile' also torch.compiles the step (slow first call), 'off' = plain "
        "eager. Same tokens either way; falls back with a logged reason when unavailable."
    )

    @property
    def canvas_block(self) -> int | None:
        """The block size the decoder lays prompt + budget out in (block decoding), else None."""
        return self.block_size if self.decoder == "block" else None

    def resolved(self, model_block_size: int) -> "DecodeConfig":
        """A copy with `block_size`/`steps` filled in and every field validated."""
        cfg = dataclasses.replace(self)
        if cfg.block_size is None:
            cfg.block_size = 1 if cfg.decoder == "ar" else model_block_size
        if cfg.steps is None:
            cfg.steps = cfg.block_size
        return cfg.validate()

    def validate(self) -> "DecodeConfig":
        check(self.decoder in ("block", "ar", "full"), f"decoder must be block, ar or full, got {self.decoder!r}")
        check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
              f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.block_size is not None:
            check(isinstance(self.block_size, int) and self.block_size >= 1,
                  f"block size must be an integer >= 1, got {self.block_size!r}")
        if self.steps is not None:
            check(isinstance(self.steps, int) and self.steps >= 1, f"steps must be an integer >= 1, got {self.steps!r}")
            if self.block_size is not None:
                check(self.steps <= self.block_size,
                      f"steps ({self.steps}) cannot exceed the block size ({self.block_size}): "
                      "each step fills at least one token")
        check(self.policy in ("static", "threshold"), f"policy must be static or threshold, got {self.policy!r}")
        check(isinstance(self.threshold, (int, float)) and 0.0 < self.threshold <= 1.0,
              f"threshold must be in (0, 1], got {self.threshold!r}")
        check(isinstance(self.temperature, (int, float)) and self.temperature >= 0.0,
              f"temperature must be >= 0, got {self.temperature!r}")
        check(math.isfinite(self.temperature), f"temperature must be finite, got {self.temperature!r}")
        if self.temperature < MIN_TEMPERATURE:  # logits / 1e-320 overflow to inf: such a temperature is greedy
            self.temperature = 0.0
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k!r}")
        check(isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0,
              f"top_p must be in (0, 1], got {self.top_p!r}")
        check(self.fast in ("auto", "on", "off", "compile"),
              f"fast must be auto, on, off or compile, got {self.fast!r}")
        check(self.seed is None or (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX),
              f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}] (what torch's generator takes), got {self.seed!r}")
        return self


# ----------------------------------------------------------------------------------------------------------------
# dataclass <-> argparse / YAML / JSON


def _arg_type(tp: Any) -> tuple[Any, dict[str, Any]]:
    """argparse `type` and extra kwargs for a dataclass field type."""
    origin = typing.get_origin(tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if origin is typing.Union or (origin is not None and type(None) in typing.get_args(tp)):
        return _arg_type(args[0]) if len(args) == 1 else (str, {})
    if origin is Literal:
        return type(args[0]), {"choices": list(args)}
    if origin in (list, tuple):
        inner = args[0] if args else str
        return inner, {"nargs": "*"}
    if tp is bool:
        return _parse_bool, {"metavar": "BOOL"}
    if tp in (int, float, str):
        return tp, {}
    return str, {}


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one `--field-name` flag per field of dataclass `cls` (default None = keep the dataclass default)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__, (cls.__doc__ or "").strip().splitlines()[0])
    for f in dataclasses.fields(cls):
        if f.name in skip or f.metadata.get("cli") is False:
            continue
        kind, extra = _arg_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})".replace("%", "%%")
        group.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, type=kind, default=None,
                           help=help_text, **extra)


def dataclass_from_args(cls: type, args: argparse.Namespace, base: Any = None) -> Any:
    """Build `cls` from parsed flags; flags left unset keep `base`'s (or the default) value."""
    obj = base if base is not None else cls()
    updates = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
               if getattr(args, f.name, None) is not None}
    return dataclasses.replace(obj, **updates)


def load_config_file(path: str | os.PathLike[str], cls: type) -> Any:
    """Read a YAML or JSON file into dataclass `cls`; unknown keys are an error that names them."""
    check(os.path.isfile(path), f"config file not found: {path}")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one line
        raise DiffusionVLError(f"cannot parse config file {path}: {str(exc).splitlines()[0]}") from None
    check(isinstance(data, dict), f"config file {path} must hold a mapping of field names to values")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    check(not unknown, f"unknown field(s) in {path}: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    for name, value in list(data.items()):
        if isinstance(value, str) and _matches(1.0, hints.get(name, Any)) and not _matches(value, hints.get(name, Any)):
            try:  # YAML reads 1e-4 (no dot) as a string: a number field takes it as the number it spells
                data[name] = value = float(value)
            except ValueError:
                pass
        check(_matches(value, hints.get(name, Any)),
              f"{path}: {name} must be {_type_name(hints.get(name, Any))}, got {value!r}"[:300])
    return cls(**data)


def _matches(value: Any, tp: Any) -> bool:
    """Does a value read from YAML/JSON have the field's type? (bool is not a number; an int is a float.)"""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if origin is typing.Union or (origin is not None and type(None) in args):
        return any(_matches(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in args
    if origin in (list, tuple):
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value) if args else isinstance(value, list)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp) if isinstance(tp, type) else True


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if typing.get_origin(tp) in (list, tuple):
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    if len(args) == 1:
        return _type_name(args[0]) + " (or null)"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))
