"""The trainer on tiny models, CPU: the loss falls, resume == uninterrupted, checkpoints load, freezing / per-part
learning rates / LoRA do what they say, bad samples are counted, the CLI and config files work."""

from __future__ import annotations

import gc
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import has_cuda, red_square, tiny_diffusion
from diffusionvl.cli import main as cli_main
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.jobs.train import TrainConfig, train
from diffusionvl.jobs.train.trainer import Trainer, choose_attention, set_attention
from diffusionvl.model.conversion import load
from diffusionvl.model.modeling import save_atomic

QA = [("What is the capital of France?", "The capital of France is Paris."),
      ("Say hello.", "Hello, how can I help you today?"), ("Count to three.", "One two three."),
      ("Name a colour.", "Red."), ("What shape is it?", "It is a red circle."),
      ("Describe the picture.", "A cat sits on a table."), ("Yes or no?", "Yes."),
      ("How many squares are there?", "There are two squares.")]


def _write_data(folder: Path, with_images: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    red_square().save(folder / "red.png")
    red_square(color="blue").save(folder / "blue.png")
    lines = []
    for i, (q, a) in enumerate(QA):
        item = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        if with_images and i % 2 == 0:
            item["image"] = "red.png" if i % 4 == 0 else "blue.png"
            item["conversations"][0]["value"] = "<image>\n" + q
        lines.append(json.dumps(item))
    path = folder / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    save_atomic(tiny_diffusion("llama", block_size=4), root / "model")
    return root / "model", _write_data(root / "data")


@pytest.fixture(scope="module")
def vl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vl")
    save_atomic(tiny_diffusion("qwen2_5_vl", block_size=4), root / "model")
    return root / "model", _write_data(root / "data", with_images=True)


def _cfg(model, data, output, **kw) -> TrainConfig:
    base = dict(model=str(model), data=str(data), output=str(output), num_workers=0, progress=False,
                tensorboard=False, save_every=0, warmup_ratio=0.0, log_every=1, batch_size=2, max_steps=2)
    return TrainConfig(**{**base, **kw})


def _log(output: Path, key: str) -> dict[int, float]:
    entries = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in entries if key in e}


def test_overfit_loss_falls(llama_run, tmp_path):
    model, data = llama_run
    out = tmp_path / "run"
    summary = train(_cfg(model, data, out, max_steps=40, batch_size=8, lr=5e-3, lr_scheduler="constant",
                         eval_data=str(data), eval_every=10, log_every=10))
    evals, losses = _log(out, "eval_loss"), _log(out, "loss")
    print("eval loss by step:", {k: round(v, 3) for k, v in evals.items()})
    print("train loss by step (10-step means):", {k: round(v, 3) for k, v in losses.items()})
    assert sorted(evals) == [0, 10, 20, 30, 40]
    assert all(evals[a] > evals[b] for a, b in zip(sorted(evals), sorted(evals)[1:]))  # the same masks each time
    assert evals[40] < 0.5 * evals[0]
    assert losses[40] < 0.6 * losses[10]
    assert summary["steps"] == 40 and summary["eval_loss"] == evals[40] and summary["tokens_per_s"] > 0


def test_ar_objective_trains_with_the_next_token_loss(llama_run, tmp_path):
    """objective='ar' (AR instruction tuning before translation): the logged loss is the model's ar_loss."""
    model, data = llama_run
    out = tmp_path / "ar"
    train(_cfg(model, data, out, objective="ar", max_steps=15, batch_size=8, lr=5e-3, lr_scheduler="constant",
               eval_data=str(data), eval_every=15, log_every=5))
    evals = _log(out, "eval_loss")
    assert evals[15] < 0.6 * evals[0]
    assert load(out / "final", device="cpu").config.block_size == 4  # the AR run keeps the diffusion settings


