"""minillm_fast: fused full-vocabulary kernels and a compact trainer for MiniLLM-style distillation.

Public modules: ``loss`` (reverse_kl, forward_kl, jsd, token_stats, minillm_loss, pt_loss), ``sampling``
(sample_mixture), ``rl`` (rewards, advantages). ``available_backends()`` lists what can run here.
"""
from . import _library  # noqa: F401  (defines torch.ops.minillm_fast.* schemas)
from . import loss, rl, sampling
from ._dispatch import available_backends

__all__ = ["loss", "rl", "sampling", "available_backends", "reference"]
__version__ = "0.1.0"
