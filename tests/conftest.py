"""Shared fixtures: tiny random models built from configs (no downloads), cached per test session."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from diffusionvl.backbone.tiny import make_tiny
from diffusionvl.model.wrapping import wrap

# Tiny models gain nothing from intra-op threads; on a shared 2-core machine threads make tiny matmuls far slower.
torch.set_num_threads(1)

TEXT_ARCHS = ("llama", "qwen2", "gemma3")
VL_ARCHS = ("qwen2_5_vl",)


try:  # property tests (tests/test_properties.py): deterministic, so CI is never flaky; `--hypothesis-profile long`
    from hypothesis import HealthCheck, settings  # for a deep run (docs/reliability.md)

    settings.register_profile("ci", max_examples=40, derandomize=True, database=None, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    # the deep run explores new cases each time; `--hypothesis-seed N` replays one
    settings.register_profile("long", settings.get_profile("ci"), max_examples=400, derandomize=False)
    settings.load_profile("ci")
except ImportError:
    pass


@functools.lru_cache(maxsize=None)
def _tiny(arch: str):
    return make_tiny(arch, seed=0)


def tiny_ar(arch: str):
    """A fresh copy of the tiny AR model `arch` and its tokenizer/processor."""
    model, proc = _tiny(arch)
    return copy.deepcopy(model), copy.deepcopy(proc)


def tiny_diffusion(arch: str, block_size: int = 4, prediction: str = "shift"):
    model, proc = tiny_ar(arch)
    return wrap(model, proc, block_size=block_size, prediction=prediction)


def red_square(size=(84, 70), color="red"):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).rectangle([10, 10, 50, 50], fill=color)
    return img


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def has_cuda() -> bool:
    return torch.cuda.is_available()
