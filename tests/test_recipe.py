"""tiny-VLM recipe pieces that run without the real assets: decoder grid, results table, plot, config checks."""

from __future__ import annotations

import json

import pytest

from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.recipes.tiny_model import TinyVLMConfig
from diffusionvl.recipes.tiny_vlm import decoder_grid, results_markdown, write_results


def _rows(cfg):
    rows = [{"model": "AR VLM (parent)", "decoder": "ar", "accuracy": 0.8, "tokens_per_forward": 1.0,
             "tokens_per_second": 10.0, "samples": 40, "per_type": {"shape": 0.9, "count": 0.5}}]
    for i, d in enumerate(decoder_grid(cfg)):
        rows.append({"model": "diffusion VLM (translated)", "accuracy": 0.7 - 0.01 * i,
                     "tokens_per_forward": 1.0 + 0.3 * i, "tokens_per_second": 12.0 + i, "samples": 40,
                     "per_type": {"shape": 0.8, "count": 0.4}, **d})
    return rows


def test_decoder_grid_covers_static_thresholds_and_full():
    cfg = TinyVLMConfig(block_size=8, thresholds=[0.5, 0.9], full_baseline=True)
    grid = decoder_grid(cfg)
    assert [g["policy"] for g in grid if g["decoder"] == "block"] == ["static", "static", "threshold", "threshold"]
    assert {g.get("threshold") for g in grid if g["policy"] == "threshold"} == {0.5, 0.9}
    assert grid[1]["steps"] == 4 and grid[-1]["decoder"] == "full"


