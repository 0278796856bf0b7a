"""The operator schemas of ``torch.ops.minillm_fast.*``, defined once, here.

The C++ extensions (``minillm_fast._C`` for the CPU, ``minillm_fast._C_cuda`` for CUDA) only *implement* these
schemas for their dispatch key (``TORCH_LIBRARY_IMPL``); defining them in Python keeps one place for the
signatures whichever extension happens to load, and lets us register fake (meta) implementations so that
``torch.compile`` can trace through them. Semantics of each primitive: ``minillm_fast.backends``.

Below them, ``backend_row_stats``, ``backend_logits_grad``, ``backend_jsd_rows`` and ``backend_jsd_grad``: the same
primitives run by the backend named in their last argument (whichever language implements it), as Python custom
ops with fake implementations. The public losses call them through ``primitive`` (the op while torch.compile
traces, the backend's function eagerly), so that a loss traces without a graph break (the autograd glue that calls
``logits_grad`` in backward is in ``minillm_fast.loss``).
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

# Optional primitives: a backend may implement them; callers fall back without them (semantics:
# minillm_fast.backends). logits_grad_ (the CPU extension): logits_grad written into z itself (z is a scratch buffer
# the caller owns). The CUDA extension's: logits_grad_into (written into a buffer the caller owns, e.g. in 16 bits),
# row_stats_grad and scale_unless_one_ (row_stats and logits_grad in one call, each row read once from memory, and
# the in-place scaling of its gradient in backward), row_stats_grad_into (the same, dz into a buffer the caller owns).
# advise_huge_pages_ (the CPU extension): ask the kernel for transparent huge pages under a large buffer before its
# first touch (each 4 KiB page fault costs more than the work on it on a VM: the fused-linear ops' CPU buffers).
OPTIONAL_SCHEMAS = {
    "logits_grad_": "(Tensor(a!) z, Tensor u, Tensor? tokens, Tensor stats, Tensor coef, float inv_temp) -> ()",
    "logits_grad_into": "(Tensor z, Tensor u, Tensor? tokens, Tensor stats, Tensor coef, float inv_temp, "
                        "Tensor(a!) out) -> ()",
    "row_stats_grad": "(Tensor z, Tensor u, Tensor? tokens, Tensor coef, Tensor? policy, float clip_eps, "
                      "float inv_temp, ScalarType? grad_dtype) -> (Tensor, Tensor)",
    "row_stats_grad_into": "(Tensor z, Tensor u, Tensor? tokens, Tensor coef, Tensor? policy, float clip_eps, "
                           "float inv_temp, Tensor(a!) out) -> Tensor",
    "scale_unless_one_": "(Tensor(a!) x, Tensor factor) -> ()",
    "advise_huge_pages_": "(Tensor(a!) x) -> ()",
}

_LIB = torch.library.Library("minillm_fast", "DEF")
for _name, _schema in {**SCHEMAS, **OPTIONAL_SCHEMAS}.items():
    _LIB.define(_name + _schema)


@torch.library.register_fake("minillm_fast::row_stats")
def _row_stats_fake(z, u, tokens, inv_temp):
    return z.new_empty((z.shape[0], NUM_STATS), dtype=torch.float32)


def _readable_by_vocab(x) -> bool:
    return (x.dim() == 2 and x.dtype == torch.float32 and (x.shape[0] <= 1 or x.stride(0) == 1)
            and x.stride(1) >= max(1, x.shape[0]))


def grad_is_vocab_major(z, u) -> bool:
    """Whether the CPU kernels read z and u vocabulary-major and return logits_grad's dz so (csrc/cpu/binding.cpp's
    ``by_vocab``, mirrored here for the fake implementation's strides): float32 CPU rows of which at least one is a
    transposed [V, ld] buffer and both can be read as one."""
    def vocab_major(x):
        return _readable_by_vocab(x) and x.shape[1] > 1 and x.stride(1) != 1
    return (z.device.type == "cpu" and (vocab_major(z) or vocab_major(u)) and _readable_by_vocab(z)
            and _readable_by_vocab(u))


@torch.library.register_fake("minillm_fast::logits_grad")
def _logits_grad_fake(z, u, tokens, stats, coef, inv_temp):
    if grad_is_vocab_major(z, u):
        return z.new_empty((z.shape[1], z.shape[0])).t()
    return torch.empty_like(z, memory_format=torch.contiguous_format)


@torch.library.register_fake("minillm_fast::logits_grad_")
def _logits_grad_inplace_fake(z, u, tokens, stats, coef, inv_temp):
    return None


@torch.library.register_fake("minillm_fast::logits_grad_into")
def _logits_grad_into_fake(z, u, tokens, stats, coef, inv_temp, out):
    return None


@torch.library.register_fake("minillm_fast::row_stats_grad")
def _row_stats_grad_fake(z, u, tokens, coef, policy, clip_eps, inv_temp, grad_dtype):
    # The CUDA kernel returns an empty gradient where it has no plan for the rows; a trace assumes it has one.
    stats = z.new_empty((z.shape[0], NUM_STATS), dtype=torch.float32)
    return stats, torch.empty(z.shape, dtype=grad_dtype or z.dtype, device=z.device)


@torch.library.register_fake("minillm_fast::row_stats_grad_into")
def _row_stats_grad_into_fake(z, u, tokens, coef, policy, clip_eps, inv_temp, out):
    return z.new_empty((z.shape[0], NUM_STATS), dtype=torch.float32)


@torch.library.register_fake("minillm_fast::scale_unless_one_")
def _scale_unless_one_fake(x, factor):
    return None


@torch.library.register_fake("minillm_fast::advise_huge_pages_")
def _advise_huge_pages_fake(x):
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


# ----------------------------------------------------------------------------------------------------------
# The primitives as run by a named backend: what the public ops call
# ----------------------------------------------------------------------------------------------------------
# The ops above are the C++ extensions' kernels, one per dispatch key. The four below take the backend's name
# ("auto", "cuda", "triton", "cpu" or "torch") as their last argument and run that backend's primitive, chosen at
# run time for the tensors' device (``_dispatch.get_backend``). Their Python bodies are opaque to torch.compile,
# which sees only the fake implementations: tracing a loss never meets the backend choice (imports, dispatcher
# queries) nor a backend's own Python (the torch backend's chunk loop tests chunks for all-zero coefficients).
# Inputs are those of the primitive (``minillm_fast.backends``): 2-D rows with unit stride along the vocabulary.
# Callers go through ``primitive``, which calls the op only while torch.compile traces.

def primitive(name: str, *args, backend: str):
    """The primitive ``name`` ("row_stats", "logits_grad", "jsd_rows" or "jsd_grad") of backend ``backend`` on
    ``args``: while torch.compile traces, the op ``backend_<name>``; eagerly, the backend's function itself,
    which is what the op's body runs, minus the op's dispatch (tens of microseconds a call, measurable on small
    GPU batches)."""
    if torch.compiler.is_compiling():
        return _BACKEND_OPS[name](*args, backend)
    return getattr(_backend(backend, args[0]), name)(*args)


def _backend(name: str, z: torch.Tensor):
    from . import _dispatch  # here, not at the top: _dispatch imports _extension, which imports this module
    return _dispatch.get_backend(name, z.device)


@torch.library.custom_op("minillm_fast::backend_row_stats", mutates_args=(),
                         schema="(Tensor z, Tensor u, Tensor? tokens, float inv_temp, str backend) -> Tensor")
def backend_row_stats(z, u, tokens, inv_temp, backend):
    return _backend(backend, z).row_stats(z, u, tokens, inv_temp)


@backend_row_stats.register_fake
def _backend_row_stats_fake(z, u, tokens, inv_temp, backend):
    return _row_stats_fake(z, u, tokens, inv_temp)


@torch.library.custom_op("minillm_fast::backend_logits_grad", mutates_args=(),
                         schema="(Tensor z, Tensor u, Tensor? tokens, Tensor stats, Tensor coef, float inv_temp, "
                                "str backend) -> Tensor")
def backend_logits_grad(z, u, tokens, stats, coef, inv_temp, backend):
    return _backend(backend, z).logits_grad(z, u, tokens, stats, coef, inv_temp)


@backend_logits_grad.register_fake
def _backend_logits_grad_fake(z, u, tokens, stats, coef, inv_temp, backend):
    return _logits_grad_fake(z, u, tokens, stats, coef, inv_temp)


@torch.library.custom_op("minillm_fast::backend_jsd_rows", mutates_args=(),
                         schema="(Tensor z, Tensor u, Tensor stats, float beta, float inv_temp, str backend) -> Tensor")
def backend_jsd_rows(z, u, stats, beta, inv_temp, backend):
    return _backend(backend, z).jsd_rows(z, u, stats, beta, inv_temp)


@backend_jsd_rows.register_fake
def _backend_jsd_rows_fake(z, u, stats, beta, inv_temp, backend):
    return _jsd_rows_fake(z, u, stats, beta, inv_temp)


@torch.library.custom_op("minillm_fast::backend_jsd_grad", mutates_args=(),
                         schema="(Tensor z, Tensor u, Tensor stats, Tensor jsd, Tensor coef, float beta, "
                                "float inv_temp, str backend) -> Tensor")
def backend_jsd_grad(z, u, stats, jsd, coef, beta, inv_temp, backend):
    return _backend(backend, z).jsd_grad(z, u, stats, jsd, coef, beta, inv_temp)


@backend_jsd_grad.register_fake
def _backend_jsd_grad_fake(z, u, stats, jsd, coef, beta, inv_temp, backend):
    return _jsd_grad_fake(z, u, stats, jsd, coef, beta, inv_temp)


_BACKEND_OPS = {"row_stats": torch.ops.minillm_fast.backend_row_stats,
                "logits_grad": torch.ops.minillm_fast.backend_logits_grad,
                "jsd_rows": torch.ops.minillm_fast.backend_jsd_rows,
                "jsd_grad": torch.ops.minillm_fast.backend_jsd_grad}
