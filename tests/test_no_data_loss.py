"""Writing a model never deletes what a user keeps at the output path unless asked (--overwrite), leaves no debris,
and an unwritable output is one line with exit code 2."""

from __future__ import annotations

import pytest

from diffusionvl.cli import main
from diffusionvl.core.errors import DiffusionVLError
from diffusionvl.model.conversion import convert


def _convert(dst, *extra):
    return main(["convert", "--tiny", "llama", str(dst), "--block-size", "4", *extra])


def _debris(folder):
    return sorted(p.name for p in folder.iterdir() if ".old-" in p.name or ".tmp-" in p.name)


@pytest.mark.parametrize("make", ["folder_with_notes", "regular_file"])
def test_convert_refuses_a_target_that_is_not_a_model_and_replaces_it_only_with_overwrite(tmp_path, capsys, make):
    dst = tmp_path / "d"
    if make == "folder_with_notes":
        dst.mkdir()
        (dst / "notes.txt").write_text("x")
        kept = dst / "notes.txt"
    else:
        dst.write_text("precious")
        kept = dst
    assert _convert(dst) == 2
    err = capsys.readouterr().err.strip()
    assert "--overwrite" in err and "\n" not in err and "Traceback" not in err
    assert kept.read_text() in ("x", "precious")  # untouched
    assert _convert(dst, "--overwrite") == 0
    assert (dst / "diffusionvl.json").is_file() and not (dst / "notes.txt").exists()
    assert _debris(tmp_path) == []


