#!/usr/bin/env bash
# GPU validation in one run (design.md, "GPU validation in one script").
#
#   bash benchmarks/gpu_check.sh OUT_DIR [WHEEL_DIR]
#
# On a fresh GPU machine with no network: JIT-builds the CUDA extension, runs the GPU tests, a compute-sanitizer
# pass, and the benchmark table; writes logs and results under OUT_DIR. Python packages the machine lacks
# (e.g. liger-kernel) are installed from wheels in WHEEL_DIR (default .whl/) if present, never fetched.
# Budget: about 7-9 minutes on an H100; each step has its own timeout (12 minutes at worst in all: pass a shorter
# list of steps' work, e.g. skip the sanitizer, when the device window is shorter).
set -uo pipefail
OUT_DIR=${1:?usage: gpu_check.sh OUT_DIR [WHEEL_DIR]}
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

step build 180 $PY -c "
import time; t = time.time()
from minillm_fast import _extension, available_backends
assert _extension.load('cuda') is not None, 'CUDA extension failed to build'
print('built in %.0f s; backends:' % (time.time() - t), available_backends())"

step gpu_tests 180 $PY -m pytest -q -rf --tb=short tests/test_gpu_ops.py tests/test_cuda_backend.py tests/test_triton_smoke.py tests/test_gpu_fused_linear.py -p no:cacheprovider

if command -v compute-sanitizer >/dev/null 2>&1; then
  step sanitizer 50 compute-sanitizer --tool memcheck --error-exitcode 9 $PY -c "
import torch, math
from minillm_fast import loss, sampling
for v in (7, 1003, 40000):
    z = torch.randn(5, v, device='cuda', dtype=torch.bfloat16).requires_grad_()
    u = torch.randn(5, v + 3, device='cuda')
    u[:, ::5] = -math.inf
    loss.reverse_kl(z, u, backend='cuda').backward()
    loss.jsd(z, u, beta=0.4, backend='cuda').backward()
    t = torch.randint(0, v, (5,), device='cuda')
    loss.minillm_loss(z, u, t, torch.randn(5, device='cuda'), torch.zeros(5, device='cuda'),
                      torch.ones(5, device='cuda'), mask=None, backend='cuda').loss.backward()
    sampling.sample_mixture(z, u, backend='cuda')
torch.cuda.synchronize(); print('sanitizer run done')"
fi

step benchmark 190 $PY -m benchmarks.run --device cuda --backends cuda,triton --time-limit 150 --out "$OUT_DIR/bench"
step fused_linear_bench 120 $PY -m benchmarks.fused_linear_ops --device cuda
exit $status
