#!/usr/bin/env bash
# One lent-GPU session of benchmarks, in priority order, each step in its own process with its own time limit, so a
# failure or a time-out loses only that step. Run from the repository root on a machine with one NVIDIA GPU and
# JAX (CUDA), flax, optax, orbax, chex, torch, transformers and timm installed; packages missing there can be given
# as wheels in .whl/ (installed into /tmp/site). Results (JSON + logs) go to $OUT (default: benchmarks/gpu).
#
#   bash benchmarks/gpu_session.sh [TOTAL_SECONDS=540]
# Dry run on a CPU: NO_WHEELS=1 CONFIG=stage2:tiny VAE_BATCHES=1 OUT=/tmp/gpu_dry bash benchmarks/gpu_session.sh 400
# $OUT receives at most 6 files: steps.log (environment + every step's output) and one JSON report per step.
set -uo pipefail
TOTAL=${1:-540}
CONFIG=${CONFIG:-stage2}
OUT=${OUT:-benchmarks/gpu}
mkdir -p "$OUT"
LOG="$OUT/steps.log"
START=$(date +%s)
left() { echo $(( TOTAL - ($(date +%s) - START) )); }

if [[ -z "${NO_WHEELS:-}" ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
export PYTHONUNBUFFERED=1
# JAX and PyTorch share the GPU in the torch step: no up-front 75% grab by JAX.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Compilations are shared between the steps' processes (the init and the sampler recur).
export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex", "grain", "ml_collections", "torch",
             "transformers", "timm", "diffusers"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # noqa: BLE001 - report and go on
        print(name, "MISSING", type(e).__name__, e)
import jax
print(jax.devices())
EOF

step() {  # step NAME MAX_SECONDS COMMAND...
  local name=$1 max=$2; shift 2
  local budget; budget=$(left)
  (( budget > max )) && budget=$max
  if (( budget < 30 )); then echo "== $name: skipped (no time left)"; return; fi
  echo "== $name (limit ${budget}s, $(left)s left): $*" | tee -a "$LOG"
  local t0; t0=$(date +%s)
  timeout -s INT -k 10 "$budget" "$@" > "/tmp/$name.log" 2>&1
  local rc=$?
  cat "/tmp/$name.log" >> "$LOG"
  echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
  grep -E "^\[bench\]|^\| [a-z0-9]|[A-Za-z]*Error|^error|Traceback" "/tmp/$name.log" | tail -60
}

B="python3 -m launch.bench"
J="--out_dir=$OUT"
# 1. The 1.3B stage-2 train step (bf16 compute, fp32 master weights, AdamW + EMA, REPA), 48 examples per step; the
#    default attention "auto" is cuDNN flash attention on an NVIDIA GPU. Three more steps run under jax.profiler:
#    the log gets the step's kernel time by kind of work, by model scope and the top kernels (the trace itself stays
#    in /tmp/profile on the machine: too large to bring back).
step train 240 $B train --config=$CONFIG --config.batch_size=48 --steps=5 --warmup=2 --profile_dir=/tmp/profile $J \
  --note="one GPU, batch 48 in the 14:80:6 phase, profiled"
# 2. The same step with the layers unrolled (scan_layers=False): its compiled program moves 844 GB of HBM a step
#    instead of 1,138 (no stacking of the saved activations) and needs 68 GiB instead of 85 (roofline.py on the
#    H200-compiled programs: bound 435.6 vs 497.0 ms). (remat "dots" compiles to the same program as dots_no_batch
#    here, so it is not worth a step.)
step train_unrolled 200 $B train --config=$CONFIG --config.batch_size=48 --config.model.scan_layers=False --steps=5 \
  --warmup=2 $J --note="one GPU, batch 48, layers unrolled"
# 3. 30-step CFG-2 sampling of 384x384 latents, prompt cache on and off, with attention "auto".
step sample 170 $B sample --config=$CONFIG --batch_sizes=1,32 --reps=2 $J --note="one GPU, 1.3B, 128-token prompts"
# 4. The same work in PyTorch eager on the same GPU (train batch 8: torch's eager activations and JAX's pool share it).
step torch 200 $B torch --config=$CONFIG --config.batch_size=8 --batch_sizes=32 --reps=2 --steps=3 --warmup=1 $J \
  --note="one GPU, 1.3B; torch bf16 weights + AdamW state, SDPA attention"
# 5. SDXL-VAE encode/decode throughput at 384^2.
step vae 60 $B vae --config=$CONFIG --batch_sizes=${VAE_BATCHES:-1,16} --reps=3 $J --note="one GPU, random weights"
echo "== done in $(( $(date +%s) - START ))s" | tee -a "$LOG"
ls -la "$OUT"
