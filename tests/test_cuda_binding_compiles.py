"""The CUDA extension's PyTorch binding (``csrc/cuda/binding.cpp``: argument checks, dispatch, the op registrations)
compiles against this torch's headers and the CUDA toolkit's, on a machine without a GPU: ``g++ -fsyntax-only``.
``csrc/cuda/compile_check.sh`` compiles the kernels themselves, which need no torch; this covers the rest of the
extension, so that a binding error shows in CI rather than in a GPU session's build.

A CPU wheel of torch ships the c10/cuda headers but not the generated ``c10/cuda/impl/cuda_cmake_macros.h``; an
empty stand-in is enough for a syntax check. Skipped without g++ or the CUDA headers.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sysconfig

import pytest
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cuda_include() -> pathlib.Path | None:
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "include" / "cuda_runtime.h").is_file():
            return pathlib.Path(home) / "include"
    return None


@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include() is None, reason="needs g++ and the CUDA headers")
def test_cuda_binding_compiles(tmp_path):
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n")
    includes = [tmp_path, ROOT / "csrc", ROOT / "csrc" / "cuda", *cpp_extension.include_paths(),
                _cuda_include(), sysconfig.get_paths()["include"]]
    cmd = ["g++", "-std=c++20", "-fsyntax-only", "-Werror=return-type", *(f"-I{p}" for p in includes),
           str(ROOT / "csrc" / "cuda" / "binding.cpp")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
