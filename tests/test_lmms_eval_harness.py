"""lmms-eval's own harness on the plugin, as a user runs it: `lmms-eval eval --model diffusionvl` on the local task
pair in tests/data/lmms_eval_tasks (a generate_until and a multiple_choice task over synthetic images, datasets'
`json` builder, nothing downloaded) with a tiny Qwen2.5-VL. Results and per-sample logs are written; multiple choice
picks the choice with the clearly better NELBO bound; generate_until answers equal `diffusionvl eval` on the same
questions. The lmms-eval 0.7.3 bugs the adapter works around are asserted still present, so that each shim is
removed when its bug is fixed; and the sign convention the adapter follows (argmin over losses) is asserted too."""

from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_diffusion
from diffusionvl.cli import main
from diffusionvl.jobs.evaluation.elbo import encode_scored, nelbo, noise_levels
from diffusionvl.jobs.evaluation.tasks import Sample
from diffusionvl.jobs.integrations import lmms_eval as adapter
from diffusionvl.model.conversion import load

try:
    import lmms_eval  # noqa: F401
except ImportError:  # pragma: no cover - a set-up error, not a skip: the harness is part of the suite
    pytest.fail("lmms-eval is part of the test set-up: scripts/setup.sh installs it (the eval-lite extra, then "
                "`pip install --no-deps lmms-eval==0.7.3`)", pytrace=False)

pytestmark = pytest.mark.slow
TASKS = Path(__file__).parent / "data" / "lmms_eval_tasks"
GEN, MC = "diffusionvl_local_gen", "diffusionvl_local_mc"
STEPS, MAX_NEW = 2, 8  # the gen task's yaml asks for max_new_tokens 8, greedy


def _lmms_eval(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([str(Path(sys.executable).parent / "lmms-eval"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `lmms-eval eval` of both local tasks (run from a copy of the task folder: data_files are relative)."""
    root = tmp_path_factory.mktemp("lmms")
    model_dir = root / "tiny-vl"
    tiny_diffusion("qwen2_5_vl", block_size=4).save_pretrained(model_dir)
    tasks = shutil.copytree(TASKS, root / "tasks")
    out = root / "out"
    proc = _lmms_eval(["eval", "--model", "diffusionvl", "--model_args", f"pretrained={model_dir},steps={STEPS}",
                       "--tasks", f"{GEN},{MC}", "--include_path", ".", "--batch_size", "2",
                       "--output_path", str(out), "--log_samples"], tasks, root / "hf")
    log = proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0, log  # lmms-eval 0.7.3 also exits 0 on some failures: the files are checked below
    results = list(out.rglob("*_results.json"))
    assert len(results) == 1, log
    samples = {task: [json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
               for task in (GEN, MC)}
    return {"model_dir": model_dir, "tasks": tasks, "root": root,
            "results": json.loads(results[0].read_text()), "samples": samples}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_results_and_per_sample_logs_are_written(run):
    results = run["results"]["results"]
    assert set(results) == {GEN, MC}
    assert "exact_match,none" in results[GEN] and "acc,none" in results[MC]
    assert len(run["samples"][GEN]) == len(_rows(TASKS / "gen.jsonl")) == 8
    assert len(run["samples"][MC]) == len(_rows(TASKS / "mc.jsonl")) == 4
    config = run["results"]["config"]  # the entry point resolved to our class
    assert config["model"] == "diffusionvl" and config["model_backend"].startswith(adapter.CLASS_PATH)


def _bounds(model, doc: dict, choice: str, seeds: range) -> list[float]:
    """NELBO estimates of `choice` as the answer (lmms-eval's continuation: ' ' + choice), one per masking seed."""
    from PIL import Image

    with Image.open(TASKS / doc["image"]) as im:
        image = im.convert("RGB")
    batch = encode_scored(model, [Sample(0, "0", doc["question"], [" " + choice])], include_end=False,
                          images=[[image]])
    return [float(nelbo(model, batch, noise_levels(8), torch.Generator().manual_seed(s))[0][0]) for s in seeds]


def test_multiple_choice_picks_the_choice_with_the_clearly_better_bound(run):
    """Each doc pairs a one-word answer with a long unlikely sentence. 'Clearly better': the answer's worst NELBO
    estimate over 4 masking draws is below the sentence's best, so no draw of the estimator could flip the pick;
    the gold answer sits first in some docs and second in others, so picking a position cannot pass."""
    model = load(str(run["model_dir"]))
    docs = _rows(TASKS / "mc.jsonl")
    assert {d["answer"] for d in docs} == {0, 1}
    for doc, logged in zip(docs, run["samples"][MC]):
        gold, other = doc["choices"][doc["answer"]], doc["choices"][1 - doc["answer"]]
        assert max(_bounds(model, doc, gold, range(4))) < min(_bounds(model, doc, other, range(4)))
        losses = [float(loss) for loss, _ in logged["filtered_resps"]]  # the adapter's (loss, is_greedy) pairs
        assert losses[doc["answer"]] == pytest.approx(_bounds(model, doc, gold, range(1))[0], rel=1e-4)
        assert losses[doc["answer"]] < losses[1 - doc["answer"]] and logged["acc"] == 1.0
    assert run["results"]["results"][MC]["acc,none"] == 1.0


def test_generate_until_equals_diffusionvl_eval(run):
    out = run["root"] / "diffusionvl-eval"
    assert main(["eval", "--model", str(run["model_dir"]), "--task", "jsonl", "--data", str(TASKS / "gen.jsonl"),
                 "--prompt-suffix", "", "--steps", str(STEPS), "--max-new-tokens", str(MAX_NEW),
                 "--temperature", "0", "--out", str(out), "--no-progress"]) == 0
    ours = [adapter.cut_until(r["prediction"], ["\n\n"]) for r in _rows(out / "samples.jsonl")]  # the yaml's until
    theirs = [s["filtered_resps"] for s in sorted(run["samples"][GEN], key=lambda s: s["doc_id"])]
    theirs = [t[0] if isinstance(t, list) else t for t in theirs]
    assert len(ours) == 8 and any(ours)
    assert theirs == ours


def test_lmms_eval_models_lists_the_plugin(tmp_path):
    proc = _lmms_eval(["models"], tmp_path, tmp_path / "hf")
    assert proc.returncode == 0 and "diffusionvl" in proc.stdout.split(), proc.stderr[-2000:]


def test_the_bugs_behind_the_shims_are_still_there(monkeypatch, capsys):
    """When one of these fails, lmms-eval fixed that bug: delete the shim named in the message."""
    import lmms_eval.models as models
    from lmms_eval.cli.models_cmd import run_models

    assert not adapter.unwrap_keeps_pairs(), (
        "lmms-eval's unwrap_generation_output keeps (loss, is_greedy) pairs now: remove _survive_unwrap")
    monkeypatch.delitem(models.AVAILABLE_SIMPLE_MODELS, adapter.MODEL_ID)
    run_models(type("Args", (), {"aliases": False})())
    assert "diffusionvl" not in capsys.readouterr().out.split(), (
        "`lmms-eval models` lists entry-point models by itself now: remove the listing shim in manifests()")


def test_multiple_choice_still_takes_the_argmin_of_a_loss():
    """The adapter returns a loss because lmms-eval 0.7.x picks np.argmin; if that changes, so must the sign."""
    from lmms_eval.api.task import ConfigurableTask

    source = inspect.getsource(ConfigurableTask.process_results)
    assert "pred = np.argmin(lls)" in source and "np.argmax(lls)" not in source
