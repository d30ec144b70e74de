"""Pipeline or task? The smallest PyTorch loop over the same data, tokens and model, next to `diffusionvl train`.

When a run does not learn, this answers in minutes whether the trainer is at fault (the plain loop learns, the
trainer does not) or the task is (neither learns). Both start from the same composed tiny VLM (the tiny-VLM recipe's
`build_init`: a 4-layer, 256-wide LM with SmolLM2's tokenizer + the recipe's EfficientNet-Lite0 tower + an MLP
projector), train on the same encoded samples (the trainer's own `SampleEncoder`: same ids, same labels), read the
same cached tower tokens (the trainer's token cache file), follow the same schedule (AdamW, linear warmup over 5%,
cosine, clipping at 1.0, loss averaged over answer tokens) and are scored by the same held-out evaluation (AR greedy
decoding of test.jsonl, exact match, accuracy per question type).

The plain loop is written out below in ~40 lines: projected tower tokens scattered into the token embeddings, the
language model's decoder, the head on the answer positions only (as the trainer), cross entropy.

    python scripts/minimal_loop.py --data runs/table1 --seeds 0 1 2 --init torch normal-0.02 --trainer
    # data of the projector-init table (docs/tiny-vlm.md):
    diffusionvl data --out runs/table1 --n-train 4000 --n-val 64 --n-test 200 --no-real-images \
        --text-only-fraction 0 --multi-turn-fraction 0 --max-objects 1 --task-mix shape=1,colour=1,position=1,exist=1

Prints a table (one row per run: loop or trainer, projector init, seed, held-out accuracy per type, samples/s) and
writes it as JSON to --out/minimal_loop.json. For the loop it also reports linear probes of colour and shape on the
projector's output at init and after training (is the property still in what the language model receives?). --trainer adds, for the first init and seed, the same run through
`diffusionvl train` (TrainConfig: objective ar, freeze vision, packing, loss_norm token).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusionvl.core.atomic import write_json
from diffusionvl.core.errors import DiffusionVLError, check
from diffusionvl.jobs.train import TrainConfig, train
from diffusionvl.jobs.train.data import SampleError, read_records
from diffusionvl.jobs.train.encode import SampleEncoder
from diffusionvl.jobs.train.grounding import GroundingProbe
from diffusionvl.jobs.train.trainer import attach_token_cache
from diffusionvl.model.conversion import load
from diffusionvl.model.modeling import save_atomic
from diffusionvl.recipes.tiny_model import TinyVLMConfig, build_init

INITS = ("torch", "normal-0.02", "normal-fanin")
MAX_LENGTH = 320


def init_projector(projector: nn.Module, kind: str) -> None:
    """torch: nn.Linear's default (compose's init); normal-0.02: N(0, 0.02) weights, zero biases (compose's init
    before this was measured); normal-fanin: N(0, 1/sqrt(3 fan_in)) weights (the default's std), zero biases."""
    for layer in projector.modules():
        if isinstance(layer, nn.Linear):
            if kind == "torch":
                layer.reset_parameters()
            else:
                std = 0.02 if kind == "normal-0.02" else 1.0 / math.sqrt(3 * layer.in_features)
                nn.init.normal_(layer.weight, 0.0, std)
                nn.init.zeros_(layer.bias)


def init_folder(out: Path, kind: str, seed: int) -> Path:
    """The composed tiny VLM with the chosen projector init, saved once (both runs start from these weights)."""
    path = out / f"init-{kind}-seed{seed}"
    if not (path / "diffusionvl.json").is_file():
        model = build_init(TinyVLMConfig(seed=seed))
        torch.manual_seed(seed)
        init_projector(model.hf_model.projector, kind)
        save_atomic(model, path, overwrite=True)
    return path


def schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def object_labels(data: Path) -> dict[str, tuple[str, str]]:
    """Image id -> (colour, shape) of one-object scenes (scenes.jsonl)."""
    out = {}
    for line in (data / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        objects = row.get("scene", {}).get("objects", [])
        if len(objects) == 1:
            out[row["id"]] = (objects[0]["colour"], objects[0]["shape"])
    return out


@torch.no_grad()
def projector_probe(projector: nn.Module, tokens: torch.Tensor, labels: list[str]) -> float:
    """Held-out accuracy of a ridge-regression probe that reads `labels` from the projector's output (each image's
    visual tokens mean- and max-pooled, standardized; 70% fit, 30% held out): is the property still in what the
    language model receives?"""
    feats = projector(tokens)  # [N, T, D]
    x = torch.cat([feats.mean(1), feats.amax(1)], dim=1).double()
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    classes = sorted(set(labels))
    y = torch.zeros(len(labels), len(classes), dtype=torch.float64)
    y[torch.arange(len(labels)), torch.tensor([classes.index(v) for v in labels])] = 1.0
    cut = int(0.7 * len(labels))
    a = x[:cut]
    w = torch.linalg.solve(a.T @ a + 10.0 * torch.eye(a.shape[1], dtype=a.dtype), a.T @ y[:cut])
    return float(((x[cut:] @ w).argmax(1) == y[cut:].argmax(1)).double().mean())


def plain_loop(model_dir: Path, train_file: Path, cache: Path, args: argparse.Namespace, seed: int) -> dict:
    """The loop itself: returns samples/s and the trained model."""
    model = load(model_dir, device="cpu", dtype="float32")
    hf = model.hf_model
    for p in hf.vision_tower.parameters():  # frozen, as the trainer's --freeze vision
        p.requires_grad_(False)
    token_cache = attach_token_cache(model, str(cache))
    encoder = SampleEncoder(model, MAX_LENGTH, objective="ar")
    records, report = read_records(train_file, train_file.parent)
    check(len(records) == len(json.loads(train_file.read_text())),
          f"the minimal loop needs every record of {train_file} usable ({report.summary()})")
    check(all(r.images for r in records), "the minimal loop needs an image in every record")
    samples, tokens = [], []
    with torch.no_grad():  # the frozen tower's tokens, once per image (read from / added to the shared cache)
        for start in range(0, len(records), 256):
            chunk = [encoder(r) for r in records[start:start + 256]]
            tokens.append(hf.vision_tower(torch.cat([s.vision.pop("pixel_values") for s in chunk])))
            samples += chunk
    tower = torch.cat(tokens)  # [N, T, C]
    token_cache.save()
    named = object_labels(train_file.parent)
    image_ids = [str(r.get("id")) for r in json.loads(train_file.read_text())]
    probe_rows = [i for i, k in enumerate(image_ids[: len(samples)]) if k in named][:2000]
    probes: dict[str, float] = {}

    def probe(when: str) -> None:
        for j, name in enumerate(("colour", "shape")):
            if len(probe_rows) >= 50:
                probes[f"probe_{name}_{when}"] = projector_probe(hf.projector, tower[probe_rows],
                                                                 [named[image_ids[i]][j] for i in probe_rows])

    probe("init")
    hf.train()
    params = [p for n, p in hf.named_parameters() if not n.startswith("vision_tower.")]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.beta2), weight_decay=0.0)
    steps_per_epoch = len(samples) // args.batch
    total = args.epochs * steps_per_epoch
    warmup = max(1, int(0.05 * total))
    lm, image_id = hf.language_model, hf.config.image_token_id
    gen = torch.Generator().manual_seed(seed)
    step, timed, t_start = 0, 0, time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(samples), generator=gen)
        for b in range(steps_per_epoch):
            idx = order[b * args.batch:(b + 1) * args.batch].tolist()
            length = max(len(samples[i].input_ids) for i in idx)
            ids = torch.full((len(idx), length), model.tokenizer.pad_token_id or 0)
            labels = torch.full((len(idx), length), -100)
            attn = torch.zeros((len(idx), length), dtype=torch.long)
            for row, i in enumerate(idx):  # right padding
                n = len(samples[i].input_ids)
                ids[row, :n], labels[row, :n], attn[row, :n] = samples[i].input_ids, samples[i].labels, 1
            for g in optimizer.param_groups:
                g["lr"] = args.lr * schedule(step, total, warmup)
            embeds = lm.get_input_embeddings()(ids)
            visual = hf.projector(tower[idx])  # [B, T, D]
            embeds = embeds.masked_scatter((ids == image_id).unsqueeze(-1), visual.to(embeds.dtype))
            hidden = lm.model(inputs_embeds=embeds, attention_mask=attn).last_hidden_state
            where = (labels[:, 1:] != -100).nonzero()
            logits = lm.lm_head(hidden[where[:, 0], where[:, 1]])
            loss = F.cross_entropy(logits.float(), labels[where[:, 0], where[:, 1] + 1])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == 10:  # the first steps warm up allocators and threads: not timed
                t_start, timed = time.perf_counter(), 0
            else:
                timed += len(idx)
            if step % 50 == 0:
                print(f"  loop step {step}/{total}: loss {loss.item():.4f}", flush=True)
    speed = timed / max(time.perf_counter() - t_start, 1e-9)
    hf.eval()
    probe("end")
    return {"model": model, "samples_per_s": speed, **probes}


