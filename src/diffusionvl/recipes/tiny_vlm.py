"""The tiny-VLM recipe: the paper's claims reproduced in small, offline, on CPU.

Contract (`run_recipe(TinyVLMConfig)`; every stage writes into its own folder under `out` and is skipped when that
folder is complete, so an interrupted recipe resumes where it stopped):
  data        synthetic visual QA (train/val/test splits, LLaVA JSON + eval JSONL), data.synth
  init        SmolLM2-135M-Instruct + EfficientNet-Lite0 (frozen) + MLP projector -> an AR VLM (compose.py),
              wrapped with the mask token so every stage is a diffusionvl checkpoint
  stage1      projector alignment: AR loss, projector only
  stage2      AR instruction tuning: AR loss, LoRA on the LM + projector -> the AR VLM
  translate   AR VLM -> diffusion VLM: BD3 loss with at most `diffusion_fraction` of stage 2's samples
  direct      (optional) AR LM -> diffusion VLM directly: BD3 loss from the stage-1 model on stage 2's data
  eval        AR VLM vs diffusion VLM on the held-out test split: accuracy, tokens/forward, tokens/s for the
              ar / static / threshold (several tau) / full decoders -> results.json, results.md, a plot
  export      the compact weights the embedded default needs (projector + LoRA adapters, fp16) -> `export_to`
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from diffusionvl.config import option
from diffusionvl.errors import check


@dataclass
class TinyVLMConfig:
    """The tiny-VLM recipe (`diffusionvl recipe tiny-vlm`)."""

    out: str = option("runs/tiny-vlm", "Output folder of every stage (a rerun resumes finished stages).")
    seed: int = option(0, "Seed of the data, the projector initialization and the training noise.")
    n_train: int = option(6000, "AR instruction-tuning samples (synthetic training split size).")
    stage2_samples: int | None = option(None, "Use only the first N training samples in stage 2 (default: all).")
    n_val: int = option(200, "Validation samples (eval loss).")
    n_test: int = option(400, "Held-out test questions for the accuracy table.")
    image_size: int = option(224, "Image side in pixels.")
    pool: int = option(4, "EfficientNet feature grid pooled to POOL x POOL visual tokens per image.")
    vision_stages: list[int] = option([2], "EfficientNet stages whose features join the final ones (colour and "
                                      "edges; the final ImageNet features are nearly colour-blind). [] = final only.")
    block_size: int = option(8, "Diffusion block size B.")
    batch_size: int = option(16, "Training samples per optimizer step.")
    stage1_samples: int = option(2000, "Samples of the projector-alignment stage.")
    stage1_lr: float = option(1e-3, "Learning rate of stage 1 (projector).")
    stage2_epochs: int = option(1, "Epochs of AR instruction tuning.")
    lr: float = option(5e-4, "Learning rate of the LoRA stages.")
    lora_r: int = option(8, "LoRA rank of the language model adapters.")
    diffusion_fraction: float = option(0.05, "Share of stage 2's samples the translation may use (the paper: < 5%).")
    diffusion_epochs: int = option(4, "Epochs over the translation subset.")
    direct: bool = option(False, "Also train the direct AR-LM -> diffusion-VLM path (costly on CPU).")
    direct_epochs: int = option(1, "Epochs of the direct path over its data.")
    direct_samples: int | None = option(None, "Direct path on the first N training samples only (default: stage 2's "
                                        "data; the translation's count gives both paths the same diffusion budget).")
    thresholds: list[float] = option([0.5, 0.7, 0.8, 0.9, 0.95, 0.99], "Confidence thresholds evaluated.")
    eval_limit: int | None = option(None, "Evaluate only the first N test questions.")
    export_to: str | None = option(None, "Folder that receives the compact default-model weights.")
    threads: int | None = option(None, "torch CPU threads (default: torch's choice).")
    progress: bool = option(True, "Progress bars.")

    @property
    def ar_samples(self) -> int:
        """Distinct samples of AR instruction tuning (stage 2); the diffusion fraction is taken of these."""
        return min(self.n_train, self.stage2_samples or self.n_train)

    def validate(self) -> "TinyVLMConfig":
        check(0.0 < self.diffusion_fraction <= 1.0, f"diffusion_fraction must be in (0, 1], got {self.diffusion_fraction}")
        for name in ("n_train", "n_test", "stage1_samples", "batch_size", "block_size", "pool", "lora_r"):
            check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        check(all(0.0 < t <= 1.0 for t in self.thresholds), "thresholds must be in (0, 1]")
        return self


def _say(msg: str) -> None:
    print(f"[tiny-vlm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _subset(src: Path, dst: Path, n: int) -> Path:
    """The first n records of a LLaVA JSON list (the generator's order is already random), written atomically."""
    records = json.loads(src.read_text())[:n]
    tmp = dst.with_suffix(".tmp")
    tmp.write_text(json.dumps(records))
    os.replace(tmp, dst)
    return dst


# ---------------------------------------------------------------------------------------------------- stages
def stage_data(cfg: TinyVLMConfig, out: Path) -> Path:
    from diffusionvl.data import generate_dataset

    folder = out / "data"
    if not (folder / "summary.json").is_file():
        _say(f"generating {cfg.n_train} train / {cfg.n_val} val / {cfg.n_test} test samples")
        generate_dataset(folder, n_train=cfg.n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed,
                         image_size=cfg.image_size, progress=cfg.progress)
    return folder


def build_init(pool: int, block_size: int, seed: int, vision_stages: list[int] | None = None) -> Any:
    """SmolLM2 + EfficientNet-Lite0 + projector, wrapped for diffusion (the mask token is added, mean-initialized).
    Deterministic given `seed`; the embedded default model rebuilds exactly this before applying its adapters."""
    import torch

    from diffusionvl import assets
    from diffusionvl.compose import compose
    from diffusionvl.conversion import wrap

    lm, tok = assets.load_smollm2(progress=False)
    torch.manual_seed(seed)
    options = {"extra_stages": list(vision_stages)} if vision_stages else None
    model, processor = compose(lm, tok, vision="efficientnet_lite0", projector="mlp2x_gelu", pool=pool,
                               vision_options=options)
    return wrap(model, processor, block_size=block_size, prediction="shift")


def stage_init(cfg: TinyVLMConfig, out: Path) -> Path:
    from diffusionvl.conversion import save_atomic

    path = out / "init"
    if not (path / "diffusionvl.json").is_file():
        _say("composing SmolLM2-135M-Instruct + EfficientNet-Lite0 + projector")
        save_atomic(build_init(cfg.pool, cfg.block_size, cfg.seed, cfg.vision_stages), path)
    return path


def _train(cfg: TinyVLMConfig, name: str, out: Path, model: Path, data: Path, val: Path, **kw: Any) -> Path:
    from diffusionvl.train import TrainConfig, train

    final = out / name / "final"
    if (final / "diffusionvl.json").is_file():
        return final
    _say(f"stage {name}: {kw.get('objective', 'bd3')} objective on {data.name}")
    tc = TrainConfig(model=str(model), data=str(data), output=str(out / name), eval_data=str(val), seed=cfg.seed,
                     image_folder=str(out / "data"),
                     batch_size=cfg.batch_size, num_workers=0, save_every=50, keep_checkpoints=1, log_every=10,
                     progress=cfg.progress, tensorboard=False, resume="auto", max_length=256, warmup_ratio=0.05,
                     **kw)
    summary = train(tc)
    _say(f"stage {name} done: {json.dumps({k: summary.get(k) for k in ('steps', 'eval_loss', 'tokens_per_s')})}")
    return final


def _lora(cfg: TinyVLMConfig, **kw: Any) -> dict[str, Any]:
    return dict(lora=True, lora_r=cfg.lora_r, lora_alpha=2.0 * cfg.lora_r, lora_dropout=0.0, lr=cfg.lr, **kw)


def run_stages(cfg: TinyVLMConfig) -> dict[str, Path]:
    out = Path(cfg.out)
    data = stage_data(cfg, out)
    val = data / "val.json"
    init = stage_init(cfg, out)
    stage1_data = _subset(data / "train.json", out / "stage1.json", cfg.stage1_samples)
    s1 = _train(cfg, "stage1", out, init, stage1_data, val, objective="ar", lr=cfg.stage1_lr,
                freeze=["vision", "language"], epochs=1)
    stage2_data = data / "train.json"
    if cfg.stage2_samples is not None:
        stage2_data = _subset(stage2_data, out / "stage2.json", cfg.stage2_samples)
    s2 = _train(cfg, "stage2", out, s1, stage2_data, val, objective="ar", epochs=cfg.stage2_epochs,
                **_lora(cfg, lora_modules_to_save=["projector"]))
    n_diff = max(1, int(cfg.diffusion_fraction * cfg.ar_samples))
    diff_data = _subset(data / "train.json", out / "translate.json", n_diff)
    tr = _train(cfg, "translate", out, s2, diff_data, val, objective="bd3", epochs=cfg.diffusion_epochs, **_lora(cfg))
    paths = {"data": data, "stage1": s1, "ar_vlm": s2, "dvlm": tr}
    if cfg.direct:
        direct_data = stage2_data
        if cfg.direct_samples is not None:
            direct_data = _subset(data / "train.json", out / "direct.json", cfg.direct_samples)
        paths["direct"] = _train(cfg, "direct", out, s1, direct_data, val, objective="bd3",
                                 epochs=cfg.direct_epochs, **_lora(cfg, lora_modules_to_save=["projector"]))
    return paths


# ------------------------------------------------------------------------------------------------------ eval
def decoder_grid(cfg: TinyVLMConfig) -> list[dict[str, Any]]:
    """Decoding settings compared in the table: AR, static at S = B and B/2, threshold at each tau, full."""
    b = cfg.block_size
    grid = [dict(decoder="block", policy="static", steps=b), dict(decoder="block", policy="static", steps=max(1, b // 2))]
    grid += [dict(decoder="block", policy="threshold", steps=b, threshold=t) for t in cfg.thresholds]
    grid += [dict(decoder="full", policy="static", steps=b)]
    return grid


def evaluate_model(path: Path, data: Path, decode: dict[str, Any], cfg: TinyVLMConfig, model: Any = None) -> dict:
    from diffusionvl.config import DecodeConfig
    from diffusionvl.conversion import load
    from diffusionvl.evaluation.runner import EvalConfig, evaluate, load_samples

    model = model or load(path, device="cpu")
    ecfg = EvalConfig(task="synth-vqa", data=str(data), limit=cfg.eval_limit, batch_size=16).validate()
    task, samples = load_samples(ecfg)
    summary, _ = evaluate(model, samples, task, ecfg, DecodeConfig(max_new_tokens=16, **decode), progress=cfg.progress)
    sp = summary["speed"]
    return {"accuracy": summary["accuracy"], "tokens_per_forward": sp["tokens_per_forward"],
            "tokens_per_second": sp["tokens_per_second"], "samples": summary["samples"],
            "per_type": {k: v["accuracy"] for k, v in summary["per_type"].items()}, **decode}


def run_eval(cfg: TinyVLMConfig, paths: dict[str, Path]) -> list[dict[str, Any]]:
    from diffusionvl.conversion import load

    rows = []
    cases: list[tuple[str, Path, list[dict[str, Any]]]] = [("AR VLM (stage 2)", paths["ar_vlm"], [dict(decoder="ar")]),
                                                          ("diffusion VLM (translated)", paths["dvlm"],
                                                           [dict(decoder="ar")] + decoder_grid(cfg))]
    if "direct" in paths:
        cases.append(("diffusion VLM (direct from AR LM)", paths["direct"], decoder_grid(cfg)[:3]))
    for label, path, grid in cases:
        model = load(path, device="cpu")
        for decode in grid:
            row = {"model": label, **evaluate_model(path, paths["data"], decode, cfg, model)}
            _say(f"{label} {decode}: accuracy {row['accuracy']:.3f}, {row['tokens_per_forward']:.2f} tok/fwd, "
                 f"{row['tokens_per_second']:.1f} tok/s")
            rows.append(row)
    return rows


def _decoder_label(row: dict[str, Any]) -> str:
    if row["decoder"] != "block":
        return row["decoder"] + (f" (B={row.get('steps')})" if row["decoder"] == "full" else "")
    tail = f", tau={row['threshold']:g}" if row["policy"] == "threshold" else ""
    return f"block {row['policy']} S={row['steps']}{tail}"


def results_markdown(cfg: TinyVLMConfig, rows: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    lines = ["# tiny-VLM recipe results", "",
             f"Held-out test questions: {rows[0]['samples']}. AR instruction tuning used {facts['n_ar']} samples; the "
             f"translation to diffusion used {facts['n_diffusion']} of them ({100 * facts['fraction']:.1f}%). "
             f"Block size B={cfg.block_size}. CPU timings ({facts['threads']} threads).", "",
             "| model | decoder | accuracy | tokens/forward | tokens/s |", "|---|---|---|---|---|"]
    if any("direct" in r["model"] for r in rows):
        lines[2] += (f" The direct path (AR LM -> diffusion VLM, from the stage 1 projector) trained on "
                     f"{facts.get('n_direct')} samples x {cfg.direct_epochs} epochs.")
    lines += [f"| {r['model']} | {_decoder_label(r)} | {100 * r['accuracy']:.1f}% | {r['tokens_per_forward']:.2f} "
              f"| {r['tokens_per_second']:.1f} |" for r in rows]
    types = sorted({t for r in rows for t in r["per_type"]})
    lines += ["", "Accuracy per question type:", "", "| model | decoder | " + " | ".join(types) + " |",
              "|---|---|" + "---|" * len(types)]
    lines += [f"| {r['model']} | {_decoder_label(r)} | " + " | ".join(f"{100 * r['per_type'].get(t, 0):.0f}%"
                                                                      for t in types) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_threshold_curve(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy vs tokens per forward across thresholds (with the static / AR points for reference)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    translated = [r for r in rows if "translated" in r["model"]]

    def block(policy: str) -> list[dict[str, Any]]:
        return [r for r in translated if r["decoder"] == "block" and r["policy"] == policy]

    series = [("diffusion VLM, threshold", block("threshold"), "o-"), ("diffusion VLM, static", block("static"), "s"),
              ("diffusion VLM, full", [r for r in translated if r["decoder"] == "full"], "x"),
              ("diffusion VLM, AR decoding", [r for r in translated if r["decoder"] == "ar"], "v"),
              ("AR VLM (stage 2)", [r for r in rows if r["model"].startswith("AR VLM")], "^")]
    for label, picked, style in series:
        pts = sorted(picked, key=lambda r: r["tokens_per_forward"])
        if not pts:
            continue
        ax.plot([r["tokens_per_forward"] for r in pts], [100 * r["accuracy"] for r in pts], style, label=label)
        for r in pts:
            if r.get("policy") == "threshold" and r["decoder"] == "block":
                ax.annotate(f"{r['threshold']:g}", (r["tokens_per_forward"], 100 * r["accuracy"]),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("tokens per forward")
    ax.set_ylabel("accuracy on held-out test (%)")
    ax.set_title("tiny-VLM: accuracy vs parallelism")
    ax.grid(alpha=0.3)
    ax.legend()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_results(cfg: TinyVLMConfig, rows: list[dict[str, Any]], out: Path) -> dict[str, Path]:
    import torch

    n_diff = max(1, int(cfg.diffusion_fraction * cfg.ar_samples))
    facts = {"n_ar": cfg.ar_samples * cfg.stage2_epochs, "n_diffusion": n_diff, "fraction": n_diff / cfg.ar_samples,
             "n_direct": min(cfg.direct_samples or cfg.ar_samples, cfg.n_train), "threads": torch.get_num_threads()}
    payload = {"config": dataclasses.asdict(cfg), "facts": facts, "rows": rows}
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy_vs_parallelism.png"}
    for key, text in (("json", json.dumps(payload, indent=2)), ("markdown", results_markdown(cfg, rows, facts))):
        tmp = paths[key].with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, paths[key])
    plot_threshold_curve(rows, paths["plot"])
    return paths


def run_recipe(cfg: TinyVLMConfig, stages: Callable[[TinyVLMConfig], dict[str, Path]] = run_stages) -> dict[str, Any]:
    import torch

    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    paths = stages(cfg)
    rows = run_eval(cfg, paths)
    written = write_results(cfg, rows, Path(cfg.out))
    _say(Path(written["markdown"]).read_text())
    if cfg.export_to:
        from diffusionvl.default import export_default

        export_default(paths, Path(cfg.export_to), cfg, rows)
    return {"paths": {k: str(v) for k, v in paths.items()}, "results": {k: str(v) for k, v in written.items()}}
