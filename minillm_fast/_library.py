"""The operator schemas of ``torch.ops.minillm_fast.*``, defined once, here.

The C++ extensions (``minillm_fast._C`` for the CPU, ``minillm_fast._C_cuda`` for CUDA) only *implement* these
schemas for their dispatch key (``TORCH_LIBRARY_IMPL``); defining them in Python keeps one place for the
signatures whichever extension happens to load, and lets us register fake (meta) implementations so that
``torch.compile`` can trace through them. Semantics of each primitive: ``minillm_fast.backends``.
"""
from __future__ import annotations

import torch

from .backends import NUM_STATS

SCHEMAS = {
    "row_stats": "(Tensor z, Tensor u, Tensor? tokens, float inv_temp) -> Tensor",
    "logits_grad": "(Tensor z, Tensor u, Tensor? tokens, Tensor stats, Tensor coef, float inv_temp) -> Tensor",
    "jsd_rows": "(Tensor z, Tensor u, Tensor stats, float beta, float inv_temp) -> Tensor",
    "jsd_grad": "(Tensor z, Tensor u, Tensor stats, Tensor jsd, Tensor coef, float beta, float inv_temp) -> Tensor",
    "sample_rows": "(Tensor z, Tensor u, Tensor use_teacher, Tensor uniform, float inv_temp) -> Tensor",
}

# Optional primitives: a backend may implement them (the CPU extension does); callers fall back without them.
# logits_grad_: logits_grad written into z itself (z is a scratch buffer the caller owns).
OPTIONAL_SCHEMAS = {
    "logits_grad_": "(Tensor(a!) z, Tensor u, Tensor? tokens, Tensor stats, Tensor coef, float inv_temp) -> ()",
}

_LIB = torch.library.Library("minillm_fast", "DEF")
for _name, _schema in {**SCHEMAS, **OPTIONAL_SCHEMAS}.items():
    _LIB.define(_name + _schema)


@torch.library.register_fake("minillm_fast::row_stats")
def _row_stats_fake(z, u, tokens, inv_temp):
    return z.new_empty((z.shape[0], NUM_STATS), dtype=torch.float32)


@torch.library.register_fake("minillm_fast::logits_grad")
def _logits_grad_fake(z, u, tokens, stats, coef, inv_temp):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("minillm_fast::logits_grad_")
def _logits_grad_inplace_fake(z, u, tokens, stats, coef, inv_temp):
    return None


@torch.library.register_fake("minillm_fast::jsd_rows")
def _jsd_rows_fake(z, u, stats, beta, inv_temp):
    return z.new_empty((z.shape[0], 2), dtype=torch.float32)


@torch.library.register_fake("minillm_fast::jsd_grad")
def _jsd_grad_fake(z, u, stats, jsd, coef, beta, inv_temp):
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("minillm_fast::sample_rows")
def _sample_rows_fake(z, u, use_teacher, uniform, inv_temp):
    return z.new_empty((z.shape[0],), dtype=torch.int64)
