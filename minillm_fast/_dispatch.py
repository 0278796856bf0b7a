"""Backend selection: which implementation of the row primitives runs for a given name and device."""
from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

from . import _extension

BACKENDS = ("cuda", "triton", "cpu", "torch")


@lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        importlib.import_module("triton")
        return True
    except ImportError:
        return False


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_available(name: str, device: torch.device | None = None) -> bool:
    """Whether backend ``name`` can run on ``device`` (None: on any device of this machine)."""
    on_cuda = device is not None and device.type == "cuda"
    on_cpu = device is not None and device.type == "cpu"
    if name == "torch":
        return True
    if name == "cpu":
        return not on_cuda and _extension.load("cpu") is not None and _registers_kernels("CPU")
    if name == "triton":
        if not _triton_importable():
            return False
        if on_cpu or (device is None and not torch.cuda.is_available()):
            return _triton_interpreted()
        return torch.cuda.is_available()
    if name == "cuda":
        return (not on_cpu and torch.cuda.is_available() and _extension.load("cuda") is not None
                and _registers_kernels("CUDA"))
    return False


@lru_cache(maxsize=None)
def _registers_kernels(dispatch_key: str) -> bool:
    """Whether every primitive has a kernel for ``dispatch_key`` (a loaded but partial extension does not count)."""
    from ._library import SCHEMAS
    return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"minillm_fast::{op}", dispatch_key) for op in SCHEMAS)


def available_backends() -> list[str]:
    """Names of the backends that can run on this machine, fastest first ("torch" is always there)."""
    return [name for name in BACKENDS if is_available(name)]


# Fastest first, per device type, as measured by benchmarks/ (see the README's table).
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def get_backend(name: str, device: torch.device):
    """The backend object for ``name`` on ``device``; ValueError naming ``backend`` if it cannot run there."""
    if name == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if is_available(candidate, device):
                return _module(candidate)
        return _module("torch")
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if not is_available(name, device):
        raise ValueError(f"backend: {name!r} is not available for tensors on {device} "
                         f"(available on this machine: {available_backends()})")
    return _module(name)


def check_backend(name, device: torch.device) -> str:
    """``name`` if it names a backend that can run on ``device`` (ValueError naming ``backend`` otherwise).

    The public ops keep the name and resolve it on each primitive call (``_library.primitive``). While
    torch.compile traces, only the spelling is checked here: whether the backend can run is found by importing
    modules and querying the dispatcher, which dynamo cannot trace; the primitives' ops find it out when the
    compiled graph runs, and raise the same ValueError."""
    if not isinstance(name, str):
        raise ValueError(f"backend: expected a string, got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: expected one of 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")
    if not torch.compiler.is_compiling():
        get_backend(name, device)
    return name


@lru_cache(maxsize=None)
def _module(name: str):
    if name == "torch":
        from .backends import torch_backend
        return torch_backend
    if name == "triton":
        from .backends import triton_backend
        return triton_backend
    from .backends.extension_backend import ExtensionBackend
    return ExtensionBackend(name)