def test_resume_gives_the_same_next_losses_and_weights(llama_run, tmp_path):
    model, data = llama_run
    kw = dict(max_steps=6, save_every=3, keep_checkpoints=0, grad_accum=2, lr=3e-3, eval_size=2, eval_every=3)
    a, b = tmp_path / "a", tmp_path / "b"
    train(_cfg(model, data, a, **kw))  # 6 train samples / global batch 4: step 3 is in the middle of epoch 1
    assert sorted(p.name for p in a.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    assert not [p for p in a.iterdir() if p.name.startswith(".")]  # no temporary folders left behind
    state = json.loads((a / "checkpoint-3" / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (3, 2, 1)
    shutil.copytree(a / "checkpoint-3", b / "checkpoint-3")
    train(_cfg(model, data, b, resume="auto", **kw))
    la, lb = _log(a, "loss"), _log(b, "loss")
    assert sorted(lb) == [4, 5, 6]
    for step in (4, 5, 6):
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7)
    assert _log(b, "eval_loss")[6] == pytest.approx(_log(a, "eval_loss")[6], rel=1e-6)
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7)
    # a periodic checkpoint is a normal diffusion model folder
    dm = load(a / "checkpoint-3", device="cpu")
    assert dm.config.block_size == 4 and isinstance(dm.generate("Say hello.", max_new_tokens=8).texts[0], str)


def test_vlm_freezing_and_per_part_learning_rates(vl_run, tmp_path):
    model, data = vl_run
    cfg = _cfg(model, data, tmp_path / "run", max_steps=2, lr=1e-3, lr_projector=5e-3, freeze=["vision"])
    trainer = Trainer(cfg)
    groups = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert groups == {"language": 1e-3, "language/no_decay": 1e-3, "projector": 5e-3, "projector/no_decay": 5e-3}
    before = {k: v.detach().clone() for k, v in trainer.model.hf_model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.hf_model.named_parameters())
    changed = {k for k in before if not torch.equal(before[k], after[k].detach())}
    vision = {k for k in before if ".visual." in f".{k}" and ".merger." not in k}
    assert vision and not changed & vision  # frozen tower untouched
    assert any(".merger." in k for k in changed) and any("language_model" in k for k in changed)
    assert trainer.trainable.keys() == {"language", "projector"}


def test_lora_adapter_checkpoints_and_merge(llama_run, tmp_path):
    model, data = llama_run
    out = tmp_path / "run"
    summary = train(_cfg(model, data, out, lora=True, lora_r=4, lr=1e-2, max_steps=3, save_every=2))
    assert (out / "checkpoint-2" / "adapter_config.json").is_file()
    assert (out / "final-adapter" / "adapter_model.safetensors").is_file()
    assert summary["final_model"] == str(out / "final")
    base = load_file(Path(model) / "model.safetensors")
    merged = load_file(out / "final" / "model.safetensors")
    assert set(merged) == set(base)  # a plain model again, no lora_A / lora_B keys
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the adapter was merged into the weights
    name = "model.embed_tokens.weight"
    assert torch.equal(merged[name], base[name])  # not a LoRA target: unchanged
    # the CLI merges any adapter checkpoint the same way
    assert cli_main(["train", "--merge-lora", str(out / "final-adapter"), "--output", str(tmp_path / "m")]) == 0
    again = load_file(tmp_path / "m" / "model.safetensors")
    torch.testing.assert_close(again[q], merged[q])
    assert load(tmp_path / "m", device="cpu").generate("Hi", max_new_tokens=4).token_ids


def test_bad_and_overlong_samples_are_counted_not_fatal(llama_run, tmp_path):
    model, data = llama_run
    lines = data.read_text().splitlines()
    long = {"conversations": [{"from": "human", "value": "Count."}, {"from": "gpt", "value": "one two " * 40}]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines + ["{oops", json.dumps({"conversations": []}), json.dumps(long)]) + "\n")
    summary = train(_cfg(model, bad, tmp_path / "run", max_length=48, overlong="skip", max_steps=3, batch_size=3,
                         shuffle=False))
    assert summary["data"]["kept"] == 9 and summary["data"]["skipped"] == {"bad JSON line": 1, "no conversation": 1}
    assert summary["skipped_in_training"] == 1 and "too long" in summary["skipped_examples"][0]
    assert _log(tmp_path / "run", "skipped")[3] == 1


def test_attention_backend_choice():
    assert choose_attention("auto", torch.device("cpu")) == "sdpa"
    assert choose_attention("eager", torch.device("cpu")) == "eager"
    with pytest.raises(DiffusionVLError, match="needs a CUDA device"):
        choose_attention("flex_attention", torch.device("cpu"))
    dm = tiny_diffusion("qwen2_5_vl")
    set_attention(dm, "eager")
    assert dm.adapter.text_config._attn_implementation == "eager"
    assert dm.hf_model.config.vision_config._attn_implementation != "eager"  # only the language model switches


