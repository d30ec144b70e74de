"""`diffusionvl bench` (bench.py, commands/bench.py) and its reference-style baseline (decoding/reference.py):
runs on the tiny shape in seconds, writes valid JSON with every case, counts forwards right, and the baseline
decodes the same tokens as our block decoder (it differs only in how it spends forwards and host syncs)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_diffusion
from diffusionvl.cli import main
from diffusionvl.core.config import DecodeConfig
from diffusionvl.jobs.bench import CASES, BenchConfig, markdown_table, run_bench, stop_tokens_disabled


def _tiny_cfg(tmp_path, **kw):
    base = dict(shape="tiny", batch=[1, 2], prompt=[12], new_tokens=8, repeats=1, warmup=0, threads=1,
                decoders=list(CASES), output=str(tmp_path / "bench.json"))
    return BenchConfig(**(base | kw))


def test_bench_tiny_writes_every_case(tmp_path):
    cfg = _tiny_cfg(tmp_path)
    result = run_bench(cfg, progress=False)
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(result["results"]))
    assert "disabled" in on_disk["meta"]["stop_tokens"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # atomic writes leave no temp files
    rows = {(r["batch"], r["decoder"]): r for r in on_disk["results"]}
    assert set(rows) == {(b, d) for b in (1, 2) for d in CASES}
    # prompt 12, B = S = 8: 1 complete prompt block, the first block holds 4 prompt tokens + 4 masks
    expected_forwards = {"hf_ar": 8, "hf_static": 8, "ar": 8, "ar_plain": 8, "full": 8,
                         "ar_fast": 8, "block_static": 1 + 4 + 8, "block_plain": 1 + 4 + 8, "block_fast": 1 + 4 + 8,
                         "reference": 1 + (4 + 1) + (8 + 1)}  # the reference's separate commit forwards
    for (batch, name), r in rows.items():
        assert r["tokens"] == batch * 8, name
        assert r["tokens_per_second"] > 0 and r["ms_per_forward"] > 0 and r["first_block_ms"] is not None
        if name in expected_forwards:
            assert r["forwards"] == expected_forwards[name], name
    assert rows[(1, "hf_ar")]["tokens_per_second_vs_hf"] == 1.0
    assert rows[(1, "ar")]["backend"] == "plain" and rows[(1, "reference")]["backend"].startswith("reference")
    assert rows[(1, "block_fast")]["backend"] == "fast/eager" and rows[(2, "ar_fast")]["backend"] == "fast/eager"
    agreement = on_disk["meta"]["agreement"]
    assert [a["decoder"] for a in agreement] == ["ar", "block"]
    assert all(a["exact_match_samples"] == a["samples"] and a["fast_backend"] == "fast/eager" for a in agreement)
    assert "| 2 | 12 | reference |" in markdown_table(result)


def test_plot_is_written_when_matplotlib_is_installed(tmp_path):
    pytest.importorskip("matplotlib")
    result = run_bench(_tiny_cfg(tmp_path, batch=[1], decoders=["hf_ar", "ar"], agreement=False), progress=False)
    assert result["meta"]["plot"] == str(tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_bench(tmp_path, capsys):
    out = tmp_path / "cli.json"
    code = main(["bench", "--shape", "tiny", "--batch", "1", "--prompt", "9", "--new-tokens", "4", "--repeats", "1",
                 "--warmup", "0", "--decoders", "hf_ar", "block_static", "--plot", "false", "--agreement", "false",
                 "--quiet", "--output", str(out)])
    assert code == 0
    data = json.loads(out.read_text())
    assert [r["decoder"] for r in data["results"]] == ["hf_ar", "block_static"]
    assert "block_static" in capsys.readouterr().out


@pytest.mark.parametrize("flag,value,message", [("--decoders", "nope", "unknown bench case"),
                                                ("--shape", "gpt5", "unknown shape"),
                                                ("--steps", "9", "steps must be in 1..block_size")])
def test_cli_bench_bad_input_is_one_line(tmp_path, capsys, flag, value, message):
    code = main(["bench", flag, value, "--output", str(tmp_path / "x.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and message in err and "\n" not in err


def test_stop_tokens_disabled_and_restored():
    dm = tiny_diffusion("qwen2", block_size=8)
    saved = list(dm.stop_token_ids)
    eos = dm.hf_model.generation_config.eos_token_id
    with stop_tokens_disabled(dm):
        assert dm.stop_token_ids == [] and dm.hf_model.generation_config.eos_token_id is None
    assert dm.stop_token_ids == saved and dm.hf_model.generation_config.eos_token_id == eos


# ---- the reference-style loop decodes what our block decoder decodes, with more forwards ---------------------------
@pytest.mark.parametrize("arch", ["qwen2", "gemma3"])
@pytest.mark.parametrize("policy", ["static", "threshold"])
def test_reference_loop_equals_block_decoder(arch, policy):
    from diffusionvl.backbone.adapters import Encoded
    from diffusionvl.decoding import run_encoded
    from diffusionvl.decoding.reference import reference_generate

    dm = tiny_diffusion(arch, block_size=4, prediction="same")  # the reference reads each position's own logits
    ids = torch.randint(7, 300, (3, 10), generator=torch.Generator().manual_seed(1))
    ref = reference_generate(dm, ids, 13, 4, 2, policy, 0.05, 0.0, [])
    cfg = DecodeConfig(decoder="block", block_size=4, steps=2, max_new_tokens=13, policy=policy, threshold=0.05)
    *_, final = run_encoded(dm, Encoded(input_ids=ids.tolist()), cfg)
    assert ref.ids.tolist() == final.output.token_ids
    if policy == "static":  # prefill, first block (2 prompt + 2 masks: 1 step + commit), 3 blocks of 2 steps + commit
        assert ref.forwards == 1 + 2 + 3 * 3 and final.output.stats["forwards"] == 1 + 1 + 3 * 2


def test_reference_loop_stops_the_whole_batch_at_any_eos():
    from diffusionvl.decoding.reference import reference_generate

    dm = tiny_diffusion("qwen2", block_size=4, prediction="same")
    head = dm.adapter.head

    def eos_in_row0(hidden):
        logits = head(hidden)
        logits[0, ..., dm.eos_token_id] = 1e4
        return logits

    dm.adapter.head = eos_in_row0
    ids = torch.randint(7, 300, (2, 8), generator=torch.Generator().manual_seed(2))
    ref = reference_generate(dm, ids, 16, 4, 4, stop_ids=dm.stop_token_ids)
    assert ref.forwards == 1 + 5  # prefill + one block (4 steps + commit), then the batch stops
    assert (ref.ids[1, 4:] == dm.mask_token_id).all()  # row 1 never got its later blocks
