"""Loading the C++ extensions: prebuilt by ``setup.py`` when torch was present at build time, else compiled
with ninja on first use (``torch.utils.cpp_extension.load``, cached under ``TORCH_EXTENSIONS_DIR``).

A failed build never breaks ``import minillm_fast``: the backend is reported unavailable, the reason is
warned once, and ``backend="auto"`` falls back to the others.
"""
from __future__ import annotations

import glob
import importlib
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch

from . import _library  # noqa: F401  (the schemas must exist before the implementations register)

_PACKAGE_DIR = Path(__file__).resolve().parent


def csrc_dir() -> Path:
    """The C++ sources: shipped inside the package (``minillm_fast/csrc``) or beside it in a source checkout."""
    for candidate in (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise FileNotFoundError("minillm_fast: C++ sources (csrc/) not found next to the package")


def cpu_sources() -> list[str]:
    """Every C++ file of the CPU extension (kernels + binding), plus the Python-module stub."""
    root = csrc_dir()
    return sorted(glob.glob(str(root / "cpu" / "*.cpp"))) + [str(root / "python_module.cpp")]


def cuda_sources() -> list[str]:
    """Every source of the CUDA extension: torch-free kernels (.cu), the binding (.cpp), the module stub."""
    root = csrc_dir()
    cuda = root / "cuda"
    return (sorted(glob.glob(str(cuda / "*.cu"))) + sorted(glob.glob(str(cuda / "*.cpp")))
            + [str(root / "python_module.cpp")])


CPU_CFLAGS = ["-O3", "-fopenmp", "-ffp-contract=fast"]  # the C++ standard: whatever this torch requires
CPU_LDFLAGS = ["-fopenmp"]
CUDA_FLAGS = ["-O3", "--use_fast_math", "-lineinfo"]


def _native_flags() -> list[str]:
    # The JIT build targets this very machine; MINILLM_FAST_PORTABLE=1 gives a generic x86-64 build.
    return [] if os.environ.get("MINILLM_FAST_PORTABLE") else ["-march=native"]


@lru_cache(maxsize=None)
def load(which: str):
    """Import or build extension ``which`` ("cpu" or "cuda"); returns None (and warns once) on failure."""
    module_name = {"cpu": "minillm_fast._C", "cuda": "minillm_fast._C_cuda"}[which]
    try:
        return importlib.import_module(module_name)
    except ImportError:
        pass
    if os.environ.get("MINILLM_FAST_NO_JIT"):
        warnings.warn(f"minillm_fast: {module_name} is not built and MINILLM_FAST_NO_JIT is set; "
                      f"the '{which}' backend is unavailable", RuntimeWarning, stacklevel=3)
        return None
    try:
        from torch.utils import cpp_extension

        if which == "cpu":
            return cpp_extension.load(
                name="minillm_fast_C", sources=cpu_sources(), extra_include_paths=[str(csrc_dir())],
                extra_cflags=CPU_CFLAGS + _native_flags(), extra_ldflags=CPU_LDFLAGS, is_python_module=False,
                verbose=bool(os.environ.get("MINILLM_FAST_VERBOSE_BUILD")))
        if not (torch.cuda.is_available() and torch.version.cuda):
            return None
        return cpp_extension.load(
            name="minillm_fast_C_cuda", sources=cuda_sources(), extra_include_paths=[str(csrc_dir())],
            extra_cflags=["-O3"], extra_cuda_cflags=CUDA_FLAGS, is_python_module=False,
            verbose=bool(os.environ.get("MINILLM_FAST_VERBOSE_BUILD")))
    except Exception as exc:  # noqa: BLE001 - any build failure must leave the package importable
        warnings.warn(f"minillm_fast: could not build the {which} extension ({type(exc).__name__}: "
                      f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}); the '{which}' backend "
                      f"is unavailable and other backends are used instead", RuntimeWarning, stacklevel=3)
        return None