def test_cli_config_file_flags_override_and_errors(llama_run, tmp_path, capsys):
    model, data = llama_run
    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(f"model: {model}\ndata: {data}\noutput: {tmp_path / 'run'}\nmax_steps: 3\n"
                        "num_workers: 0\nprogress: false\nsave_every: 0\ntensorboard: false\nbatch_size: 2\n")
    assert cli_main(["train", "--config", str(cfg_file), "--max-steps", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 1 and Path(summary["final_model"]).is_dir()
    assert cli_main(["train", "--model", str(model), "--data", str(tmp_path / "none.jsonl"), "--output",
                     str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: data file not found") and "\n" not in err
    (tmp_path / "bad.yaml").write_text("lr: 1e-4\nlearning_rate: 3\n")
    assert cli_main(["train", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert "unknown field(s)" in capsys.readouterr().err
    assert cli_main(["train", "--accelerate-config", "zero3"]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()


@pytest.mark.skipif(not has_cuda(), reason="FlexAttention training needs CUDA")
def test_cuda_trains_with_flex_attention_by_default(vl_run, tmp_path):
    model, data = vl_run
    summary = train(_cfg(model, data, tmp_path / "run", max_steps=2, bf16=True))
    assert summary["attention"] == "flex_attention" and summary["train_loss"] > 0


def test_bench_script_smoke_on_cpu(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_train_attention.py"
    spec = importlib.util.spec_from_file_location("bench_train_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    results = bench.main(["--tiny", "--lengths", "16", "32", "--steps", "1", "--warmup", "1", "--device", "cpu",
                          "--out", str(out)])
    assert [(r["backend"], r["length"]) for r in results] == [("sdpa", 16), ("sdpa", 32)]
    assert all(r["step_ms"] > 0 for r in results) and json.loads(out.read_text())["shape"] == "tiny"


def test_gradient_checkpointing_gives_the_same_losses(llama_run, tmp_path):
    model, data = llama_run
    calls = {}

    def run(name, **kw):
        trainer = Trainer(_cfg(model, data, tmp_path / name, max_steps=3, lr=3e-3, **kw))
        layer = trainer.model.hf_model.model.layers[0].mlp  # inside the checkpointed forward
        hook = layer.register_forward_pre_hook(lambda *a: calls.__setitem__(name, calls.get(name, 0) + 1))
        trainer.fit()
        hook.remove()
        return _log(tmp_path / name, "loss")

    la, lb = run("plain"), run("ckpt", gradient_checkpointing=True)
    assert calls == {"plain": 3, "ckpt": 6}  # each layer is recomputed in the backward pass
    for step in (1, 2, 3):
        assert lb[step] == pytest.approx(la[step], rel=1e-5)


def test_a_diverging_run_stops_with_one_line(tmp_path):
    """A loss that becomes NaN/inf stops training at the next log with a one-line error (no hours of NaN steps)."""
    import json as _json

    from conftest import tiny_diffusion
    from diffusionvl.core.errors import DiffusionVLError
    from diffusionvl.jobs.train import TrainConfig, train
    from diffusionvl.model.modeling import save_atomic

    save_atomic(tiny_diffusion("llama", block_size=4), tmp_path / "m")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(_json.dumps({"conversations": [{"from": "human", "value": f"q{i}"},
                                                           {"from": "gpt", "value": "an answer"}]}) + "\n"
                            for i in range(8)))
    cfg = TrainConfig(model=str(tmp_path / "m"), data=str(data), output=str(tmp_path / "out"), max_steps=6,
                      lr=1e12, max_grad_norm=0.0, log_every=1, batch_size=2, save_every=0, progress=False,
                      tensorboard=False, num_workers=0, warmup_ratio=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        with pytest.raises(DiffusionVLError, match="training loss became"):
            train(cfg)
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]  # the log file was closed
    assert '"step": 1' in (tmp_path / "out" / "log.jsonl").read_text()  # what was logged before the stop is kept


def test_a_failed_checkpoint_save_leaves_no_temp_folder_and_keeps_the_previous_checkpoint(llama_run, tmp_path):
    model, data = llama_run
    trainer = Trainer(_cfg(model, data, tmp_path / "run"))
    trainer.state.step = 1
    first = trainer.save_checkpoint()
    before = sorted(p.name for p in first.rglob("*"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    trainer.accelerator.save_state = broken
    trainer.state.step = 2
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    assert sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith((".", "checkpoint"))) == \
        ["checkpoint-1"]
    assert sorted(p.name for p in first.rglob("*")) == before
    trainer.tracker.close()


def test_a_second_run_into_a_used_output_is_refused_unless_resumed_or_overwritten(llama_run, tmp_path):
    """A rerun used to replace final/ and summary.json and append to the log, with the first run's checkpoints left
    next to the second's (a later --resume auto would mix them)."""
    model, data = llama_run
    out = tmp_path / "run"
    train(_cfg(model, data, out, save_every=1, max_steps=1))
    (out / "notes.txt").write_text("mine")
    first = (out / "final" / "model.safetensors").read_bytes()
    with pytest.raises(DiffusionVLError, match="is not empty .*--resume auto.*--overwrite true"):
        train(_cfg(model, data, out, max_steps=2, seed=5))
    assert (out / "final" / "model.safetensors").read_bytes() == first and (out / "checkpoint-1").is_dir()
    train(_cfg(model, data, out, max_steps=2, seed=5, overwrite=True))
    assert not (out / "checkpoint-1").exists() and (out / "notes.txt").read_text() == "mine"
    assert [json.loads(line)["event"] for line in (out / "log.jsonl").read_text().splitlines()
            if "event" in line][0] == "start"  # a fresh log, not the first run's with this one appended
    assert (out / "final" / "model.safetensors").read_bytes() != first
    (tmp_path / "file").write_text("x")
    with pytest.raises(DiffusionVLError, match="is not a folder"):
        train(_cfg(model, data, tmp_path / "file"))


def test_a_merged_lora_bd3_run_is_no_fresh_conversion(tmp_path):
    """A fresh conversion is marked untrained; after a LoRA BD3 run the merged final model is marked trained, so block
    decoding it gives no 'needs BD3 finetuning' hint."""
    dm = tiny_diffusion("llama", block_size=4)
    dm.config.bd3_trained = False  # what `diffusionvl convert` records
    save_atomic(dm, tmp_path / "model")
    data = _write_data(tmp_path / "data")
    train(_cfg(tmp_path / "model", data, tmp_path / "run", lora=True, lora_r=4, lr=1e-3))
    for folder in ("final-adapter", "final"):
        assert json.loads((tmp_path / "run" / folder / "diffusionvl.json").read_text())["bd3_trained"] is True
