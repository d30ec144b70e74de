"""`diffusionvl compose` as a job: compose an AR text LM + a vision encoder + a projector and write the AR VLM folder.

Contract: `ComposeOptions` are the command's flags; `compose_to_disk(options, output)` loads the LM ('smollm2' = the
offline asset, else a causal LM folder or hub id), calls `compose.compose`, and saves model + processor atomically
(`atomic.write_folder`); it returns (path, summary) with the parameter count per part (`train.parts`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from transformers import AutoModelForCausalLM

from diffusionvl.backbone import assets
from diffusionvl.backbone.compose import compose
from diffusionvl.core.atomic import write_folder
from diffusionvl.core.config import option
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train.parts import parameter_counts
from diffusionvl.model.conversion import check_source


@dataclass
class ComposeOptions:
    """What to compose (the `diffusionvl compose` flags)."""

    lm: str = option("smollm2", "Text LM: a causal LM folder or hub id, or 'smollm2' (the offline "
                     "SmolLM2-135M-Instruct asset).")
    vision: str = option("efficientnet_lite0", "Vision encoder: 'efficientnet_lite0' (offline ImageNet asset), a "
                         "HF vision model folder (SigLIP, CLIP, ...) or 'timm:NAME'.")
    projector: Literal["linear", "mlp2x_gelu"] = option("mlp2x_gelu", "Projector from visual tokens to LM "
                                                        "embeddings (LLaVA-1.5 uses mlp2x_gelu).")
    pool: int | None = option(None, "Average-pool the encoder's grid to POOL x POOL tokens per image; unset keeps "
                              "all of them (7 x 7 = 49 for EfficientNet-Lite0 at 224 px).")
    image_token: str = option("<image>", "Name of the image placeholder token added to the tokenizer.")
    feature_layer: int = option(-2, "Hidden layer of a HF ViT tower whose patch tokens are used (LLaVA: -2).")
    image_aspect_ratio: str = option("square", "How images become tiles: 'square' (one resized tile), 'pad' (padded "
                                     "to a square first), 'anyres' or 'anyres_max_N' (base tile + a grid of tiles "
                                     "at the best of --image-grid-pinpoints; LLaVA-OneVision uses anyres_max_4).")
    image_grid_pinpoints: str | None = option(None, "anyres grid resolutions: '(1x1),...,(3x3)' (in tiles) or "
                                              "'[[448,448],[448,896]]' (in pixels).")
    patch_merge: Literal["flat", "spatial_unpad"] = option("flat", "How tile tokens are merged: 'flat', or "
                                                           "'spatial_unpad' (unpadded tile grid + a learned newline "
                                                           "token per row, LLaVA-NeXT).")
    random_vision: bool = option(False, "Initialize the vision encoder randomly instead of loading pretrained "
                                 "weights (for tests and smoke runs).")


def load_lm(spec: str) -> tuple[Any, Any]:
    """'smollm2' (offline asset) or a causal LM folder / hub id -> (model, tokenizer)."""
    from transformers import AutoTokenizer

    if spec == "smollm2":
        return assets.load_smollm2(progress=False)
    check_source(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise DiffusionVLError(f"cannot load the language model {spec}: {str(exc).splitlines()[0]}") from None
    return model, AutoTokenizer.from_pretrained(spec)


def compose_to_disk(options: ComposeOptions, output: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Compose as `options` says and save the AR VLM folder at `output` atomically; returns (path, summary)."""
    lm, tokenizer = load_lm(options.lm)
    model, processor = compose(lm, tokenizer, options.vision, options.projector, options.pool, options.image_token,
                               options.feature_layer, vision_pretrained=not options.random_vision,
                               image_aspect_ratio=options.image_aspect_ratio,
                               image_grid_pinpoints=options.image_grid_pinpoints, patch_merge=options.patch_merge)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        processor.save_pretrained(folder)

    path = write_folder(output, write)
    summary = {"output": str(path), "lm": options.lm, "vision": model.config.vision.get("name", options.vision),
               "projector": options.projector, "num_image_tokens": model.config.num_image_tokens,
               "image_token": options.image_token, "parameters": parameter_counts(model)}
    return path, summary
