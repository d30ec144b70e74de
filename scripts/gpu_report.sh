#!/usr/bin/env bash
# One call on one CUDA machine (under 8 minutes): the decoding bench (Qwen2.5-7B shape, random weights, bf16,
# batch 1 and 8, prompt 512, 256 new tokens, every case incl. hf_static and reference) and the FlexAttention-vs-SDPA
# training table (Qwen2.5-1.5B shape, 2k / 4k tokens), written to docs/performance-gpu.md with the machine and the
# versions. Runs unattended from a fresh clone (its own .venv through scripts/setup.sh; nothing is downloaded beyond
# the package registry), prints progress, and keeps partial results: every part writes its own file under
# runs/gpu-report as soon as it finishes, and the report is assembled from whatever finished.
#
#   bash scripts/gpu_report.sh            # on the GPU machine
#   bash scripts/gpu_report.sh --smoke    # tiny shapes on the CPU: checks the script itself in a minute or two
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT=runs/gpu-report
REPORT=docs/performance-gpu.md
[ "$SMOKE" = 1 ] && OUT=runs/gpu-report-smoke && REPORT=$OUT/performance-gpu.md
mkdir -p "$OUT"
say() { echo "[gpu-report $(date +%H:%M:%S)] $*"; }

[ -x .venv/bin/python ] || { say "setting up .venv"; bash scripts/setup.sh || exit 1; }
PY=.venv/bin/python

say "machine and versions"
{
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo none)"
  echo "- CPU: $(nproc) cores"
  $PY -c "import torch, transformers, diffusionvl; print(f'- torch {torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, diffusionvl {diffusionvl.__version__}')"
} > "$OUT/machine.md"
cat "$OUT/machine.md"

if [ "$SMOKE" = 1 ]; then
  BENCH=(--shape tiny --device cpu --batch 1 2 --prompt 32 --new-tokens 16 --repeats 1 --warmup 0 --threads 2)
  TRAIN=(--tiny --lengths 64 128 --steps 2 --device cpu)
  LIMIT=300
else
  BENCH=(--shape qwen2.5-7b --batch 1 8 --prompt 512 --new-tokens 256)
  TRAIN=(--lengths 2048 4096)
  LIMIT=270
fi

say "decoding bench (${BENCH[*]})"
timeout "$LIMIT" $PY -m diffusionvl bench "${BENCH[@]}" --decoders hf_ar hf_static ar block_static block_threshold \
  reference full --output "$OUT/bench.json" --markdown --quiet > "$OUT/bench.md" 2> "$OUT/bench.log" \
  || say "bench stopped early (exit $?): the cells finished so far are in $OUT/bench.json"

say "training attention table (${TRAIN[*]})"
timeout "$LIMIT" $PY scripts/bench_train_attention.py "${TRAIN[@]}" --out "$OUT/train_attention.json" \
  > "$OUT/train_attention.md" 2> "$OUT/train_attention.log" \
  || say "training table stopped early (exit $?): see $OUT/train_attention.log"

say "writing $REPORT"
{
  echo "# Performance on a GPU"
  echo
  echo "Produced by \`bash scripts/gpu_report.sh\`$([ "$SMOKE" = 1 ] && echo ' --smoke (tiny shapes on the CPU: a check of the script, not a GPU figure)')."
  echo
  cat "$OUT/machine.md"
  echo
  echo "## Decoding (random weights; tokens/s and ratios measured in the same run)"
  echo
  if [ -s "$OUT/bench.md" ]; then grep -E '^\||^fast vs plain' "$OUT/bench.md"; else echo "Not finished: see $OUT/bench.log."; fi
  echo
  echo "## Training step: FlexAttention BlockMask vs dense-mask SDPA"
  echo
  if [ -s "$OUT/train_attention.md" ]; then cat "$OUT/train_attention.md"; else echo "Not finished: see $OUT/train_attention.log."; fi
} > "$REPORT.tmp" && mv "$REPORT.tmp" "$REPORT"
say "done: $REPORT"
