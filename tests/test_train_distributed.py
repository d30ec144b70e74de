"""Two CPU processes (torchrun, gloo, loopback only) train exactly like one process on the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusionvl
from conftest import tiny_diffusion
from diffusionvl.jobs.train import TrainConfig, train
from diffusionvl.model.modeling import save_atomic

QA = [("What is the capital of France?", "The capital of France is Paris."), ("Say hello.", "Hello, how are you?"),
      ("Count to three.", "One two three."), ("Name a colour.", "Red."), ("What shape is it?", "A red circle."),
      ("Describe the picture.", "A cat sits on a table."), ("Yes or no?", "Yes."), ("How many?", "Two squares."),
      ("What is in the cup?", "Coffee."), ("Read the text.", "Hello.")]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(output: Path, key: str) -> dict[int, float]:
    entries = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    return {e["step"]: e[key] for e in entries if key in e}


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    model = tmp_path / "model"
    save_atomic(tiny_diffusion("llama", block_size=4), model)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
                            + "\n" for q, a in QA))
    common = ["--model", str(model), "--data", str(data), "--max-steps", "4", "--lr", "3e-3", "--log-every", "1",
              "--eval-size", "2", "--eval-every", "2", "--num-workers", "0", "--save-every", "0", "--progress", "false",
              "--tensorboard", "false", "--warmup-ratio", "0"]
    # 2 processes x batch 1 x 2 micro-steps = global batch 4
    src = str(Path(diffusionvl.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo"}  # loopback only
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "diffusionvl", "train",
           *common, "--output", str(tmp_path / "two"), "--batch-size", "1", "--grad-accum", "2",
           "--eval-batch-size", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es), MULTI_CPU" in proc.stderr
    # 1 process x batch 4, in this process
    one = TrainConfig(model=str(model), data=str(data), output=str(tmp_path / "one"), max_steps=4, lr=3e-3,
                      log_every=1, eval_size=2, eval_every=2, eval_batch_size=2, num_workers=0, save_every=0,
                      progress=False, tensorboard=False, warmup_ratio=0.0, batch_size=4)
    summary = train(one)
    assert summary["processes"] == 1 and summary["global_batch"] == 4
    l1, l2 = _losses(tmp_path / "one", "loss"), _losses(tmp_path / "two", "loss")
    e1, e2 = _losses(tmp_path / "one", "eval_loss"), _losses(tmp_path / "two", "eval_loss")
    print("1 process :", l1, e1)
    print("2 processes:", l2, e2)
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4] and sorted(e1) == sorted(e2) == [0, 2, 4]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-5, abs=1e-6)
    for step in e1:
        assert e2[step] == pytest.approx(e1[step], rel=1e-5, abs=1e-6)
    w1 = load_file(tmp_path / "one" / "final" / "model.safetensors")
    w2 = load_file(tmp_path / "two" / "final" / "model.safetensors")
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-4)  # Adam: g / sqrt(v) amplifies rounding
