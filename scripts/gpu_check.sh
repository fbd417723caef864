#!/usr/bin/env bash
# GPU checks and benchmarks on one CUDA machine, in about 5-8 minutes; prints every figure.
#
#   make gpu-check                      # or: PYTHON=.venv/bin/python scripts/gpu_check.sh
#   GPU_CHECK_COMPILE=0 make gpu-check  # skip the torch.compile row (it compiles for a minute or two)
#
# 1. the tests marked `gpu` (no host sync in a training step, fused AdamW, bf16 sampling, FSDP where marked);
# 2. training throughput of DiT-B/2 and DiT-XL/2 on 32x32x4 latents at batch 32 (bf16), then XL/2 compiled:
#    step time, images/s, peak memory, TFLOP/s and MFU against the GPU's bf16 peak;
# 3. a tiny pipeline (scikit-learn digits, two experts, the router, sampling) with every job on the GPU;
# 4. the sampling benchmark on that run's ensemble, on the GPU under bf16 autocast;
# 5. the evaluation networks' images/s on the GPU (make bench-eval).
# Logs go to $OUT (or a temporary folder): gpu_check.log holds all of it.
set -uo pipefail

PY=${PYTHON:-python}
HERE=$(cd "$(dirname "$0")/.." && pwd)
LOGDIR=${OUT:-$(mktemp -d)}
RUN=$(mktemp -d)/gpu-tiny
LOG=$LOGDIR/gpu_check.log
mkdir -p "$LOGDIR"
cd "$HERE" || exit 1
export WANDB_MODE=offline HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
failures=()

section() { echo; echo "=== $* ($(date +%T))"; }
step() {  # step NAME SECONDS CMD...: run with a time limit; a failure is noted and the script goes on
  local name=$1 limit=$2; shift 2
  section "$name"
  if ! timeout "$limit" "$@"; then failures+=("$name"); echo "!!! $name failed or ran past ${limit}s"; fi
}

{
  section "device"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'|', torch.cuda.get_device_name(0), '| bf16', torch.cuda.is_bf16_supported())" || { echo "no CUDA device"; exit 1; }

  step "gpu tests" 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
  step "bench_train: DiT-B/2 and DiT-XL/2, 32x32x4, batch 32, bf16" 180 \
    "$PY" scripts/bench_train.py --size DiT-B/2 DiT-XL/2 --image-size 32 --channels 4 --batch 32 --steps 30 --warmup 10
  if [ "${GPU_CHECK_COMPILE:-1}" = 1 ]; then
    step "bench_train: DiT-XL/2 compiled" 300 \
      "$PY" scripts/bench_train.py --size DiT-XL/2 --image-size 32 --channels 4 --batch 32 --steps 30 --warmup 10 --compile
  fi
  step "tiny pipeline on the GPU (digits, K=2)" 300 \
    "$PY" -m ddm pipeline experiment=tiny island=gpu island.num_workers=0 run_dir="$RUN" sample.num_samples=256
  if [ -f "$RUN/samples/record.json" ]; then
    "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); print('samples on', r['device'], 'in', r['wall_s'], 's')" \
      "$RUN/samples/record.json"
    for k in 0 1; do
      "$PY" -c "import json,sys; r=json.load(open(sys.argv[1])); h=r['hardware']; \
print('expert', sys.argv[2], 'trained on', h.get('gpu', 'cpu'), 'in', r['wall_s'], 's, final loss', r['final_loss'])" \
        "$RUN/experts/expert-0$k/record.json" "$k" || true
    done
    step "sampling benchmark on the GPU (bf16)" 120 \
      "$PY" scripts/bench_sampling.py --run "$RUN" --device cuda --n 1000 --steps 20 --repeats 3
  fi

  step "evaluation networks on the GPU (Inception, feature net, router diagnostics, VAE decode)" 150 \
    "$PY" scripts/bench_eval.py

  section "summary"
  if [ ${#failures[@]} -eq 0 ]; then echo "gpu check: all steps passed"; else echo "gpu check: failed: ${failures[*]}"; fi
} 2>&1 | tee "$LOG"
grep -q "all steps passed" "$LOG"