def trainer_run(model_dir: Path, train_file: Path, cache: Path, out: Path, args: argparse.Namespace,
                seed: int) -> dict:
    cfg = TrainConfig(model=str(model_dir), data=str(train_file), output=str(out), overwrite=True, objective="ar",
                      lr=args.lr, freeze=["vision"], batch_size=args.batch, epochs=args.epochs, warmup_ratio=0.05,
                      adam_beta2=args.beta2, loss_norm="token", packing=True, max_length=MAX_LENGTH, seed=seed,
                      token_cache=str(cache), num_workers=args.workers, save_every=0, eval_every=0, log_every=10,
                      progress=False, tensorboard=False)
    train(cfg)
    windows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    speeds = [w["samples_per_s"] for w in windows if "samples_per_s" in w]
    speeds = speeds[1:] or speeds  # the first window warms up
    return {"model": load(out / "final", device="cpu", dtype="float32"),
            "samples_per_s": sum(speeds) / max(len(speeds), 1)}


def score(model, probe: GroundingProbe) -> dict:
    result = probe.probe(model, "ar")
    return {k.replace("accuracy/", ""): v for k, v in result.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="a `diffusionvl data` folder (train.json, test.jsonl)")
    ap.add_argument("--out", default=None, help="where inits, trainer runs and the JSON go (default: DATA/loop)")
    ap.add_argument("--init", nargs="+", default=["torch"], choices=INITS)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta2", type=float, default=0.95)
    ap.add_argument("--trainer", action="store_true", help="also run `diffusionvl train` (first init, first seed)")
    ap.add_argument("--trainer-only", action="store_true", help="only the `diffusionvl train` run")
    ap.add_argument("--workers", type=int, default=1, help="the trainer's DataLoader workers")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = Path(args.data)
    out = Path(args.out) if args.out else data / "loop"
    out.mkdir(parents=True, exist_ok=True)
    cache, train_file = out / "tower_tokens.pt", data / "train.json"
    probe = GroundingProbe(str(data / "test.jsonl"), 10 ** 6)
    rows = []
    for kind in args.init:
        for seed in args.seeds:
            folder = init_folder(out, kind, seed)
            runs = [] if args.trainer_only else ["loop"]
            if (args.trainer or args.trainer_only) and kind == args.init[0] and seed == args.seeds[0]:
                runs.append("trainer")
            for run in runs:
                print(f"{run}, projector init {kind}, seed {seed}", flush=True)
                result = (plain_loop(folder, train_file, cache, args, seed) if run == "loop" else
                          trainer_run(folder, train_file, cache, out / f"trainer-{kind}-seed{seed}", args, seed))
                rows.append({"run": run, "init": kind, "seed": seed, "samples_per_s": result["samples_per_s"],
                             **{k: v for k, v in result.items() if k.startswith("probe_")},
                             **score(result["model"], probe)})
                print(json.dumps(rows[-1]), flush=True)
                write_json(out / "minimal_loop.json", {"args": vars(args), "rows": rows})  # kept if cut short
    types = sorted({k for r in rows for k in r if not k.startswith("probe_")}
                   - {"run", "init", "seed", "samples_per_s", "accuracy"})
    print("\n| run | projector init | seed | " + " | ".join(types) + " | all | samples/s |")
    print("|---|---|---|" + "---|" * len(types) + "---|---|")
    for r in rows:
        cells = " | ".join(f"{100 * r.get(t, 0):.0f}%" for t in types)
        print(f"| {r['run']} | {r['init']} | {r['seed']} | {cells} | {100 * r['accuracy']:.0f}% | "
              f"{r['samples_per_s']:.1f} |")
    probes = sorted({k for r in rows for k in r if k.startswith("probe_")})
    if probes:
        print("\nLinear probes on the projector's output (training images, 30% held out), at init and after training:")
        print("\n| run | projector init | seed | " + " | ".join(probes) + " |")
        print("|---|---|---|" + "---|" * len(probes))
        for r in (r for r in rows if r["run"] == "loop"):
            print(f"| {r['run']} | {r['init']} | {r['seed']} | "
                  + " | ".join(f"{100 * r[k]:.0f}%" if k in r else "-" for k in probes) + " |")
    write_json(out / "minimal_loop.json", {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (DiffusionVLError, SampleError) as exc:  # a sample the loop cannot encode: one line
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
