#!/usr/bin/env bash
# The GPU figures in one unattended call on one CUDA machine (about 9 minutes; GPU_REPORT_SECONDS caps the parts,
# default 540): the decoding bench (Qwen2.5-7B shape, random weights, bf16, prompt 512, 256 new tokens) and the
# FlexAttention-vs-SDPA training table (Qwen2.5-1.5B shape, 2k / 4k tokens). The parts run most important first,
# each in its own process under its own time limit, and each keeps what it measured when cut short:
#   b1          block static and threshold vs transformers generate (hf_ar), batch 1, + the fast-vs-plain check
#   b8          the same at batch 8
#   train       the training-step table
#   anchors-b1  transformers generate with a static cache (+ its compile), the reference-style loop, our AR and
#               full diffusion, batch 1
#   anchors-b8  the same at batch 8 without full diffusion (about 2 minutes alone there)
# Everything lands in runs/gpu-report/ (report performance-gpu.md, one JSON per part, bench.png, log.txt); the
# report is also copied to docs/performance-gpu.md. It is assembled from whatever finished.
#
# Python: python3 (or $PYTHON) when it imports a CUDA-enabled torch and transformers (--smoke: any torch), running
# this checkout from source (PYTHONPATH=src: nothing installed, nothing fetched); else .venv when it exists; else
# scripts/setup.sh makes .venv, only when pip can reach a package index. Nothing else is ever installed.
#
#   bash scripts/gpu_report.sh            # on the GPU machine
#   bash scripts/gpu_report.sh --smoke    # tiny shapes on the CPU, into runs/gpu-report-smoke: checks this script
set -uo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  "") SMOKE=0; OUT=runs/gpu-report; BUDGET=${GPU_REPORT_SECONDS:-540} ;;
  --smoke) SMOKE=1; OUT=runs/gpu-report-smoke; BUDGET=${GPU_REPORT_SECONDS:-900} ;;
  *) echo "usage: bash scripts/gpu_report.sh [--smoke]" >&2; exit 2 ;;
esac
LOG=$OUT/log.txt
START=$SECONDS
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
rm -rf "$OUT" && mkdir -p "$OUT" || exit 1
say() { echo "[gpu-report $(date +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# What the report imports (the package's dependencies; no server, no gguf, no lmms-eval); CUDA unless --smoke.
CHECK='import importlib.util as u, sys
if sys.version_info < (3, 11): sys.exit(f"Python {sys.version.split()[0]}; diffusionvl needs 3.11+")
need = "torch transformers accelerate peft safetensors tokenizers numpy PIL yaml rich tqdm".split()
missing = [m for m in need if u.find_spec(m) is None]
if missing: sys.exit("lacks " + ", ".join(missing))
import torch
if sys.argv[1] == "0" and not torch.cuda.is_available(): sys.exit(f"torch {torch.__version__} sees no CUDA device")'

# usable PY: true when PY can run the report, else one line saying what it lacks.
usable() {
  local why
  command -v "$1" >/dev/null || { say "not $1: no such command"; return 1; }
  why=$("$1" -c "$CHECK" "$SMOKE" 2>&1 >/dev/null) && return 0
  say "not $1: ${why##*$'\n'}"
  return 1
}

# Sets PY: python3 from source, else .venv, else a new .venv where pip can reach an index.
pick_python() {
  local base=${PYTHON:-python3}
  if usable "$base"; then PY=$base; say "Python: $base ($(command -v "$base")), this checkout from source"; return 0; fi
  if [ -x .venv/bin/python ]; then usable .venv/bin/python && PY=.venv/bin/python && say "Python: .venv"; return; fi
  if [ "$SMOKE" = 0 ] && ! nvidia-smi -L >/dev/null 2>&1; then
    say "no CUDA device here (nvidia-smi finds none): not running scripts/setup.sh; --smoke runs on a CPU"
    return 1
  fi
  if ! timeout 60 "$base" -m pip index versions torch >/dev/null 2>&1; then
    say "no .venv, and pip cannot reach a package index: not running scripts/setup.sh"
    return 1
  fi
  say "setting up .venv (scripts/setup.sh; output in $LOG)"
  bash scripts/setup.sh >>"$LOG" 2>&1 || { say "scripts/setup.sh failed: see $LOG"; return 1; }
  usable .venv/bin/python && PY=.venv/bin/python && say "Python: the new .venv"
}

# part NAME CAP CMD...: CMD under the smaller of CAP and the budget left; stdout to the console and the log.
part() {
  local name=$1 cap=$2 left limit rc
  shift 2
  left=$((BUDGET - (SECONDS - START)))
  limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then say "$name: skipped, the time budget (GPU_REPORT_SECONDS=$BUDGET) is spent"; return; fi
  say "$name: up to ${limit}s"
  echo "\$ $*" >>"$LOG"
  timeout -k 10 "$limit" "$@" 2>>"$LOG" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  if [ "$rc" = 0 ]; then say "$name: done"; return; fi
  say "$name: stopped (exit $rc, 124 = time limit): kept what it finished; see $LOG"
  STOPPED+=("$name")
}
STOPPED=()

pick_python || { say "error: no Python here can run the report (above: what each lacks)"; exit 1; }
{
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    echo none)"
  echo "- CPU: $(OMP_NUM_THREADS= nproc) cores"
  "$PY" -c "import sys, torch, transformers, diffusionvl as d; print(f'- Python {sys.version.split()[0]}, torch \
{torch.__version__} (CUDA {torch.version.cuda}), transformers {transformers.__version__}, diffusionvl \
{d.__version__} from {d.__path__[0]}')"
} >"$OUT/machine.md" 2>>"$LOG"
tee -a "$LOG" <"$OUT/machine.md"

