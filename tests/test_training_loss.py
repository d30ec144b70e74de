"""DiffusionVLModel.training_loss: one BD3 step on a tiny model lowers the loss on a repeated batch."""

from __future__ import annotations

import pytest
import torch

from conftest import red_square, tiny_diffusion
from diffusionvl.backbone.prompts import to_conversation
from diffusionvl.core import objective


def _batch(dm, with_image: bool):
    convs = [
        [{"role": "user", "content": "What colour is the square?"}, {"role": "assistant", "content": "Red."}],
        [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello, how can I help you?"}],
    ]
    rows, labels, vision_texts, images = [], [], [], []
    for msgs in convs:
        conv = to_conversation(msgs, [red_square()] if with_image else None)
        prompt = dm.adapter.render(to_conversation(msgs[:1], conv.images or None), True)
        full = dm.adapter.render(conv, False)
        vision_texts.append(full)
        images.append(conv.images)
        if with_image:
            enc_p = dm.adapter.tokenize([prompt], [conv.images]).input_ids[0]
            enc_f = dm.adapter.tokenize([full], [conv.images]).input_ids[0]
        else:
            enc_p = dm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            enc_f = dm.tokenizer(full, add_special_tokens=False)["input_ids"]
        lab = [-100] * len(enc_p) + enc_f[len(enc_p):]
        ids, lab = objective.pad_to_block(enc_f, lab, dm.config.block_size, dm.eos_token_id)
        rows.append(ids)
        labels.append(lab)
    length = max(map(len, rows))
    batch = {
        "input_ids": torch.tensor([r + [dm.pad_token_id] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (length - len(r)) for r in labels]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
    }
    if with_image:
        enc = dm.adapter.tokenize(vision_texts, images)
        batch.update({k: enc.vision[k] for k in ("pixel_values", "image_grid_thw", "image_grid_thw_per_sample")})
    return batch


@pytest.mark.parametrize("arch,prediction", [("llama", "shift"), ("qwen2", "same"), ("qwen2_5_vl", "shift")])
def test_one_step_lowers_loss_on_repeated_batch(arch, prediction):
    dm = tiny_diffusion(arch, block_size=4, prediction=prediction).train()
    batch = _batch(dm, arch == "qwen2_5_vl")
    opt = torch.optim.AdamW(dm.parameters(), lr=3e-3)

    def loss_at(seed):
        return dm.training_loss(batch, torch.Generator().manual_seed(seed)).loss

    before = loss_at(0)
    assert torch.isfinite(before) and before > 0
    for step in range(3):
        opt.zero_grad()
        loss_at(step).backward()
        opt.step()
    with torch.no_grad():
        after = loss_at(0)
    assert after < before * 0.9, (before.item(), after.item())


def test_loss_metrics_and_padding_invariance():
    """Batch padding does not change a sample's loss: the loss of a padded batch = mean of per-sample losses."""
    dm = tiny_diffusion("llama", block_size=4).eval()
    batch = _batch(dm, False)
    g = torch.Generator().manual_seed(5)
    prep = dm.prepare_batch(batch)
    x0 = prep["x0"]
    rates = torch.full((2, x0.shape[1] // 4), 0.7)
    x_t, masked, t = objective.noise_tokens(x0, prep["labels"], rates, 4, dm.mask_token_id, g)
    with torch.no_grad():
        logits = dm.bd3_prediction_logits(x_t, prep)
        full = objective.bd3_loss(logits[masked], x0, masked, t, prep["labels"])
        per = []
        for i in range(2):
            n = int(prep["valid"][i].sum())
            sub = {k: v[i:i + 1, :n] for k, v in batch.items()}
            p1 = dm.prepare_batch(sub)
            lg = dm.bd3_prediction_logits(x_t[i:i + 1, :n], p1)
            m = masked[i:i + 1, :n]
            per.append(objective.bd3_loss(lg[m], x0[i:i + 1, :n], m, t[i:i + 1, :n], p1["labels"]))
    torch.testing.assert_close(full, torch.stack(per).mean(), rtol=1e-5, atol=1e-5)
    out = dm.training_loss(batch, torch.Generator().manual_seed(0))
    assert 0 < out.metrics["masked_tokens"] <= out.metrics["loss_tokens"]


@pytest.mark.parametrize("arch", ["llama", "qwen2_5_vl"])
def test_ar_loss_equals_transformers_causal_lm_loss(arch):
    """ar_loss (AR instruction tuning before translation) == the HF model's own shifted CE on the same batch."""
    dm = tiny_diffusion(arch, block_size=4).eval()
    batch = _batch(dm, arch == "qwen2_5_vl")
    n = int(batch["attention_mask"][0].sum())
    one = {k: (v[:1, :n] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in batch.items()}
    if arch == "qwen2_5_vl":  # first sample's image only
        one["pixel_values"] = batch["pixel_values"][: int(batch["image_grid_thw"][0].prod())]
        one["image_grid_thw"] = batch["image_grid_thw"][:1]
        one["image_grid_thw_per_sample"] = batch["image_grid_thw_per_sample"][:1]
    with torch.no_grad():
        ours = dm.ar_loss(one).loss
        kwargs = {}
        if arch == "qwen2_5_vl":
            kwargs = {"pixel_values": one["pixel_values"], "image_grid_thw": one["image_grid_thw"],
                      "mm_token_type_ids": (one["input_ids"] == dm.adapter.image_token_id).int()}
        ref = dm.hf_model(input_ids=one["input_ids"], labels=one["labels"], **kwargs).loss
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
