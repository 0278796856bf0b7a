"""Shared fixtures of the correctness suite (helpers live in ``_helpers.py``).

* ``backend``: every public op is tested on each backend that can run on CPU tensors here: ``torch`` always,
  ``cpu`` when the C++ extension builds, ``triton`` under Triton's interpreter (``TRITON_INTERPRET=1``, set below
  before anything imports triton, unless a CUDA GPU is present). An unavailable backend is skipped with the reason.
* ``fast_backend``: ``torch`` and ``cpu`` only (property-based tests, big vocabularies).
* ``gen``: a ``torch.Generator`` seeded from the test's id (reproducible, different for every test;
  set ``MINILLM_FAST_TEST_SEED`` to draw other inputs).

Triton's interpreter is slow, so a test can thin its parameter matrix on that backend with
``@pytest.mark.triton_subset(param=[allowed values], ...)``: triton cases whose parameters fall outside the
allowed values are deselected at collection (the other backends run the whole matrix).
"""
from __future__ import annotations

import os

import torch  # importing torch does not import triton

if not torch.cuda.is_available():
    # Must happen before triton is imported anywhere: the kernels are decorated at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402

from minillm_fast.hf import unshadow_hf_kernels  # noqa: E402

unshadow_hf_kernels()  # test modules import transformers; pytest.ini puts the checkout's root (and kernels/) on sys.path

from _helpers import ALL_BACKENDS, backend_unavailable_reason  # noqa: E402
# The accuracy helpers live in _helpers.py (importable by test modules); re-exported here for discoverability.
from _helpers import assert_close_rel, grad_tol, loss_tol  # noqa: E402,F401


def _backend_params(names):
    return [pytest.param(n, marks=getattr(pytest.mark, n), id=n) for n in names]


@pytest.fixture(params=_backend_params(ALL_BACKENDS))
def backend(request):
    reason = backend_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture(params=_backend_params(("torch", "cpu")))
def fast_backend(request):
    reason = backend_unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def gen(request) -> torch.Generator:
    base = int(os.environ.get("MINILLM_FAST_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) ^ base) & 0x7FFFFFFF
    return torch.Generator().manual_seed(seed)


def pytest_configure(config):
    for name, doc in (("torch", "runs on the torch backend"), ("cpu", "runs on the cpu (C++) backend"),
                      ("triton", "runs on the triton backend (Triton's interpreter on CPU)"),
                      ("slow", "slower test (large vocabulary, many hypothesis examples); deselect with -m 'not slow'"),
                      ("triton_subset", "triton_subset(param=[values], ...): the triton backend runs only these cases")):
        config.addinivalue_line("markers", f"{name}: {doc}")


def pytest_collection_modifyitems(config, items):
    """Thin the triton backend's parameter matrix where a test asks for it (``triton_subset``)."""
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        marker = item.get_closest_marker("triton_subset")
        if callspec is None or marker is None or callspec.params.get("backend") != "triton":
            keep.append(item)
            continue
        allowed = all(callspec.params[name] in values for name, values in marker.kwargs.items()
                      if name in callspec.params)
        (keep if allowed else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
