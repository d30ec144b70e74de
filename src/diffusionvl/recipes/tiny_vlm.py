"""The tiny-VLM recipe: the paper's claims reproduced in small, offline, on CPU.

Contract (`run_recipe(TinyVLMConfig)`; every stage writes into its own folder under `out` and is skipped when that
folder is complete, so an interrupted recipe resumes where it stopped):
  data        synthetic visual QA (train/val/test splits, LLaVA JSON + eval JSONL), data.synth: 1-4 objects per
              image, each image with up to `questions_per_image` independent questions (none answerable from the
              others' text) or one description
  data-recognition   one-object scenes (shape, colour, position, exist): the curriculum's first stage
  gate        probes on the frozen tower's tokens (recipes/vision_gate.py); a failing tower stops the recipe;
              `gate_only` runs this stage alone and returns its table (gate/gate.md) as the result
  init        (`lm="tiny"`) a small Llama-architecture LM with SmolLM2's tokenizer and chat template, or
              (`lm="smollm2"`) SmolLM2-135M-Instruct; + EfficientNet-Lite0 (frozen) + MLP projector -> an AR VLM
              (compose.py), wrapped with the mask token so every stage is a diffusionvl checkpoint
  stage1      projector alignment: AR loss, projector only (off by default)
  recognition AR loss on the one-object scenes (tiny LM: full weights; smollm2: LoRA + projector)
  stage2      AR instruction tuning on the main data, from the recognition stage (the binding stage)
  refresh     (with a recognition stage) one epoch at most over the one-object scenes with main images replayed, at a
              third of the learning rate, ending as soon as every one-object type is back at --recognition-target
              (at its first eval when the binding stage kept them all) -> the AR VLM (the parent)
  translate   AR VLM -> diffusion VLM: BD3 loss, LoRA on the LM, with `diffusion_fraction` of stage 2's images
All training stages pack each image's questions into one row of isolated segments (train/packing.py), average
losses per question (`loss_norm`), and log the grounding curves (image dependence, accuracy per type on held-out
validation questions) every `eval_every` steps; a parent stage that still ignores the images after
`grounding_patience_s` stops with one line.
  direct      (optional) AR LM -> diffusion VLM directly: BD3 loss from the stage-1 model on stage 2's data
  eval        AR VLM vs diffusion VLM on the held-out test split: accuracy, tokens/forward, tokens/s for the
              ar / static / threshold (several tau) / full decoders -> results.json, results.md, a plot
  export      the compact weights the embedded default needs (projector + LoRA adapters, fp16) -> `export_to`
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable

from diffusionvl.core.atomic import write_file, write_json, write_text
from diffusionvl.core.errors import check
from diffusionvl.recipes.curves import (REPLAY, STAGES, curriculum, curriculum_markdown, grounding_points, is_replay,
                                        plot_grounding)
from diffusionvl.recipes.tiny_model import TinyVLMConfig, build_init, tower_candidate


MAX_LENGTH = 320  # tokens per training sample (about 215 with 8 turns)


def _say(msg: str) -> None:
    print(f"[tiny-vlm {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _subset(src: Path, dst: Path, n: int) -> Path:
    """The first n records of a LLaVA JSON list (the generator's order is already random), written atomically."""
    return write_json(dst, json.loads(src.read_text())[:n])


# ---------------------------------------------------------------------------------------------------- stages
RECOGNITION_MIX = {"shape": 4.0, "colour": 4.0, "position": 1.0, "exist": 1.0}  # shape and colour first: a
# later "is there a red circle?" would leak both answers and filter them out


def stage_data(cfg: TinyVLMConfig, out: Path, name: str = "data", n_train: int | None = None,
               max_objects: int = 4, task_mix: dict[str, float] | None = None, seed_offset: int = 0) -> Path:
    from diffusionvl.data import generate_dataset

    folder = out / name
    n_train = cfg.n_train if n_train is None else n_train
    if not (folder / "summary.json").is_file():
        _say(f"{name}: generating {n_train} train / {cfg.n_val} val / {cfg.n_test} test images")
        generate_dataset(folder, n_train=n_train, n_val=cfg.n_val, n_test=cfg.n_test, seed=cfg.seed + seed_offset,
                         image_size=cfg.image_size, progress=cfg.progress, task_mix=task_mix or cfg.task_mix,
                         real_images=False, multi_turn_fraction=1.0, questions_per_image=cfg.questions_per_image,
                         overwrite=True, max_objects=max_objects)
    return folder


# ChatML as SmolLM2 writes it, without the default system prompt its template injects into every conversation that
# has none (20 tokens per sample the model would pay for nothing).
def stage_gate(cfg: TinyVLMConfig, out: Path) -> dict[str, Any]:
    """Linear probes on the frozen tower's tokens before any LM training (recipes/vision_gate.py)."""
    from diffusionvl.core.errors import DiffusionVLError
    from diffusionvl.recipes.vision_gate import gate_markdown, run_gate

    folder = out / "gate"
    if not (folder / "gate.json").is_file():
        _say(f"vision gate: linear probes on {cfg.gate_scenes} synthetic scenes")
        rows = run_gate([tower_candidate(cfg)], n_scenes=cfg.gate_scenes, seed=cfg.seed, image_size=cfg.image_size,
                        progress=cfg.progress)
        write_text(folder / "gate.md", gate_markdown(rows, cfg.gate_scenes))
        write_json(folder / "gate.json", rows)  # last: its presence marks the stage done
    row = json.loads((folder / "gate.json").read_text())[0]
    _say("vision gate:\n" + (folder / "gate.md").read_text())
    if cfg.gate_strict and not row["passed"]:
        raise DiffusionVLError(f"the vision tower fails the gate ({folder / 'gate.md'}): change --vision-stages / "
                               "--vision-pooling / --pool, or pass --gate-strict false to train anyway")
    return row


def stage_init(cfg: TinyVLMConfig, out: Path) -> Path:
    from diffusionvl.model.modeling import save_atomic

    path = out / "init"
    if not (path / "diffusionvl.json").is_file():
        lm = "SmolLM2-135M-Instruct" if cfg.lm == "smollm2" else f"a {cfg.lm_layers}-layer, {cfg.lm_width}-wide LM"
        _say(f"composing {lm} + EfficientNet-Lite0 + projector")
        save_atomic(build_init(cfg), path)
    return path


def _train(cfg: TinyVLMConfig, name: str, out: Path, model: Path, data: Path, val: Path, **kw: Any) -> Path:
    """One training stage; `val` (a data folder's val.json) gives its eval loss and, through the val.jsonl beside
    it, the held-out questions its grounding curves, target and plateau watch."""
    from diffusionvl.jobs.train import TrainConfig, train

    final = out / name / "final"
    if (final / "diffusionvl.json").is_file():
        return final
    _say(f"stage {name}: {kw.get('objective', 'bd3')} objective on {data.parent.name}/{data.name}")
    kw.setdefault("image_folder", str(data.parent))
    tc = TrainConfig(model=str(model), data=str(data), output=str(out / name), eval_data=str(val), seed=cfg.seed,
                     token_cache=str(out / "tower_tokens.pt"), batch_size=cfg.batch_size, num_workers=1,
                     save_every=100, keep_checkpoints=1, log_every=10, progress=cfg.progress, tensorboard=False,
                     resume="auto", max_length=MAX_LENGTH, warmup_ratio=0.05, packing=True,
                     grounding_data=str(val.parent / "val.jsonl"), eval_every=cfg.eval_every,
                     adam_beta2=cfg.adam_beta2, **kw)
    summary = train(tc)
    _say(f"stage {name} done: "
         f"{json.dumps({k: summary.get(k) for k in ('steps', 'eval_loss', 'tokens_per_s', 'stopped')})}")
    return final


def _lora(cfg: TinyVLMConfig, **kw: Any) -> dict[str, Any]:
    return dict(lora=True, lora_r=cfg.lora_r, lora_alpha=2.0 * cfg.lora_r, lora_dropout=0.0, lr=cfg.lr, **kw)


def _parent(cfg: TinyVLMConfig) -> dict[str, Any]:
    """How the AR parent stages train: the tiny LM in full (vision frozen), SmolLM2 with LoRA + projector."""
    watch = dict(objective="ar", loss_norm=cfg.loss_norm, min_image_dependence=cfg.min_image_dependence,
                 grounding_patience_s=cfg.grounding_patience_s, plateau_s=cfg.stage_plateau_s)
    if cfg.lm == "tiny":
        return dict(lr=cfg.lr_full, freeze=["vision"], **watch)
    return dict(lr_projector=cfg.lr_projector, **_lora(cfg, lora_modules_to_save=["projector"]), **watch)


def binding_data(cfg: TinyVLMConfig, data: Path, rec: Path | None) -> Path:
    """data/stage2.json: the binding stage's records, the main data's first `ar_samples` plus the first
    `recognition_replay` recognition records (image paths made relative to the main data folder)."""
    records = json.loads((data / "train.json").read_text())[: cfg.ar_samples]
    if rec is not None:
        records += replayed(rec, data, cfg.recognition_replay)
    return write_json(data / "stage2.json", records)


def replayed(source: Path, dest: Path, n: int) -> list[dict[str, Any]]:
    """The first n training records of the data folder `source`, marked as replayed, their image paths made
    relative to the folder `dest` whose file will hold them."""
    return [{**r, "id": REPLAY + str(r["id"]), "image": os.path.relpath(source / r["image"], dest)}
            for r in json.loads((source / "train.json").read_text())[:n]]


def refresh_data(cfg: TinyVLMConfig, data: Path, rec: Path) -> Path:
    """data-recognition/refresh.json: every recognition record, with the main data's first `recognition_replay`
    records replayed (image paths made relative to the recognition folder) so binding is kept."""
    records = json.loads((rec / "train.json").read_text()) + replayed(data, rec, cfg.recognition_replay)
    return write_json(rec / "refresh.json", records)


def binding_epochs(cfg: TinyVLMConfig, data: Path) -> int:
    """Epochs of the binding stage: --stage2-epochs, or enough for --binding-presentations binding questions."""
    if cfg.stage2_epochs:
        return cfg.stage2_epochs
    summary = json.loads((data / "summary.json").read_text())
    per_epoch = summary.get("binding", {}).get("train", 0) * cfg.ar_samples / max(cfg.n_train, 1)
    check(per_epoch > 0, f"the main data ({data}) counts no binding questions (made before they were counted, or "
                         "a --task-mix without shape and colour): regenerate it or give --stage2-epochs")
    return max(1, math.ceil(cfg.binding_presentations / per_epoch))


def translation_data(cfg: TinyVLMConfig, data: Path) -> Path:
    """data/translate.json: `diffusion_fraction` of the binding stage's main records and of its replayed ones."""
    records = json.loads((data / "stage2.json").read_text())
    replay = [r for r in records if is_replay(r)]
    main = [r for r in records if not is_replay(r)]
    n_diff = max(1, int(cfg.diffusion_fraction * len(main)))
    return write_json(data / "translate.json", main[:n_diff] + replay[: int(cfg.diffusion_fraction * len(replay))])


def run_stages(cfg: TinyVLMConfig) -> dict[str, Path]:
    out = Path(cfg.out)
    data = stage_data(cfg, out)
    val = data / "val.json"
    stage_gate(cfg, out)
    init = stage_init(cfg, out)
    s1, rec, ar_stages = init, None, []
    if cfg.stage1_samples:
        stage1_data = _subset(data / "train.json", data / "stage1.json", cfg.stage1_samples)
        s1 = _train(cfg, "stage1", out, init, stage1_data, val, objective="ar", lr=cfg.stage1_lr,
                    freeze=["vision", "language"], epochs=1)
    if cfg.recognition_images:
        rec = stage_data(cfg, out, "data-recognition", cfg.recognition_images, max_objects=1,
                         task_mix=RECOGNITION_MIX, seed_offset=1)
        s1 = _train(cfg, "recognition", out, s1, rec / "train.json", rec / "val.json", epochs=cfg.recognition_epochs,
                    target_accuracy=cfg.recognition_target, grounding_samples=200, **_parent(cfg))
        ar_stages.append(s1)
    epochs = binding_epochs(cfg, data)
    _say(f"binding stage: {epochs} epoch(s) over {cfg.ar_samples} images for {cfg.binding_presentations:,} binding "
         f"questions, with {cfg.recognition_replay if rec else 0} recognition images replayed")
    s2 = _train(cfg, "stage2", out, s1, binding_data(cfg, data, rec), val, epochs=epochs, **_parent(cfg))
    ar_stages.append(s2)
    if rec is not None:  # the floor is read on one-object scenes: restore any type the binding stage let slip
        gentle = {k: v / 3 for k, v in _parent(cfg).items() if k in ("lr", "lr_projector")}
        s2 = _train(cfg, "refresh", out, s2, refresh_data(cfg, data, rec), rec / "val.json", epochs=1,
                    target_accuracy=cfg.recognition_target, grounding_samples=200, **{**_parent(cfg), **gentle})
        ar_stages.append(s2)
    diff_data = translation_data(cfg, data)
    tr = _train(cfg, "translate", out, s2, diff_data, val, objective="bd3", epochs=cfg.diffusion_epochs,
                loss_norm=cfg.loss_norm, **_lora(cfg))
    paths = {"data": data, "stage1": s1, "ar_vlm": s2, "dvlm": tr, **({"data_recognition": rec} if rec else {}),
             **{f"ar_stage{i}": p for i, p in enumerate(ar_stages)}}  # every AR stage's final, in order
    if cfg.direct:
        direct_data = _subset(data / "train.json", data / "direct.json", cfg.ar_samples)  # the binding stage's
        if cfg.direct_samples is not None:
            direct_data = _subset(data / "train.json", data / "direct.json", cfg.direct_samples)
        paths["direct"] = _train(cfg, "direct", out, s1, direct_data, val, objective="bd3", loss_norm=cfg.loss_norm,
                                 epochs=cfg.direct_epochs, **_lora(cfg, lora_modules_to_save=["projector"]))
    return paths


# ------------------------------------------------------------------------------------------------------ eval
AR_LABEL, DVLM_LABEL = "AR VLM (parent)", "diffusion VLM (translated)"
BAR_TYPES = ("shape", "colour", "count", "position", "exist", "relation")


def decoder_grid(cfg: TinyVLMConfig) -> list[dict[str, Any]]:
    """Decoding settings of the short-answer table: static at S = B and B/2, threshold at each tau, (full)."""
    b = cfg.block_size
    grid = [dict(decoder="block", policy="static", steps=b), dict(decoder="block", policy="static", steps=max(1, b // 2))]
    grid += [dict(decoder="block", policy="threshold", steps=b, threshold=t) for t in cfg.thresholds]
    if cfg.full_baseline:
        grid += [dict(decoder="full", policy="static", steps=b)]
    return grid


def description_grid(cfg: TinyVLMConfig) -> list[tuple[str, dict[str, Any], int]]:
    """(model label, decoding, batch) of the description speed table: the parent's AR decoding against the
    diffusion model's static and threshold decoding, at batch 1 (the latency case) and batch 8."""
    b = cfg.block_size
    rows = [(AR_LABEL, dict(decoder="ar"), 1), (DVLM_LABEL, dict(decoder="block", policy="static", steps=b), 1)]
    rows += [(DVLM_LABEL, dict(decoder="block", policy="threshold", steps=b, threshold=t), 1) for t in cfg.thresholds]
    rows += [(AR_LABEL, dict(decoder="ar"), 8)]
    rows += [(DVLM_LABEL, dict(decoder="block", policy="threshold", steps=b, threshold=t), 8) for t in cfg.thresholds]
    return rows


def _evaluate(model: Any, samples: list[Any], task: Any, decode: dict[str, Any], batch: int, max_new: int,
              progress: bool) -> dict[str, Any]:
    from diffusionvl.core.config import DecodeConfig
    from diffusionvl.jobs.evaluation.runner import EvalConfig, evaluate

    ecfg = EvalConfig(task="synth-vqa", batch_size=batch).validate()
    summary, _ = evaluate(model, samples, task, ecfg, DecodeConfig(max_new_tokens=max_new, **decode), progress=progress)
    sp = summary["speed"]
    return {"samples": summary["samples"], "tokens_per_forward": sp["tokens_per_forward"],
            "tokens_per_second": sp["tokens_per_second"], "batch": batch, **decode, "_summary": summary}


def evaluate_short(model: Any, samples: list[Any], task: Any, decode: dict[str, Any], cfg: TinyVLMConfig) -> dict:
    row = _evaluate(model, samples, task, decode, 16, 16, cfg.progress)
    summary = row.pop("_summary")
    return {**row, "accuracy": summary["accuracy"],
            "per_type": {k: v["accuracy"] for k, v in summary["per_type"].items()}}


def evaluate_description(model: Any, samples: list[Any], task: Any, decode: dict[str, Any], batch: int,
                         cfg: TinyVLMConfig) -> dict:
    row = _evaluate(model, samples, task, decode, batch, cfg.describe_tokens, cfg.progress)
    desc = row.pop("_summary")["description"] or {}
    return {**row, **{k: desc.get(k) for k in ("f1", "precision", "recall", "truncated")}}


def test_samples(cfg: TinyVLMConfig, data: Path) -> tuple[Any, list[Any], list[Any]]:
    """(task, short-answer samples, describe samples) of the held-out test split (`eval_limit` caps each list)."""
    from diffusionvl.jobs.evaluation.runner import EvalConfig, load_samples

    task, samples = load_samples(EvalConfig(task="synth-vqa", data=str(data)).validate())
    short = [s for s in samples if s.type != "describe"][: cfg.eval_limit]
    describe = [s for s in samples if s.type == "describe"][: cfg.describe_limit]
    return task, short, describe


def run_eval(cfg: TinyVLMConfig, paths: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    from diffusionvl.model.conversion import load

    task, short, describe = test_samples(cfg, paths["data"])
    rows, desc_rows = [], []
    cases: list[tuple[str, Path, list[dict[str, Any]]]] = [(AR_LABEL, paths["ar_vlm"], [dict(decoder="ar")]),
                                                          (DVLM_LABEL, paths["dvlm"],
                                                           [dict(decoder="ar")] + decoder_grid(cfg))]
    if "direct" in paths:
        cases.append(("diffusion VLM (direct from AR LM)", paths["direct"], decoder_grid(cfg)[:3]))
    models = {}
    for label, path, grid in cases:
        model = models[label] = load(path, device="cpu")
        for decode in grid:
            row = {"model": label, **evaluate_short(model, short, task, decode, cfg)}
            _say(f"{label} {decode}: accuracy {row['accuracy']:.3f}, {row['tokens_per_forward']:.2f} tok/fwd, "
                 f"{row['tokens_per_second']:.1f} tok/s")
            rows.append(row)
    one = []
    if paths.get("data_recognition") is not None:  # the floor: one-object scenes of the recognition split
        _, one_short, _ = test_samples(cfg, paths["data_recognition"])
        for label, grid in ((AR_LABEL, [dict(decoder="ar")]), (DVLM_LABEL, decoder_grid(cfg)[2:])):
            for decode in grid:
                row = {"model": label, **evaluate_short(models[label], one_short, task, decode, cfg)}
                _say(f"one-object, {label} {decode}: accuracy {row['accuracy']:.3f}, per type {row['per_type']}")
                one.append(row)
    for label, decode, batch in description_grid(cfg) if describe else []:
        row = {"model": label, **evaluate_description(models[label], describe, task, decode, batch, cfg)}
        _say(f"descriptions, {label} {decode} batch {batch}: F1 {row['f1']:.3f}, {row['tokens_per_forward']:.2f} "
             f"tok/fwd, {row['tokens_per_second']:.1f} tok/s")
        desc_rows.append(row)
    return {"rows": rows, "description": desc_rows, "one_object": one}


def _decoder_label(row: dict[str, Any]) -> str:
    if row["decoder"] != "block":
        return row["decoder"] + (f" (B={row.get('steps')})" if row["decoder"] == "full" else "")
    tail = f", tau={row['threshold']:g}" if row["policy"] == "threshold" else ""
    return f"block {row['policy']} S={row['steps']}{tail}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def check_bars(rows: list[dict[str, Any]], desc: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The recipe's targets, each with its measured value and pass/fail: the AR parent >= 85% over the short-answer
    types; threshold decoding >= 95% of the parent overall and per type (best tau that holds overall); description
    F1 >= 0.85, >= 2.5 tokens/forward and >= 1.5x the parent's tokens/s at batch 1."""
    parent = next((r for r in rows if r["model"] == AR_LABEL), None)
    thr = [r for r in rows if r["model"] == DVLM_LABEL and r.get("policy") == "threshold" and r["decoder"] == "block"]
    if parent is None or not thr:
        return []
    best = max(thr, key=lambda r: (r["accuracy"] >= 0.95 * parent["accuracy"], r["tokens_per_forward"]))
    bars = [{"what": "AR parent accuracy", "value": parent["accuracy"], "target": ">= 85%",
             "ok": parent["accuracy"] >= 0.85},
            {"what": f"threshold tau={best['threshold']:g} / parent, overall", "value": best["accuracy"] /
             max(parent["accuracy"], 1e-9), "target": ">= 95%", "ok": best["accuracy"] >= 0.95 * parent["accuracy"]}]
    for t in BAR_TYPES:
        if t in parent["per_type"]:
            ratio = best["per_type"].get(t, 0.0) / max(parent["per_type"][t], 1e-9)
            bars.append({"what": f"threshold tau={best['threshold']:g} / parent, {t}", "value": ratio,
                         "target": ">= 95%", "ok": ratio >= 0.95})
    ar1 = next((r for r in desc if r["model"] == AR_LABEL and r["batch"] == 1), None)
    d1 = [r for r in desc if r["model"] == DVLM_LABEL and r["batch"] == 1 and r.get("policy") == "threshold"]
    if ar1 and d1:
        fast = max(d1, key=lambda r: (r["f1"] >= 0.85, r["tokens_per_second"]))
        tag = f"descriptions, threshold tau={fast['threshold']:g}, batch 1"
        bars += [{"what": f"{tag}: F1", "value": fast["f1"], "target": ">= 0.85", "ok": fast["f1"] >= 0.85, "raw": True},
                 {"what": f"{tag}: tokens/forward", "value": fast["tokens_per_forward"], "target": ">= 2.5",
                  "ok": fast["tokens_per_forward"] >= 2.5, "raw": True},
                 {"what": f"{tag}: tokens/s vs parent", "value": fast["tokens_per_second"] /
                  max(ar1["tokens_per_second"], 1e-9), "target": ">= 1.5x",
                  "ok": fast["tokens_per_second"] >= 1.5 * ar1["tokens_per_second"], "raw": True}]
    return bars


FLOOR_TYPES = ("shape", "colour", "position", "exist")


def check_floor(one: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The floor a model must meet to ship, on held-out one-object scenes: the AR parent >= 90% on each of shape,
    colour, position and exist; threshold decoding (the best tau that holds) >= 95% of the parent on each."""
    parent = next((r for r in one if r["model"] == AR_LABEL), None)
    thr = [r for r in one if r["model"] == DVLM_LABEL and r.get("policy") == "threshold"]
    if parent is None or not thr:
        return []

    def worst(r: dict[str, Any]) -> float:  # the smallest per-type ratio to the parent
        return min(r["per_type"].get(t, 0.0) / max(parent["per_type"].get(t, 0.0), 1e-9) for t in FLOOR_TYPES)

    # the fastest tau that holds; when none does, the closest one
    best = max(thr, key=lambda r: (worst(r) >= 0.95, r["tokens_per_forward"] if worst(r) >= 0.95 else worst(r)))
    bars = [{"what": f"one-object: AR parent, {t}", "value": parent["per_type"].get(t, 0.0), "target": ">= 90%",
             "ok": parent["per_type"].get(t, 0.0) >= 0.90} for t in FLOOR_TYPES]
    for t in FLOOR_TYPES:
        ratio = best["per_type"].get(t, 0.0) / max(parent["per_type"].get(t, 0.0), 1e-9)
        bars.append({"what": f"one-object: threshold tau={best['threshold']:g} / parent, {t}", "value": ratio,
                     "target": ">= 95%", "ok": ratio >= 0.95})
    return bars


def floor_met(one: list[dict[str, Any]]) -> bool:
    bars = check_floor(one)
    return bool(bars) and all(b["ok"] for b in bars)


def _bar_value(bar: dict[str, Any]) -> str:
    """A target's measured value: a plain number ("raw": F1, tokens/forward, a speed ratio) or a percentage."""
    return f"{bar['value']:.2f}" if bar.get("raw") else _pct(bar["value"])


def _stage_lines(stages: dict[str, dict[str, Any]]) -> list[str]:
    lines = ["", "Training stages (wall time on this machine):", "",
             "| stage | objective | samples | steps | wall time | samples/s | tokens/s |", "|---|---|---|---|---|---|---|"]
    for name, st in stages.items():
        samples = st["steps"] * st["global_batch"]
        lines.append(f"| {name} | {st.get('objective', '')} | {samples} | {st['steps']} | {st['seconds'] / 60:.1f} min "
                     f"| {samples / max(st['seconds'], 1e-9):.2f} | {st.get('tokens_per_s') or 0:.0f} |")
    return lines


def results_markdown(cfg: TinyVLMConfig, rows: list[dict[str, Any]], facts: dict[str, Any],
                     desc: list[dict[str, Any]] | None = None, stages: dict[str, dict[str, Any]] | None = None,
                     one: list[dict[str, Any]] | None = None) -> str:
    desc, one = desc or [], one or []
    lines = ["# tiny-VLM recipe results", "",
             f"Held-out test questions: {rows[0]['samples']}. AR instruction tuning used {facts['n_ar']} samples; the "
             f"translation to diffusion used {facts['n_diffusion']} of them ({100 * facts['fraction']:.1f}%). "
             f"Block size B={cfg.block_size}. CPU timings ({facts['threads']} threads). Tokens/forward: generated "
             "tokens up to and including the stop token / forwards, per sample, averaged.", "",
             "| model | decoder | accuracy | tokens/forward | tokens/s |", "|---|---|---|---|---|"]
    if any("direct" in r["model"] for r in rows):
        lines[2] += (f" The direct path (AR LM -> diffusion VLM, from the stage 1 projector) trained on "
                     f"{facts.get('n_direct')} samples x {cfg.direct_epochs} epochs.")
    lines += [f"| {r['model']} | {_decoder_label(r)} | {_pct(r['accuracy'])} | {r['tokens_per_forward']:.2f} "
              f"| {r['tokens_per_second']:.1f} |" for r in rows]
    types = sorted({t for r in rows for t in r["per_type"]})
    lines += ["", "Accuracy per question type:", "", "| model | decoder | " + " | ".join(types) + " |",
              "|---|---|" + "---|" * len(types)]
    lines += [f"| {r['model']} | {_decoder_label(r)} | " + " | ".join(f"{100 * r['per_type'].get(t, 0):.0f}%"
                                                                      for t in types) + " |" for r in rows]
    if desc:
        lines += ["", f"Descriptions (\"Describe the image.\", {desc[0]['samples']} held-out scenes, object-level F1, "
                  f"at most {cfg.describe_tokens} new tokens):", "",
                  "| model | decoder | batch | F1 | precision | recall | tokens/forward | tokens/s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['model']} | {_decoder_label(r)} | {r['batch']} | {r['f1']:.3f} | {r['precision']:.3f} | "
                  f"{r['recall']:.3f} | {r['tokens_per_forward']:.2f} | {r['tokens_per_second']:.1f} |" for r in desc]
    if one:
        types = sorted({t for r in one for t in r["per_type"]})
        lines += ["", f"One-object scenes (the recognition data's held-out test split, {one[0]['samples']} questions):",
                  "", "| model | decoder | accuracy | " + " | ".join(types) + " | tokens/forward |",
                  "|---|---|---|" + "---|" * len(types) + "---|"]
        lines += [f"| {r['model']} | {_decoder_label(r)} | {_pct(r['accuracy'])} | "
                  + " | ".join(f"{100 * r['per_type'].get(t, 0):.0f}%" for t in types)
                  + f" | {r['tokens_per_forward']:.2f} |" for r in one]
        floor = check_floor(one)
        lines += ["", f"Floor to ship ({'met' if floor_met(one) else 'NOT met'}):", "", "| target | measured | bar | met |",
                  "|---|---|---|---|"]
        lines += [f"| {b['what']} | {_bar_value(b)} | {b['target']} | {'yes' if b['ok'] else 'NO'} |" for b in floor]
    if stages:
        lines += _stage_lines(stages)
    bars = check_bars(rows, desc)
    if bars:
        lines += ["", "Targets:", "", "| target | measured | bar | met |", "|---|---|---|---|"]
        lines += [f"| {b['what']} | {_bar_value(b)} | {b['target']} | {'yes' if b['ok'] else 'NO'} |" for b in bars]
    return "\n".join(lines) + "\n"


def plot_threshold_curve(rows: list[dict[str, Any]], path: Path,
                         desc: list[dict[str, Any]] | None = None) -> Path | None:
    """Left: accuracy vs tokens per forward across thresholds (static / AR points for reference). Right (when
    descriptions were evaluated): description F1 vs tokens/s at batch 1, AR parent vs diffusion decoders."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2 if desc else 1, figsize=(11 if desc else 6, 4), squeeze=False)
    _accuracy_panel(axes[0][0], rows)
    if desc:
        _description_panel(axes[0][1], desc)
    try:
        write_file(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def _accuracy_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    translated = [r for r in rows if r["model"] == DVLM_LABEL]

    def block(policy: str) -> list[dict[str, Any]]:
        return [r for r in translated if r["decoder"] == "block" and r["policy"] == policy]

    series = [("diffusion VLM, threshold", block("threshold"), "o-"), ("diffusion VLM, static", block("static"), "s"),
              ("diffusion VLM, full", [r for r in translated if r["decoder"] == "full"], "x"),
              ("diffusion VLM, AR decoding", [r for r in translated if r["decoder"] == "ar"], "v"),
              (AR_LABEL, [r for r in rows if r["model"] == AR_LABEL], "^")]
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
    ax.set_ylabel("accuracy on held-out short answers (%)")
    ax.set_title("tiny-VLM: accuracy vs parallelism")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def _description_panel(ax: Any, desc: list[dict[str, Any]]) -> None:
    for r in (r for r in desc if r["batch"] == 1):
        marker = "^" if r["model"] == AR_LABEL else "o"
        ax.plot([r["tokens_per_second"]], [r["f1"]], marker, label=f"{'AR parent' if marker == '^' else 'dVLM'} "
                                                                  f"{_decoder_label(r)}")
    ax.set_xlabel("tokens/s (batch 1, CPU)")
    ax.set_ylabel("description F1")
    ax.set_title("descriptions: quality vs speed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def stage_summaries(out: Path) -> dict[str, dict[str, Any]]:
    """Each finished training stage's summary.json (steps, batch, wall seconds, tokens/s), in recipe order."""
    found = {}
    for name in STAGES:
        path = out / name / "summary.json"
        if path.is_file():
            summary = json.loads(path.read_text())
            log = out / name / "log.jsonl"
            start = json.loads(log.read_text().splitlines()[0]) if log.is_file() else {}
            summary["objective"] = start.get("config", {}).get("objective", "")
            found[name] = summary
    return found


def write_results(cfg: TinyVLMConfig, rows: list[dict[str, Any]], out: Path,
                  desc: list[dict[str, Any]] | None = None, one: list[dict[str, Any]] | None = None) -> dict[str, Path]:
    import torch

    n_diff = max(1, int(cfg.diffusion_fraction * cfg.ar_samples))
    stages = stage_summaries(out)
    shown = stages.get("stage2", {})  # samples the binding stage trained on (it may end early on its plateau)
    n_ar = shown["steps"] * shown["global_batch"] if shown else cfg.ar_samples * (cfg.stage2_epochs or 1)
    facts = {"n_ar": n_ar, "n_diffusion": n_diff, "fraction": n_diff / cfg.ar_samples,
             "n_direct": min(cfg.direct_samples or cfg.ar_samples, cfg.n_train), "threads": torch.get_num_threads()}
    taught = curriculum(cfg, out)
    points = grounding_points(out)
    payload = {"config": dataclasses.asdict(cfg), "facts": facts, "rows": rows, "description": desc or [],
               "stages": {k: {f: v.get(f) for f in ("steps", "global_batch", "seconds", "tokens_per_s", "objective")}
                          for k, v in stages.items()}, "targets": check_bars(rows, desc or []),
               "one_object": one or [], "floor": check_floor(one or []), "floor_met": floor_met(one or []),
               "curriculum": taught, "grounding": points}
    paths = {"json": out / "results.json", "markdown": out / "results.md", "plot": out / "accuracy_vs_parallelism.png",
             "grounding": out / "grounding_curves.png"}
    write_json(paths["json"], payload)
    write_text(paths["markdown"], results_markdown(cfg, rows, facts, desc, stages, one) +
               "\n".join(curriculum_markdown(taught)) + "\n")
    plot_threshold_curve(rows, paths["plot"], desc)
    plot_grounding(points, paths["grounding"])
    return paths


def check_early(cfg: TinyVLMConfig) -> None:
    """Options that would only fail after minutes of data generation and probing fail now, in one line: the tower
    spec (stages, pooling) is built, the task mix normalized, the block size checked against the sample length."""
    from diffusionvl.data.synth import normalize_task_mix
    from diffusionvl.recipes.vision_gate import candidate_tower

    check(cfg.block_size <= MAX_LENGTH, f"block_size {cfg.block_size} is longer than the recipe's training samples "
                                        f"({MAX_LENGTH} tokens at most); 8 is the recipe's choice")
    normalize_task_mix(cfg.task_mix)
    candidate_tower(tower_candidate(cfg))


def run_recipe(cfg: TinyVLMConfig, stages: Callable[[TinyVLMConfig], dict[str, Path]] = run_stages) -> dict[str, Any]:
    import torch

    cfg.validate()
    check_early(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.gate_only:
        stage_gate(cfg, Path(cfg.out))
        return {"paths": {}, "results": {"markdown": str(Path(cfg.out) / "gate" / "gate.md")}}
    paths = stages(cfg)
    results = run_eval(cfg, paths)
    written = write_results(cfg, results["rows"], Path(cfg.out), results["description"], results["one_object"])
    _say(Path(written["markdown"]).read_text())
    if cfg.export_to:
        from diffusionvl.recipes.default import export_default

        export_default(paths, Path(cfg.export_to), cfg, json.loads(Path(written["json"]).read_text()))
    return {"paths": {k: str(v) for k, v in paths.items()}, "results": {k: str(v) for k, v in written.items()}}
