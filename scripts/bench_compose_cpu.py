"""CPU cost of one training step of the default composition (SmolLM2-135M + EfficientNet-Lite0, pool 4 = 16 tokens).

Measures forward + backward of a batch of 8 image+text samples (~60-70 tokens each) for the AR loss (the composed
model's own HF forward, and the engine's `ar_loss` which runs the LM head on loss rows only) and the BD3
block-diffusion loss (`DiffusionVLModel.training_loss`, [x_t ; x0] = 2L tokens), per training stage (`STAGES`:
projector only; projector + LM with the encoder frozen; everything). Prints JSON and a table (median seconds).
Needs the offline assets (`diffusionvl assets --prepare`). Usage: python scripts/bench_compose_cpu.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from PIL import Image, ImageDraw

from diffusionvl.backbone import assets
from diffusionvl.backbone.compose import compose
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.jobs.train.parts import parameter_counts, set_trainable
from diffusionvl.model.wrapping import wrap

COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"]


def batch_of(dm, n: int) -> dict:
    convs, images = [], []
    for i in range(n):
        colour = COLOURS[i % len(COLOURS)]
        img = Image.new("RGB", (256, 192), "gray")
        ImageDraw.Draw(img).rectangle([40, 40, 140, 140], fill=colour)
        msgs = [{"role": "user", "content": "What colour is the square in the picture? Answer briefly."},
                {"role": "assistant", "content": f"The square in the picture is {colour}."}]
        convs.append(to_conversation(msgs, [img]))
        images.append([img])
    texts = [dm.adapter.render(c, add_generation_prompt=False) for c in convs]
    enc = dm.adapter.tokenize(texts, images)
    width = max(len(x) for x in enc.input_ids)
    ids = torch.full((n, width), dm.pad_token_id)
    valid = torch.zeros(n, width, dtype=torch.long)
    labels = torch.full((n, width), -100)
    for i, row in enumerate(enc.input_ids):
        ids[i, : len(row)] = torch.tensor(row)
        valid[i, : len(row)] = 1
        labels[i, len(row) - 10: len(row)] = ids[i, len(row) - 10: len(row)]  # the answer's last tokens
    return {"input_ids": ids, "attention_mask": valid, "labels": labels, "pixel_values": enc.vision["pixel_values"],
            "lengths": [len(x) for x in enc.input_ids]}


def timed(step, repeats: int) -> dict[str, float]:
    """Best wall-clock and process-CPU seconds of `step` over `repeats` runs after a warm-up. On a shared machine
    the CPU seconds (all threads together) are the stable measure of the work; wall time depends on the load."""
    step()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return {"wall": min(wall), "cpu": min(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per measurement (after one warm-up)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--stages", nargs="*", default=["stage1", "stage2_frozen_tower", "stage2"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm, tok = assets.load_smollm2(progress=False)
    model, processor = compose(lm, tok, "efficientnet_lite0", pool=args.pool)
    dm = wrap(model, processor, block_size=8).train()
    batch = batch_of(dm, args.batch)
    lengths = batch.pop("lengths")
    ar_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "pixel_values")}
    results = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": os.getloadavg()[0],
               "batch": args.batch, "mean_tokens": sum(lengths) / len(lengths),
               "image_tokens": model.config.num_image_tokens, "parameters": parameter_counts(model)}
    losses = {
        "hf_ar": lambda: model(**ar_batch).loss,  # the composed model's own forward (logits at every position)
        "engine_ar": lambda: dm.ar_loss(batch).loss,  # same AR loss, LM head on the loss rows only
        "bd3": lambda: dm.training_loss(batch).loss,  # block diffusion: [x_t ; x0] = 2L tokens
    }

    def step(loss_fn):
        def run():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
        return run

    with torch.no_grad():
        results["vision_forward_s"] = timed(lambda: model.image_features(batch["pixel_values"]), args.repeats)
        results["bd3_forward_only_s"] = timed(losses["bd3"], args.repeats)
    for stage in args.stages:
        set_trainable(model, stage)
        for name, fn in losses.items():
            results[f"{name}_{stage}_s"] = timed(step(fn), args.repeats)
    results["load_average_end"] = os.getloadavg()[0]
    print(json.dumps(results, indent=2))
    print(f"forward + backward, batch {args.batch}: wall s / CPU s ({results['threads']} threads)")
    print(f"{'':<12}" + "".join(f"{s:>24}" for s in args.stages))
    for name in losses:
        cells = [results[f"{name}_{s}_s"] for s in args.stages]
        print(f"{name:<12}" + "".join(f"{c['wall']:>12.2f} / {c['cpu']:>8.2f}" for c in cells))


if __name__ == "__main__":
    main()
