"""Build for minillm_fast.

* Always installs the Python package, the Triton kernels (folder ``kernels/`` -> ``minillm_fast.kernels``) and the
  C++ sources (``csrc/`` -> ``minillm_fast/csrc``), so the extensions can be JIT-built with ninja on first use.
* When torch is importable at build time (``pip install --no-build-isolation .``), also builds the CPU extension
  ``minillm_fast._C`` ahead of time, and the CUDA extension ``minillm_fast._C_cuda`` when a CUDA toolkit and a
  CUDA build of torch are present. Set MINILLM_FAST_SKIP_BUILD=1 to skip both (JIT only).
"""
import glob
import os

from setuptools import setup

ext_modules, cmdclass = [], {}
try:
    if os.environ.get("MINILLM_FAST_SKIP_BUILD"):
        raise ImportError
    import torch
    from torch.utils import cpp_extension
except ImportError:
    torch = None

if torch is not None:
    native = [] if os.environ.get("MINILLM_FAST_PORTABLE") else ["-march=native"]
    ext_modules.append(cpp_extension.CppExtension(
        "minillm_fast._C",
        sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/python_module.cpp"],
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args=["-O3", "-fopenmp", "-ffp-contract=fast"] + native,
        extra_link_args=["-fopenmp"],
    ))
    if torch.version.cuda and cpp_extension.CUDA_HOME:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext_modules.append(cpp_extension.CUDAExtension(
            "minillm_fast._C_cuda",
            sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")) + ["csrc/python_module.cpp"],
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": ["-O3"],
                                "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
        ))
    cmdclass["build_ext"] = cpp_extension.BuildExtension.with_options(use_ninja=True)

setup(
    name="minillm_fast",
    version="0.1.0",
    description="Fused full-vocabulary kernels and a compact trainer for MiniLLM (reverse-KL) distillation",
    python_requires=">=3.10",
    packages=["minillm_fast", "minillm_fast.backends", "minillm_fast.trainer", "minillm_fast.kernels",
              "minillm_fast.csrc"],
    package_dir={"minillm_fast.kernels": "kernels", "minillm_fast.csrc": "csrc"},
    package_data={"minillm_fast.csrc": ["*.cpp", "*/*.h", "*/*.cuh", "*/*.cpp", "*/*.cu", "*/*.sh"]},
    install_requires=["torch>=2.4", "numpy", "ninja", "tqdm", "pyyaml"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "triton>=3.0", "transformers>=4.45", "safetensors",
                 "pyyaml", "rouge-score"],
        "bench": ["matplotlib", "triton>=3.0"],
        "train": ["transformers>=4.45", "safetensors", "pyyaml", "rouge-score"],
    },
    entry_points={"console_scripts": ["minillm-fast=minillm_fast.trainer.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