def test_rerunning_into_a_model_folder_or_an_empty_folder_replaces_it(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _convert(empty) == 0
    assert _convert(empty) == 0  # same kind of output: a rerun replaces it
    assert (empty / "diffusionvl.json").is_file() and _debris(tmp_path) == []


def test_current_directory_and_unwritable_paths_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("keep")
    assert _convert(".") == 2
    assert (tmp_path / "mine.txt").read_text() == "keep"
    assert _convert("/proc/diffusionvl-x") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error:") for line in err), err


def test_python_api_refuses_too(tmp_path):
    src = tmp_path / "src"
    assert _convert(src) == 0
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "a.txt").write_text("a")
    with pytest.raises(DiffusionVLError, match="overwrite"):
        convert(src, dst)
    assert (dst / "a.txt").read_text() == "a"
    convert(src, dst, overwrite=True)
    assert (dst / "diffusionvl.json").is_file()


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_are_one_line(tmp_path, capsys, damage):
    model = tmp_path / "m"
    assert _convert(model) == 0
    capsys.readouterr()  # the conversion's own output
    weights = model / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.write_bytes(b"\x00" * 5000)
    assert main(["generate", "--model", str(model), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read the weights") and "\n" not in err


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line_and_leaves_only_complete_checkpoints(tmp_path):
    """SIGINT to the whole process group (Ctrl-C; DataLoader workers included): exit 130, 'interrupted', no
    traceback from the trainer or its workers, every checkpoint left is complete and no temp folder remains."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import diffusionvl
    from conftest import tiny_diffusion
    from diffusionvl.model.modeling import save_atomic

    save_atomic(tiny_diffusion("llama", block_size=4), tmp_path / "model")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": f"Say {i}."},
                                                          {"from": "gpt", "value": f"{i} {i} {i}."}]}) + "\n"
                            for i in range(32)))
    out = tmp_path / "run"
    src = str(Path(diffusionvl.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "diffusionvl", "train", "--model", str(tmp_path / "model"), "--data", str(data),
           "--output", str(out), "--max-steps", "100000", "--batch-size", "2", "--num-workers", "2",
           "--save-every", "2", "--progress", "false", "--tensorboard", "false"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(out.glob("checkpoint-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # a few more saves and prunes: the interrupt may land in the middle of one
    # The terminal's Ctrl-C reaches every process of the group; if a DataLoader worker handles it before the main
    # process does, the main process used to die of "worker exited unexpectedly" (exit 1, a traceback). The workers
    # are hit first here, on purpose, so that order is tested every time, not one run in five.
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    for pid in children.read_text().split() if children.exists() else []:
        try:
            os.kill(int(pid), signal.SIGINT)
        except ProcessLookupError:  # a worker that finished its epoch meanwhile
            pass
    time.sleep(1.0)  # the main process fetches batches all the time: it would notice a dead worker by now
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err, err[-2000:]
    kept = sorted(out.glob("checkpoint-*"))
    assert kept and all((c / "trainer_state.json").is_file() for c in kept)  # every checkpoint left is complete
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp folder of a cut save


def test_data_refuses_a_folder_of_other_files_and_rewrites_its_own_dataset(tmp_path, capsys):
    from diffusionvl.cli import main as cli

    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "train.json").write_text("important")
    args = ["--n-train", "2", "--n-val", "1", "--n-test", "1", "--no-real-images", "--no-progress", "--image-size", "64"]
    assert cli(["data", "--out", str(folder), *args]) == 2
    assert "--overwrite" in capsys.readouterr().err and (folder / "train.json").read_text() == "important"
    assert cli(["data", "--out", str(folder), *args, "--overwrite"]) == 0
    assert (folder / "train.json").read_text() != "important"
    assert cli(["data", "--out", str(folder), *args, "--seed", "1"]) == 0  # its own dataset: rewritten, no flag


def test_an_interrupted_data_run_can_be_rerun(tmp_path, capsys):
    """A run killed while writing images leaves our images/ and no summary.json: that folder is still ours."""
    from diffusionvl.cli import main as cli

    folder = tmp_path / "d"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "train-000000.png").write_bytes(b"half a png")
    args = ["--n-train", "2", "--n-val", "1", "--n-test", "1", "--no-real-images", "--no-progress", "--image-size", "64"]
    assert cli(["data", "--out", str(folder), *args]) == 0
    assert (folder / "summary.json").is_file()
    (folder / "images" / "holiday.jpg").write_bytes(b"not ours")
    (folder / "summary.json").unlink()
    assert cli(["data", "--out", str(folder), *args]) == 2  # a file of someone else's: refused
    assert (folder / "images" / "holiday.jpg").read_bytes() == b"not ours"


def test_an_interrupted_run_sweeps_only_its_own_temporaries(tmp_path):
    from diffusionvl.jobs.train.checkpoint import remove_temporaries

    for name in ("..checkpoint-60.tmp.tmp-3618f92e", ".checkpoint-60.tmp", ".final.tmp-ab12cd34"):
        (tmp_path / name).mkdir()
    for name in ("checkpoint-58", ".final-adapter.old-ab12cd34", ".notes", "final"):  # kept: not temporaries
        (tmp_path / name).mkdir()
    assert sorted(remove_temporaries(tmp_path)) == ["..checkpoint-60.tmp.tmp-3618f92e", ".checkpoint-60.tmp",
                                                   ".final.tmp-ab12cd34"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".final-adapter.old-ab12cd34", ".notes", "checkpoint-58",
                                                          "final"]


# ---- resuming from a damaged checkpoint -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished 4-step run of the tiny model with checkpoint-2 and checkpoint-4 (about 10 s)."""
    import json

    from conftest import tiny_diffusion
    from diffusionvl.model.modeling import save_atomic

    root = tmp_path_factory.mktemp("resume")
    save_atomic(tiny_diffusion("llama", block_size=4), root / "model")
    turns = [[{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": f"{i} {i} {i}."}] for i in range(16)]
    (root / "train.jsonl").write_text("".join(json.dumps({"conversations": t}) + "\n" for t in turns))
    assert main(_train_argv(root, root / "run", "--max-steps", "4")) == 0
    return root


def _train_argv(root, out, *extra):
    return ["train", "--model", str(root / "model"), "--data", str(root / "train.jsonl"), "--output", str(out),
            "--batch-size", "2", "--save-every", "2", "--progress", "false", "--tensorboard", "false", *extra]


def _damage(ckpt, how):
    import json

    state = ckpt / "trainer_state.json"
    if how.startswith("step="):
        saved = json.loads(state.read_text())
        saved["step"] = json.loads(how[len("step="):])
        state.write_text(json.dumps(saved))
    elif how == "no-accelerate-state":
        import shutil

        shutil.rmtree(ckpt / "accelerate_state")
    elif how.startswith("empty:"):
        (ckpt / how[len("empty:"):]).write_bytes(b"")
    elif how == "random-rng":
        (ckpt / "accelerate_state" / "random_states_0.pkl").write_bytes(bytes(range(256)) * 4)


@pytest.mark.slow
@pytest.mark.parametrize("how,needle", [
    ('step="x"', "trainer_state.json: 'step' must be a non-negative integer, got 'x'"),  # was a KeyError traceback
    ("step=-5", "trainer_state.json: 'step' must be a non-negative integer, got -5"),  # trained, wrote checkpoint-0
    ("step=1000000000000", "says step 1000000000000, outside 0..4"),  # wrote checkpoint-10**12 and final, no training
    ("empty:accelerate_state/optimizer.bin", "accelerate_state/optimizer.bin is empty (0 bytes)"),  # EOFError
    ("empty:accelerate_state/model.safetensors", "accelerate_state/model.safetensors is empty"),  # SafetensorError
    ("empty:model.safetensors", "checkpoint-4/model.safetensors is damaged"),
    ("no-accelerate-state", "accelerate_state is missing"),  # ValueError traceback
    ("random-rng", "random_states_0.pkl is damaged"),  # exit 0: accelerate skipped the RNG states silently
])
def test_resume_from_a_damaged_checkpoint_is_one_line_naming_the_file(trained_run, tmp_path, capsys, how, needle):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run / "run", out)
    _damage(out / "checkpoint-4", how)
    capsys.readouterr()
    assert main(_train_argv(trained_run, out, "--max-steps", "4", "--resume", str(out / "checkpoint-4"))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: cannot resume from") and needle in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]  # nothing written


@pytest.mark.slow
def test_resume_auto_skips_a_damaged_newest_checkpoint_and_says_so(trained_run, tmp_path, capsys):
    import json
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained_run / "run", out)
    _damage(out / "checkpoint-4", "empty:accelerate_state/optimizer.bin")
    capsys.readouterr()
    assert main(_train_argv(trained_run, out, "--max-steps", "4", "--resume", "auto")) == 0
    err = capsys.readouterr().err
    assert "--resume auto skips checkpoint-4" in err and "optimizer.bin is empty" in err
    events = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"][-1] == 2  # trained on from checkpoint-2
