"""Watching grounding while training: image dependence (rolled vs right images), accuracy per question type at every
eval, and the early stop of a run that ignores its images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import red_square, tiny_diffusion
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train import TrainConfig, train
from diffusionvl.jobs.train.grounding import roll_images
from diffusionvl.model.modeling import save_atomic


def test_roll_images_moves_each_image_to_the_next_sample():
    pixels = torch.arange(3 * 4).float().view(3, 4)  # three one-tile images
    rolled = roll_images({"input_ids": torch.zeros(3, 5), "pixel_values": pixels})
    assert torch.equal(rolled["pixel_values"], pixels[[2, 0, 1]])
    grids = torch.tensor([[1, 2, 2]] * 2)  # Qwen-VL: 4 patch rows per image
    patches = torch.arange(8).float().view(8, 1)
    out = roll_images({"input_ids": torch.zeros(2, 5), "pixel_values": patches, "image_grid_thw": grids})
    assert torch.equal(out["pixel_values"], torch.cat([patches[4:], patches[:4]]))
    assert roll_images({"input_ids": torch.zeros(2, 5), "pixel_values": patches,
                        "image_grid_thw": torch.tensor([[1, 2, 2], [1, 2, 4]])}) is None  # different sizes
    assert roll_images({"input_ids": torch.zeros(2, 5)}) is None  # no images


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("grounding")
    save_atomic(tiny_diffusion("qwen2_5_vl", block_size=4), root / "model")
    red_square().save(root / "red.png")
    red_square(color="blue").save(root / "blue.png")
    train, probe = [], []
    for i in range(8):
        colour = ("red", "blue")[i % 2]
        train.append({"image": f"{colour}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": colour},
            {"from": "human", "value": "How many squares are there?"}, {"from": "gpt", "value": "1"}]})
        probe.append({"image": f"{colour}.png", "question": "What colour is the square?", "answers": [colour],
                      "type": "colour"})
    (root / "train.json").write_text(json.dumps(train))
    (root / "probe.jsonl").write_text("\n".join(json.dumps(p) for p in probe) + "\n")
    return root / "model", root / "train.json", root / "probe.jsonl"


def _cfg(model, data, probe, output, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), eval_data=str(data), grounding_data=str(probe), output=str(output),
                num_workers=0, progress=False, tensorboard=False, save_every=0, warmup_ratio=0.0, log_every=1,
                batch_size=4, max_steps=2, eval_every=1, packing=True, loss_norm="segment", objective="ar", lr=1e-3)
    return TrainConfig(**{**base, **kw})


def test_every_eval_logs_image_dependence_and_accuracy_per_type(colour_data, tmp_path):
    model, data, probe = colour_data
    train(_cfg(model, data, probe, tmp_path / "run"))
    evals = [e for e in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "eval_loss" in e]
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:
        assert abs(e["image_dependence"] - (e["eval_loss_rolled"] - e["eval_loss"])) < 1e-9
        assert 0.0 <= e["accuracy/colour"] <= 1.0 and e["accuracy"] == e["accuracy/colour"]
    assert any(abs(e["image_dependence"]) > 0 for e in evals)  # the rolled images change the loss
    step = [e for e in map(json.loads, (tmp_path / "run" / "log.jsonl").read_text().splitlines()) if "loss" in e]
    assert step and all(e["segments_per_s"] >= e["samples_per_s"] for e in step)  # two questions per packed row


def test_a_run_that_ignores_its_images_stops_with_one_line(colour_data, tmp_path):
    model, data, probe = colour_data
    cfg = _cfg(model, data, probe, tmp_path / "run", max_steps=4, min_image_dependence=100.0,
               grounding_patience_s=0.0)
    with pytest.raises(DiffusionVLError, match="still ignores its images"):
        train(cfg)


def test_adam_betas_reach_the_optimizer(colour_data, tmp_path):
    from diffusionvl.jobs.train.trainer import Trainer

    model, data, probe = colour_data
    trainer = Trainer(_cfg(model, data, probe, tmp_path / "run", adam_beta1=0.8, adam_beta2=0.95))
    assert {g["betas"] for g in trainer.optimizer.param_groups} == {(0.8, 0.95)}
    assert TrainConfig().adam_beta1 == 0.9 and TrainConfig().adam_beta2 == 0.999  # Hugging Face Trainer's defaults
    with pytest.raises(DiffusionVLError, match="adam_beta1 and adam_beta2 must be in"):
        _cfg(model, data, probe, tmp_path / "bad", adam_beta2=1.0).validate()


def _evals(path: Path) -> list[dict]:
    return [e for e in map(json.loads, (path / "log.jsonl").read_text().splitlines()) if "eval_loss" in e]


def test_a_stage_ends_at_its_target_accuracy_or_on_a_plateau(colour_data, tmp_path):
    """The decision (`_check_stage_done`) on given evals, then a real run that ends on its plateau: the first eval is
    the baseline, the next brings no gain of plateau_delta, so a plateau of ~0 s ends the run after one step."""
    from diffusionvl.jobs.train.trainer import Trainer

    model, data, probe = colour_data
    trainer = Trainer(_cfg(model, data, probe, tmp_path / "target", target_accuracy=0.95, plateau_s=60.0))
    trainer._check_stage_done({"elapsed_s": 1.0, "accuracy/colour": 0.96, "accuracy/shape": 0.90})
    assert trainer.stopped is None  # one type below the target
    trainer._check_stage_done({"elapsed_s": 30.0, "accuracy/colour": 0.96, "accuracy/shape": 0.91})
    assert trainer.stopped is None  # no gain, but not for 60 s yet
    trainer._check_stage_done({"elapsed_s": 62.0, "accuracy/colour": 0.96, "accuracy/shape": 0.91})
    assert "no question type gained 2% in 1 min" in trainer.stopped
    trainer.stopped = None
    trainer._check_stage_done({"elapsed_s": 70.0, "accuracy/colour": 0.97, "accuracy/shape": 0.95})
    assert "every question type >= 95%" in trainer.stopped
    summary = train(_cfg(model, data, probe, tmp_path / "flat", max_steps=6, plateau_s=1e-9, plateau_delta=2.0))
    assert summary["steps"] == 1 and "no question type gained" in summary["stopped"]
    assert (tmp_path / "flat" / "final" / "diffusionvl.json").is_file()
    assert [e["step"] for e in _evals(tmp_path / "flat")] == [0, 1]  # the stopping eval is not repeated at the end
    with pytest.raises(DiffusionVLError, match="watch --grounding-data"):
        TrainConfig(model="m", data="d", output="o", plateau_s=10.0).validate()
