"""A fresh conversion is marked as not BD3-finetuned (DiffusionConfig.bd3_trained False, recorded by convert);
block or full decoding of it prints one hint line per process (CLI, API, server start-up), AR decoding none; a BD3
training step clears the mark and the saved model no longer hints."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch

from conftest import tiny_ar
from diffusionvl import decoding
from diffusionvl.decoding import UNTRAINED_HINT


@pytest.fixture
def fresh_hint(monkeypatch):
    """A process that has not hinted yet (the hint is once per process)."""
    monkeypatch.setattr(decoding, "_hinted", [])


@pytest.fixture
def converted(tmp_path):
    import diffusionvl

    model, tok = tiny_ar("llama")
    model.save_pretrained(tmp_path / "ar")
    tok.save_pretrained(tmp_path / "ar")
    return diffusionvl.convert(tmp_path / "ar", tmp_path / "dvl", block_size=4)


def _hints(caplog):
    return [r for r in caplog.records if r.getMessage() == UNTRAINED_HINT]


def test_api_block_and_full_decoding_hint_once_ar_never(converted, fresh_hint, caplog):
    import diffusionvl

    model = diffusionvl.load(converted, device="cpu")
    assert model.config.bd3_trained is False
    with caplog.at_level(logging.WARNING, logger="diffusionvl"):
        model.generate("Hello", decoder="ar", max_new_tokens=2)
        assert _hints(caplog) == []
        model.generate("Hello", max_new_tokens=2)
        model.generate("Hello", decoder="full", max_new_tokens=2)
        model.generate("Hello", max_new_tokens=2)
    assert len(_hints(caplog)) == 1


def test_bd3_training_clears_the_mark(converted, tmp_path, fresh_hint, caplog):
    import diffusionvl

    model = diffusionvl.load(converted, device="cpu")
    ids = torch.tensor([model.tokenizer("Hello, how are you? Fine, thanks.")["input_ids"]])
    labels = ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        model.training_loss(batch, generator=torch.Generator().manual_seed(0))  # an evaluation: still untrained
    assert model.config.bd3_trained is False
    model.train()
    model.training_loss(batch, generator=torch.Generator().manual_seed(0)).loss.backward()
    assert model.config.bd3_trained is True
    model.save_pretrained(tmp_path / "trained")
    again = diffusionvl.load(tmp_path / "trained", device="cpu")
    assert again.config.bd3_trained is True
    reconverted = diffusionvl.convert(tmp_path / "trained", tmp_path / "again", block_size=8)  # keeps the record
    with caplog.at_level(logging.WARNING, logger="diffusionvl"):
        diffusionvl.load(reconverted, device="cpu").generate("Hello", max_new_tokens=2)
    assert _hints(caplog) == []


def test_cli_prints_the_hint_once_and_not_for_ar(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "diffusionvl", *args], capture_output=True, text=True,
                              timeout=300)

    out = cli("convert", "--tiny", "llama", str(tmp_path / "tiny"), "--block-size", "4")
    assert out.returncode == 0, out.stderr
    block = cli("generate", "--model", str(tmp_path / "tiny"), "--prompt", "Hello", "--max-new-tokens", "4",
                "--device", "cpu")
    assert block.returncode == 0, block.stderr
    assert [line for line in block.stderr.splitlines() if "BD3" in line] == [UNTRAINED_HINT]
    ar = cli("generate", "--model", str(tmp_path / "tiny"), "--prompt", "Hello", "--max-new-tokens", "4",
             "--device", "cpu", "--decoder", "ar")
    assert ar.returncode == 0, ar.stderr
    assert "BD3" not in ar.stderr


def test_server_hints_at_start_up(converted, fresh_hint, caplog, monkeypatch):
    pytest.importorskip("fastapi")
    uvicorn = pytest.importorskip("uvicorn")
    from diffusionvl.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    with caplog.at_level(logging.WARNING, logger="diffusionvl"):
        assert main(["serve", "--model", str(converted), "--device", "cpu"]) == 0
    assert started and len(_hints(caplog)) == 1