if [ "$SMOKE" = 1 ]; then
  MODEL=(--shape tiny --device cpu --prompt 16 --new-tokens 16 --threads 1)
  B1=1 B8=2 CAP=300
  TIMING=(--warmup 0 --repeats 1) ANCHOR_TIMING=(--warmup 0 --repeats 1)
  TRAIN=(--tiny --lengths 64 128 --steps 1 --warmup 1 --device cpu)
else
  MODEL=(--shape qwen2.5-7b --prompt 512 --new-tokens 256)
  B1=1 B8=8 CAP=150
  TIMING=(--warmup 1 --repeats 3) ANCHOR_TIMING=(--warmup 1 --repeats 2)
  TRAIN=(--lengths 2048 4096)
fi
bench() {
  local name=$1 cap=$2
  shift 2
  part "$name" "$cap" "$PY" -m diffusionvl bench "${MODEL[@]}" --plot false --quiet \
    --output "$OUT/bench-$name.json" "$@"
}
bench b1 "$CAP" --batch "$B1" --decoders hf_ar block_static block_threshold "${TIMING[@]}"
bench b8 "$CAP" --batch "$B8" --decoders hf_ar block_static block_threshold --agreement false "${TIMING[@]}"
part train "$CAP" "$PY" scripts/bench_train_attention.py "${TRAIN[@]}" --out "$OUT/train_attention.json"
bench anchors-b1 $((CAP + 50)) --batch "$B1" --decoders hf_static reference ar full --agreement false \
  "${ANCHOR_TIMING[@]}"
bench anchors-b8 $((CAP + 50)) --batch "$B8" --decoders hf_static reference ar --agreement false "${ANCHOR_TIMING[@]}"

REPORT=$OUT/performance-gpu.md
"$PY" scripts/gpu_report_assemble.py --dir "$OUT" --bench b1 b8 anchors-b1 anchors-b8 --report "$REPORT" \
  $([ "$SMOKE" = 1 ] && echo --smoke) 2>>"$LOG" | tee -a "$LOG"
[ -s "$REPORT" ] || { say "error: the report was not written: see $LOG"; exit 1; }
[ "$SMOKE" = 1 ] || cp "$REPORT" docs/performance-gpu.md
say "done in $((SECONDS - START))s: $REPORT$([ "$SMOKE" = 1 ] || echo ' (and docs/performance-gpu.md)')"
[ ${#STOPPED[@]} = 0 ] || { say "parts stopped early: ${STOPPED[*]} (exit status 1)"; exit 1; }
