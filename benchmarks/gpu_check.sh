#!/usr/bin/env bash
# GPU validation in one run (design.md, "GPU validation in one script").
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# On a fresh GPU machine with no network: JIT-builds the CUDA extension, runs the GPU tests (incl. torch.compile
# of the cuda and triton backends and the on-chip fused-linear kernels), compute-sanitizer memcheck / racecheck /
# synccheck on a small workload (benchmarks/sanitizer_workload.py), and the benchmark tables; writes logs and
# results under OUT_DIR. Python packages the machine lacks (e.g. liger-kernel) are installed from wheels in
# WHEEL_DIR (default .whl/) if present, never fetched.
# Budget: about 8 minutes on an H100; each step has its own timeout (about 14 minutes at worst in all: pass a
# shorter list of steps' work, e.g. skip the sanitizers, when the device window is shorter).
#
# GPU_CHECK_PLAN=targets: only what the open issues' targets need, most important first: build, the CUDA kernel and
# op tests, the row_stats_grad plan sweep (benchmarks/logits_fused_plans.py: the one-pass kernel and the two passes
# in L2), the logits target (reverse_kl and minillm_loss at [8192, 128256] vs torch.compile), the fused-linear target
# (one shape, blocked vs on-chip), the fused-linear GPU tests, racecheck and synccheck. The fused-linear target also
# runs 4 block configurations (--blocks "n,G": tokens per block and per group, MINILLM_FAST_FUSED_LINEAR_BLOCKS;
# 256,2048 is the default) as ours[n,G] and matmuls-blocked[n,G] rows, 5 timed rounds: about 1 s more a round than
# without them; its limit is 200 s (was 130; the last H100 run of the step without them took 48 s).
set -uo pipefail
OUT_DIR=${1:?usage: [GPU_CHECK_PLAN=targets] gpu_check.sh OUT_DIR [WHEEL_DIR]}
WHEELS=${2:-.whl}
cd "$(dirname "$0")/.."
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/minillm_fast_ext} MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}
status=0
step() {  # step NAME TIMEOUT CMD...: run, log to OUT_DIR/NAME.log, remember failures
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT_DIR/$name.log"
  echo "=== $name: exit $rc"
  [ $rc -eq 0 ] || status=1
}

if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/minillm_site "$WHEELS"/*.whl && \
    export PYTHONPATH="$PYTHONPATH:/tmp/minillm_site"
fi

{ nvidia-smi; $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT_DIR/device.txt" 2>&1
cat "$OUT_DIR/device.txt" | head -20

step build 150 $PY -c "
import time; t = time.time()
from minillm_fast import _extension, available_backends
assert _extension.load('cuda') is not None, 'CUDA extension failed to build'
print('built in %.0f s; backends:' % (time.time() - t), available_backends())"

if [ "${GPU_CHECK_PLAN:-all}" = targets ]; then
  step cuda_kernel_tests 150 $PY -m pytest -q -rf --tb=short tests/test_cuda_backend.py tests/test_gpu_ops.py \
    tests/test_grad_in_pass.py -p no:cacheprovider
  step fused_plans 120 $PY -m benchmarks.logits_fused_plans
  step logits_target 150 $PY -m benchmarks.run --device cuda --ops reverse_kl,minillm_loss --shapes 8192x128256 \
    --modes fwd+bwd --backends cuda,triton --alts compile --time-limit 130 --no-plots --out "$OUT_DIR/bench"
  step fused_linear_target 200 $PY -m benchmarks.fused_linear_ops --device cuda --shapes 8192x4096x128256 \
    --repeats 5 --blocks "256,2048;512,1024;384,1536;512,1536"
  step fused_linear_gpu_tests 110 $PY -m pytest -q -x -rf --tb=short tests/test_gpu_fused_linear.py -p no:cacheprovider
  step racecheck 30 compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m benchmarks.sanitizer_workload cuda
  step synccheck 30 compute-sanitizer --tool synccheck --error-exitcode 9 $PY -m benchmarks.sanitizer_workload cuda
  exit $status
fi

step gpu_tests 180 $PY -m pytest -q -rf --tb=short tests/test_gpu_ops.py tests/test_cuda_backend.py tests/test_triton_smoke.py tests/test_gpu_fused_linear.py tests/test_triton_fused_linear.py tests/test_compile.py::test_gpu_backends_compile -p no:cacheprovider

if command -v compute-sanitizer >/dev/null 2>&1; then
  # memcheck: every kernel (cuda C++ and Triton); racecheck / synccheck: shared-memory hazards and barriers of the
  # hand-written CUDA kernels (Triton's own kernels are left to Triton).
  step sanitizer 60 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -m benchmarks.sanitizer_workload
  step racecheck 45 compute-sanitizer --tool racecheck --error-exitcode 9 $PY -m benchmarks.sanitizer_workload cuda
  step synccheck 45 compute-sanitizer --tool synccheck --error-exitcode 9 $PY -m benchmarks.sanitizer_workload cuda
fi

step benchmark 190 $PY -m benchmarks.run --device cuda --backends cuda,triton --time-limit 150 --out "$OUT_DIR/bench"
step fused_linear_bench 120 $PY -m benchmarks.fused_linear_ops --device cuda
exit $status