def test_results_table_json_and_plot(tmp_path):
    cfg = TinyVLMConfig(out=str(tmp_path), n_train=1000, diffusion_fraction=0.05, thresholds=[0.5, 0.9])
    rows = _rows(cfg)
    paths = write_results(cfg, rows, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["facts"]["n_diffusion"] == 50 and abs(data["facts"]["fraction"] - 0.05) < 1e-9
    md = paths["markdown"].read_text()
    assert "| AR VLM (parent) | ar | 80.0% | 1.00 | 10.0 |" in md
    assert "block threshold S=8, tau=0.9" in md and "| shape |" not in md.splitlines()[0]
    pytest.importorskip("matplotlib")
    assert paths["plot"].is_file() and paths["plot"].stat().st_size > 1000
    assert "tau" in results_markdown(cfg, rows, data["facts"])


def test_config_validation_is_one_line():
    with pytest.raises(DiffusionVLError, match="diffusion_fraction must be in"):
        TinyVLMConfig(diffusion_fraction=0.0).validate()
    with pytest.raises(DiffusionVLError, match="thresholds must be in"):
        TinyVLMConfig(thresholds=[1.5]).validate()


def test_diffusion_fraction_is_of_the_ar_samples_actually_used(tmp_path):
    cfg = TinyVLMConfig(out=str(tmp_path), n_train=6000, stage2_samples=4000, diffusion_fraction=0.05,
                        thresholds=[0.9], stage2_epochs=1)
    assert cfg.ar_samples == 4000
    facts = json.loads(write_results(cfg, _rows(cfg), tmp_path)["json"].read_text())["facts"]
    assert facts["n_ar"] == 4000 and facts["n_diffusion"] == 200 and abs(facts["fraction"] - 0.05) < 1e-9
    assert TinyVLMConfig(n_train=100, stage2_samples=5000).ar_samples == 100


def test_direct_path_budget_is_stated(tmp_path):
    cfg = TinyVLMConfig(out=str(tmp_path), n_train=6000, stage2_samples=4000, direct=True, direct_samples=200,
                        direct_epochs=4, thresholds=[0.9])
    rows = _rows(cfg) + [dict(_rows(cfg)[1], model="diffusion VLM (direct from AR LM)")]
    paths = write_results(cfg, rows, tmp_path)
    assert json.loads(paths["json"].read_text())["facts"]["n_direct"] == 200
    assert "trained on 200 samples x 4 epochs" in paths["markdown"].read_text()


def test_gate_only_runs_the_vision_gate_alone_and_writes_its_table(tmp_path):
    from diffusionvl.recipes.tiny_vlm import run_recipe

    cfg = TinyVLMConfig(out=str(tmp_path / "r"), gate_only=True, gate_scenes=24, image_size=64, gate_strict=False,
                        progress=False, threads=None)
    result = run_recipe(cfg)
    table = (tmp_path / "r" / "gate" / "gate.md").read_text()
    assert result["results"]["markdown"] == str(tmp_path / "r" / "gate" / "gate.md")
    assert "binding (attention)" in table and table.count("\n|---") == 1
    row = json.loads((tmp_path / "r" / "gate" / "gate.json").read_text())[0]
    assert 0.0 <= row["attention"]["binding"] <= 1.0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["gate"]  # no data, no model, no training


# ---- the curriculum: presentations planned for binding, replay, the floor ------------------------------------------
def _scene_data(folder, n, max_objects, seed):
    from diffusionvl.data import generate_dataset

    return generate_dataset(folder, n_train=n, n_val=2, n_test=4, seed=seed, image_size=64, progress=False,
                            task_mix=TinyVLMConfig().task_mix if max_objects > 1 else
                            {"shape": 1, "colour": 1, "position": 1, "exist": 1}, real_images=False,
                            multi_turn_fraction=1.0, questions_per_image=8, max_objects=max_objects)


def test_binding_stage_is_planned_in_presentations_and_replays_recognition(tmp_path):
    """The data summary counts binding questions (shape/colour about scenes of several objects); the binding stage's
    epochs give at least --binding-presentations of them; its data holds the main records and the replayed
    recognition records, whose images the trainer finds; the translation takes the same share of both."""
    from diffusionvl.jobs.train.data import read_records
    from diffusionvl.recipes.tiny_vlm import binding_data, binding_epochs, translation_data

    main = _scene_data(tmp_path / "data", 60, 4, 0)
    rec = _scene_data(tmp_path / "data-recognition", 20, 1, 1)
    assert rec["binding"]["train"] == 0 < main["binding"]["train"] < main["questions"]["train"]["shape"] + \
        main["questions"]["train"]["colour"]
    cfg = TinyVLMConfig(n_train=60, binding_presentations=5 * main["binding"]["train"] - 1, recognition_replay=10,
                        diffusion_fraction=0.5)
    assert binding_epochs(cfg, tmp_path / "data") == 5
    assert binding_epochs(TinyVLMConfig(n_train=60, stage2_epochs=2), tmp_path / "data") == 2
    path = binding_data(cfg, tmp_path / "data", tmp_path / "data-recognition")
    records = json.loads(path.read_text())
    assert len(records) == 70 and sum(r["id"].startswith("replay-") for r in records) == 10
    parsed, report = read_records(path, tmp_path / "data")
    assert len(parsed) == 70 and report.to_dict()["skipped"] == {}  # every replayed image resolves
    translate = json.loads(translation_data(cfg, tmp_path / "data").read_text())
    assert len(translate) == 35 and sum(r["id"].startswith("replay-") for r in translate) == 5


def test_the_floor_to_ship_is_per_one_object_type():
    from diffusionvl.recipes.tiny_vlm import AR_LABEL, DVLM_LABEL, check_floor, floor_met

    parent = {"model": AR_LABEL, "decoder": "ar", "per_type": {"shape": 0.98, "colour": 0.95, "position": 0.92,
                                                                "exist": 0.91}}

    def dvlm(tau, tpf, **per_type):
        return {"model": DVLM_LABEL, "decoder": "block", "policy": "threshold", "threshold": tau,
                "tokens_per_forward": tpf, "per_type": {**parent["per_type"], **per_type}}

    rows = [parent, dvlm(0.7, 1.5, colour=0.80), dvlm(0.9, 1.2, colour=0.93)]
    bars = check_floor(rows)
    assert floor_met(rows) and len(bars) == 8 and all("tau=0.9" in b["what"] for b in bars[4:])  # the tau that holds
    assert not floor_met([parent, dvlm(0.9, 1.2, exist=0.80)])  # 0.80 / 0.91 < 95%
    closest = check_floor([parent, dvlm(0.7, 1.5, exist=0.50), dvlm(0.9, 1.2, exist=0.80)])
    assert all("tau=0.9" in b["what"] for b in closest[4:])  # none holds: the closest is shown, not the fastest
    assert not floor_met([dict(parent, per_type={**parent["per_type"], "position": 0.85}), dvlm(0.9, 1.2)])
    assert not floor_met([parent]) and check_floor([]) == []


def test_curriculum_counts_what_each_stage_showed(tmp_path):
    """Epochs as trained (a stage that ended early shows less than planned), the replayed recognition images with
    their own question mix, binding questions apart."""
    from diffusionvl.recipes.curves import curriculum, curriculum_markdown

    def summary(images, questions, binding):
        return {"images": {"train": images}, "questions": {"train": questions}, "binding": {"train": binding}}

    (tmp_path / "data").mkdir()
    (tmp_path / "data-recognition").mkdir()
    (tmp_path / "recognition").mkdir()
    (tmp_path / "stage2").mkdir()
    (tmp_path / "data-recognition" / "summary.json").write_text(json.dumps(summary(100, {"shape": 100, "exist": 200}, 0)))
    (tmp_path / "data-recognition" / "train.json").write_text(json.dumps([{"id": i} for i in range(100)]))
    (tmp_path / "recognition" / "summary.json").write_text(json.dumps({"steps": 5, "global_batch": 10}))  # half
    (tmp_path / "data" / "summary.json").write_text(json.dumps(summary(400, {"colour": 800, "count": 400}, 600)))
    records = [{"id": f"train-{i}"} for i in range(400)] + [{"id": f"replay-{i}"} for i in range(50)]
    (tmp_path / "data" / "stage2.json").write_text(json.dumps(records))
    (tmp_path / "stage2" / "summary.json").write_text(json.dumps({"steps": 90, "global_batch": 10}))  # 2 epochs
    rows = curriculum(TinyVLMConfig(n_train=400), tmp_path)
    assert rows[0] == {"stage": "recognition", "images": 100, "epochs": 0.5, "presentations": {"shape": 50,
                       "exist": 100}, "binding": 0, "total": 150}
    assert rows[1]["epochs"] == 2.0 and rows[1]["binding"] == 1200
    assert rows[1]["presentations"] == {"colour": 1600, "count": 800, "shape": 100, "exist": 200}
    assert "| stage2 | 450 | 2.0 |" in "\n".join(curriculum_markdown(rows))
