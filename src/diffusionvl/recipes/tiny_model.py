"""The tiny-VLM recipe's model: its configuration and the exact starting point every stage (and the embedded
default model) is built from.

Contract: `TinyVLMConfig` holds every recipe option (saved in the default model's manifest and read back by
`config_from_dict`, which ignores unknown keys). `build_init(cfg)` = SmolLM2-135M-Instruct + EfficientNet-Lite0
(the recipe's tower: `tower_options`, no centre crop, tokens standardized per channel by `tower_standardization`)
+ an MLP projector, ChatML without a default system prompt, wrapped for diffusion; deterministic given the config.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from diffusionvl.backbone import assets
from diffusionvl.backbone.compose import compose
from diffusionvl.backbone.vision.encoders import token_statistics
from diffusionvl.core.config import option
from diffusionvl.core.errors import check
from diffusionvl.model.wrapping import wrap
from diffusionvl.recipes.vision_gate import candidate_tower, probe_scenes


@dataclass
class TinyVLMConfig:
    """The tiny-VLM recipe (`diffusionvl recipe tiny-vlm`)."""

    out: str = option("runs/tiny-vlm", "Output folder of every stage (a rerun resumes finished stages).")
    seed: int = option(0, "Seed of the data, the projector initialization and the training noise.")
    lm: str = option("tiny", "Language model: 'tiny' = a small Llama-architecture LM with SmolLM2's tokenizer and chat "
                     "template, trained in full by the recipe (fits two CPU cores); 'smollm2' = pretrained "
                     "SmolLM2-135M-Instruct + LoRA (the GPU path).")
    lm_init: str = option("scratch", "How the tiny LM starts: 'scratch' (random) or 'smollm2' (its token embeddings "
                          "are SmolLM2-135M-Instruct's, projected to --lm-width by PCA).")
    lm_width: int = option(256, "Hidden size of the tiny LM.")
    lm_layers: int = option(4, "Decoder layers of the tiny LM.")
    n_train: int = option(20000, "Images of the main AR instruction-tuning stage (1-4 objects; each carries up to "
                          "--questions-per-image independent questions, or one description).")
    recognition_images: int = option(6000, "Images of the recognition stage that comes first (one-object scenes: "
                                     "shape, colour, position, exist; 0 = skip it).")
    recognition_epochs: int = option(3, "Most epochs of the recognition stage (it ends earlier at "
                                     "--recognition-target).")
    recognition_target: float = option(0.95, "The recognition stage ends when every one-object question type reaches "
                                       "this held-out accuracy (its own validation split).")
    recognition_replay: int = option(2000, "Recognition images whose questions are replayed in the binding stage "
                                     "(mixed into its data, so one-object reading is kept while binding is learned).")
    binding_presentations: int = option(150000, "Binding questions (shape and colour of one object among several: "
                                        "\"what colour is the star?\") the binding stage presents; its epochs over "
                                        "the main data follow from this (--stage2-epochs overrides).")
    stage_plateau_s: float = option(600.0, "A parent stage ends when no question type's held-out accuracy has risen by "
                                    "2 points for this many seconds (0 = never).")
    adam_beta2: float = option(0.95, "AdamW beta2 of every stage (0.95: the from-scratch LM's choice; 0.999 is slower "
                               "to learn colour, measured).")
    lr_full: float = option(1e-3, "Learning rate of the tiny LM's full-weight AR stages.")
    loss_norm: str = option("token", "How the AR stages average token losses: 'segment' (each question counts "
                            "once, whatever its answer's length) or 'token' (descriptions outweigh one-word answers).")
    eval_every: int = option(150, "Eval loss, image dependence and per-type accuracy on 64 validation questions "
                             "every N steps of each training stage (the grounding curves).")
    min_image_dependence: float = option(0.01, "A parent stage whose image dependence (eval loss with rolled minus "
                                         "right images) is still below this after --grounding-patience-s stops.")
    grounding_patience_s: float = option(900.0, "Seconds before --min-image-dependence is enforced.")
    stage2_samples: int | None = option(None, "Use only the first N training samples in stage 2 (default: all).")
    n_val: int = option(200, "Validation samples (eval loss).")
    n_test: int = option(400, "Held-out test questions for the accuracy table.")
    image_size: int = option(224, "Image side in pixels.")
    pool: int = option(4, "EfficientNet feature grid pooled to POOL x POOL visual tokens per image.")
    vision_stages: list[int] = option([-1, 0, 1, 2, 4], "EfficientNet stages whose pooled outputs make the visual tokens "
                                      "(-1 = the pixels; the final ImageNet features are nearly colour-blind).")
    vision_pooling: str = option("maxmin", "How the stages are pooled to the token grid: avg, max, avgmax, maxmin, "
                                 "avgmaxmin.")
    vision_final: bool = option(False, "Also use the final 1280 EfficientNet channels.")
    vision_standardize: bool = option(True, "Map every visual token channel to zero mean and unit variance (statistics "
                                      "of 256 synthetic probe scenes), so the projector starts from well-scaled inputs.")
    questions_per_image: int = option(8, "Question/answer turns per training image (one forward pays the image "
                                      "and template tokens once).")
    task_mix: dict[str, float] = option({"shape": 4.0, "colour": 4.0, "count": 0.5, "position": 0.5, "relation": 0.5,
                                         "exist": 0.5, "describe": 0.5}, "Question type -> weight of each question "
                                        "of a main-stage image (the binding stage: shape and colour of one object "
                                        "among several get most).")
    gate_scenes: int = option(2400, "Synthetic scenes of the vision gate (linear probes on the frozen tower's tokens, "
                              "half held out).")
    gate_strict: bool = option(True, "Stop before any LM training when the tower fails the vision gate.")
    gate_only: bool = option(False, "Run only the vision gate (minutes: the tower and its probes) and stop before "
                             "data generation and training.")
    block_size: int = option(8, "Diffusion block size B.")
    batch_size: int = option(16, "Training samples per optimizer step.")
    stage1_samples: int = option(0, "Samples of the projector-alignment stage (0: skip it; stage 2 trains the "
                                 "projector with the LoRA adapters).")
    stage1_lr: float = option(1e-3, "Learning rate of stage 1 (projector).")
    stage2_epochs: int | None = option(None, "Epochs of the binding stage over the main data (default: as many as "
                                       "--binding-presentations needs).")
    lr: float = option(1e-3, "Learning rate of the LoRA stages.")
    lr_projector: float = option(2e-3, "Learning rate of the projector in stage 2 (a fresh module: faster than the "
                                 "adapters).")
    lora_r: int = option(16, "LoRA rank of the language model adapters.")
    diffusion_fraction: float = option(0.15, "Share of stage 2's samples the translation may use (the paper: < 5% "
                                       "of a far larger set).")
    diffusion_epochs: int = option(3, "Epochs over the translation subset.")
    direct: bool = option(False, "Also train the direct AR-LM -> diffusion-VLM path (costly on CPU).")
    direct_epochs: int = option(1, "Epochs of the direct path over its data.")
    direct_samples: int | None = option(None, "Direct path on the first N training samples only (default: stage 2's "
                                        "data; the translation's count gives both paths the same diffusion budget).")
    thresholds: list[float] = option([0.5, 0.7, 0.8, 0.9, 0.95, 0.99], "Confidence thresholds evaluated.")
    eval_limit: int | None = option(None, "Evaluate only the first N short-answer test questions.")
    describe_limit: int | None = option(None, "Evaluate only the first N description test samples.")
    describe_tokens: int = option(48, "Most new tokens of a description (4 objects take about 36).")
    full_baseline: bool = option(False, "Also evaluate the LLaDA-style full-sequence decoder (slow on CPU).")
    export_to: str | None = option(None, "Folder that receives the compact default-model weights.")
    threads: int | None = option(2, "torch CPU threads (None: torch's choice).")
    progress: bool = option(True, "Progress bars.")

    @property
    def ar_samples(self) -> int:
        """Distinct samples of AR instruction tuning (stage 2); the diffusion fraction is taken of these."""
        return min(self.n_train, self.stage2_samples or self.n_train)

    def validate(self) -> "TinyVLMConfig":
        check(0.0 < self.diffusion_fraction <= 1.0, f"diffusion_fraction must be in (0, 1], got {self.diffusion_fraction}")
        for name in ("n_train", "n_test", "batch_size", "block_size", "pool", "lora_r", "questions_per_image",
                     "recognition_epochs", "diffusion_epochs"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(self.stage2_epochs is None or self.stage2_epochs >= 1, f"stage2_epochs must be >= 1, got "
                                                                     f"{self.stage2_epochs}")
        check(0.0 < self.recognition_target <= 1.0, f"recognition_target must be in (0, 1], got "
                                                    f"{self.recognition_target}")
        check(0.0 <= self.adam_beta2 < 1.0, f"adam_beta2 must be in [0, 1), got {self.adam_beta2}")
        for name in ("recognition_replay", "binding_presentations", "stage_plateau_s"):
            check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        check(self.stage1_samples >= 0, f"stage1_samples must be >= 0, got {self.stage1_samples}")
        check(self.threads is None or self.threads >= 1, f"threads must be >= 1, got {self.threads}")
        check(all(0.0 < t <= 1.0 for t in self.thresholds), "thresholds must be in (0, 1]")
        check(self.lm in ("tiny", "smollm2"), f"lm must be tiny or smollm2, got {self.lm!r}")
        check(self.lm_init in ("scratch", "smollm2"), f"lm_init must be scratch or smollm2, got {self.lm_init!r}")
        check(self.lm_width >= 64 and self.lm_width % 64 == 0, f"lm_width must be a multiple of 64, got {self.lm_width}")
        check(self.lm_layers >= 1, f"lm_layers must be >= 1, got {self.lm_layers}")
        check(self.recognition_images >= 0, f"recognition_images must be >= 0, got {self.recognition_images}")
        check(self.loss_norm in ("segment", "token", "sample"), f"loss_norm must be segment, token or sample, "
                                                                f"got {self.loss_norm!r}")
        return self


def config_from_dict(data: dict[str, Any]) -> TinyVLMConfig:
    """The recipe configuration saved in a manifest (unknown keys from other versions are ignored)."""
    names = {f.name for f in dataclasses.fields(TinyVLMConfig)}
    return TinyVLMConfig(**{k: v for k, v in data.items() if k in names})


CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tower_options(cfg: TinyVLMConfig) -> dict[str, Any]:
    """The tower spec fields the recipe's options select (saved with the model)."""
    return {"extra_stages": list(cfg.vision_stages), "pooling": cfg.vision_pooling,
            "final": cfg.vision_final} if cfg.vision_stages else {}


