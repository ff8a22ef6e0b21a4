#!/usr/bin/env bash
# Every GPU measurement of this repository in one command, for a short lease of one H100/H200 (~5 min of GPU time):
#   1. benchmarks/real_size_latency.py      one denoising step of the real-size Qwen-Image 20B, teacher vs merged levels
#   2. benchmarks/real_size_distill_step.py peak memory and time of the real trainer's depth step at real size
#   3. benchmarks/sharded_check.py          the FSDP2-sharded trainer vs the plain one on CUDA (NCCL), fp32 and bf16
#   4. (issue 16) latency with the width maps in float32 (before) against step 1's bf16 maps (merge's default now),
#      the distillation step with a quantised teacher (torchao int8 weight-only, bitsandbytes NF4, GGUF Q8_0), and
#      benchmarks/runtime_check.py: model / sequential CPU offload and inductor regional compilation with an add-on
#      on the GPU (tiny models, ~1 min)
# ONLY=issue16 runs step 4 alone (~6 min of GPU time; all four: ~11 min).
# Each appends its section (command, machine, date) to benchmarks/RESULTS.md; a failing step does not stop the others.
# Results land in $OUT (default runs/gpu): the JSON of each step, the whole log, and the updated RESULTS.md.
#
# Usage (repository root, a Python with torch + CUDA; diffusers etc. installed or on PYTHONPATH):
#   PYTHON=.venv/bin/python benchmarks/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PPCL_NO_PROGRESS=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/gpu_checks.log"
status=0
step() {  # name, then the command; logs its wall time and exit code
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$log"
  local t0=$SECONDS
  "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
  [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee -a "$log"
step latency "$PY" benchmarks/real_size_latency.py --device cuda --repeats 10 --warmup 3 --json "$OUT/real_size_latency.json"
if [ "${ONLY:-}" != issue16 ]; then
  step distill_step "$PY" benchmarks/real_size_distill_step.py --device cuda --json "$OUT/real_size_distill_step.json"
  step sharded "$PY" benchmarks/sharded_check.py --device cuda --json "$OUT/sharded_check.json"
fi
step latency_fp32_maps "$PY" benchmarks/real_size_latency.py --device cuda --repeats 10 --warmup 3 \
  --projection-dtype float32 --json "$OUT/real_size_latency_fp32_maps.json"
for q in int8 nf4 q8_0; do
  step "distill_step_$q" "$PY" benchmarks/real_size_distill_step.py --device cuda --quantize "$q" --checkpointing on \
    --json "$OUT/real_size_distill_step_$q.json"
done
step runtime "$PY" benchmarks/runtime_check.py --device cuda --json "$OUT/runtime_check.json"
cp benchmarks/RESULTS.md "$OUT/RESULTS.md"
exit $status
