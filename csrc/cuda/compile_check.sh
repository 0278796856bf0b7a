#!/usr/bin/env bash
# Compile every CUDA kernel source (csrc/cuda/*.cu, not the PyTorch binding) on its own, for sm_80 and sm_90,
# with the flags the JIT build uses (minillm_fast/_extension.py: CUDA_FLAGS). Needs only nvcc: no GPU, no torch.
# Fails on the first error. Usage: bash csrc/cuda/compile_check.sh [extra nvcc flags...]
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
csrc="$(dirname "$here")"
NVCC="${NVCC:-$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")}"
if [ ! -x "$NVCC" ]; then
  echo "compile_check: nvcc not found (set NVCC or CUDA_HOME)" >&2
  exit 2
fi
out="$(mktemp -d "${TMPDIR:-/tmp}/minillm_fast_cuda_check.XXXXXX")"
trap 'rm -rf "$out"' EXIT

shopt -s nullglob
sources=("$here"/*.cu)
if [ ${#sources[@]} -eq 0 ]; then
  echo "compile_check: no .cu files under $here" >&2
  exit 2
fi

"$NVCC" --version | tail -n 1
status=0
for arch in sm_80 sm_90; do
  pids=()
  names=()
  for src in "${sources[@]}"; do
    name="$(basename "$src" .cu)"
    # -Werror all-warnings: a warning in a kernel is treated as a build break too.
    "$NVCC" -std=c++17 -I "$csrc" -O3 --use_fast_math -lineinfo -arch="$arch" -Werror all-warnings \
      -c "$src" -o "$out/${name}_${arch}.o" "$@" > "$out/${name}_${arch}.log" 2>&1 &
    pids+=($!)
    names+=("$name")
  done
  for i in "${!pids[@]}"; do
    if wait "${pids[$i]}"; then
      echo "ok    ${names[$i]}.cu  -arch=$arch"
    else
      echo "FAIL  ${names[$i]}.cu  -arch=$arch"
      cat "$out/${names[$i]}_${arch}.log"
      status=1
    fi
  done
done
exit $status