def tower_candidate(cfg: TinyVLMConfig) -> dict[str, Any]:
    """The recipe's tower as a vision-gate candidate (the same spec, grid and preprocessing build_init uses)."""
    options = tower_options(cfg)
    name = f"stages {cfg.vision_stages} {cfg.vision_pooling}{' + final' if cfg.vision_final else ''}, {cfg.pool}x{cfg.pool}"
    return {"name": name, "pool": cfg.pool, "crop_pct": None, "vision_options": options}


def tower_standardization(cfg: TinyVLMConfig) -> dict[str, list[float]]:
    """Per-channel statistics of the recipe's tower tokens over 256 synthetic probe scenes (deterministic)."""
    tower, transform = candidate_tower(tower_candidate(cfg))
    return token_statistics(tower, transform, probe_scenes(256, cfg.seed + 1, cfg.image_size).images)


def tiny_lm(cfg: TinyVLMConfig, smollm2: Any, tokenizer: Any) -> Any:
    """A small Llama-architecture causal LM over SmolLM2's vocabulary (tied embeddings), random or with SmolLM2's
    token embeddings projected to `lm_width` dimensions (PCA), scaled to the usual 0.02 init spread."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    width = cfg.lm_width
    config = LlamaConfig(vocab_size=smollm2.config.vocab_size, hidden_size=width, intermediate_size=4 * width,
                         num_hidden_layers=cfg.lm_layers, num_attention_heads=max(1, width // 64),
                         num_key_value_heads=max(1, width // 64), max_position_embeddings=1024, rope_theta=10000.0,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config._attn_implementation = "sdpa"
    lm = LlamaForCausalLM(config)
    if cfg.lm_init == "smollm2":
        source = smollm2.get_input_embeddings().weight.detach().float()  # [V, 576]
        centred = source - source.mean(0, keepdim=True)
        _, _, v = torch.pca_lowrank(centred, q=width, center=False, niter=4)
        projected = centred @ v[:, :width]  # [V, width]
        with torch.no_grad():
            lm.get_input_embeddings().weight.copy_(projected * (0.02 / projected.std()))
    return lm.eval()


def build_init(cfg: TinyVLMConfig, standardize: dict[str, list[float]] | None = None) -> Any:
    """SmolLM2-135M-Instruct + EfficientNet-Lite0 + projector, wrapped for diffusion (the mask token is
    added, mean-initialized). Deterministic given the config (and `standardize`, the tower's token statistics, which
    are measured when not given); the embedded default model rebuilds exactly this before applying its adapters."""
    import torch

    options = tower_options(cfg)
    if cfg.vision_standardize:
        options["standardize"] = standardize or tower_standardization(cfg)
    lm, tok = assets.load_smollm2(progress=False)
    torch.manual_seed(cfg.seed)
    if cfg.lm == "tiny":
        lm = tiny_lm(cfg, lm, tok)
    model, processor = compose(lm, tok, vision="efficientnet_lite0", projector="mlp2x_gelu", pool=cfg.pool,
                               vision_options=options or None, chat_template=CHATML,
                               transform_options={"crop_pct": None})
    return wrap(model, processor, block_size=cfg.block_size, prediction="shift")
