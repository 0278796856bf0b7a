#!/usr/bin/env bash
# Builds the CPU emulator of the CUDA kernels (see fake_cuda/emu_runtime.h) into OUT_DIR/libminillm_cuda_emu.so:
# every csrc/cuda/*.cu is compiled by the host compiler against the fake CUDA headers, its launches
# `k<<<grid, block, smem, stream>>>(args)` rewritten to `emu_launch(k, grid, block, args)`.
#   bash csrc/cuda/emulator/build.sh OUT_DIR [extra g++ flags, e.g. -fsanitize=address,undefined]
# Then: MINILLM_FAST_CUDA_EMULATOR=OUT_DIR/libminillm_cuda_emu.so pytest tests/test_cuda_backend.py
# (runs the GPU tests on CPU tensors through the emulator; slow: minutes, not seconds).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cuda_dir="$(dirname "$here")"
csrc="$(dirname "$cuda_dir")"
out="${1:?usage: build.sh OUT_DIR [g++ flags]}"
shift
mkdir -p "$out/gen" "$out/obj"
python3 - "$cuda_dir" "$out/gen" <<'PY'
import pathlib, re, sys
cuda_dir, gen = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
launch = re.compile(r'([A-Za-z_][\w:]*(?:<[^;<>]*>)?)<<<([^;]*?)>>>\(([^;]*?)\);')
for src in sorted(cuda_dir.glob("*.cu")):
    text = src.read_text()
    def rewrite(m):
        grid, block = [p.strip() for p in m.group(2).split(",")][:2]
        return f"emu_launch({m.group(1)}, dim3({grid}), dim3({block}), {m.group(3)});"
    text, n = launch.subn(rewrite, text)
    if "<<<" in text:
        sys.exit(f"{src.name}: a kernel launch the emulator cannot rewrite")
    text = text.replace('#include "', f'#include "{cuda_dir}/')
    (gen / (src.stem + ".cpp")).write_text(text)
PY
flags=(-std=c++20 -O1 -g -fPIC -pthread -I"$here/fake_cuda" -I"$csrc" -Wall -Wno-unknown-pragmas "$@")
pids=()
for f in "$out"/gen/*.cpp "$here/emu_api.cpp" "$here/emu_sched.cpp"; do
  g++ "${flags[@]}" -c "$f" -o "$out/obj/$(basename "$f" .cpp).o" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ $status -eq 0 ] || { echo "emulator build failed" >&2; exit 1; }
g++ -shared -pthread "$@" "$out"/obj/*.o -o "$out/libminillm_cuda_emu.so"
echo "$out/libminillm_cuda_emu.so"
