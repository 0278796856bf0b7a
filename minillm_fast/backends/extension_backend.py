"""The C++ backends (``cpu`` and ``cuda``): the same five primitives, implemented in ``csrc/`` and reached
through ``torch.ops.minillm_fast.*``; the tensors' device picks the kernel (CPU or CUDA dispatch key)."""
from __future__ import annotations

import torch


class ExtensionBackend:
    """One C++ extension ("cpu" or "cuda") seen as a backend module."""

    def __init__(self, name: str):
        self.name = name
        # The optional primitives (minillm_fast._library.OPTIONAL_SCHEMAS) the extension has, as attributes.
        key = "CPU" if name == "cpu" else "CUDA"
        # The CPU kernels' row_stats / logits_grad / logits_grad_ also read float32 vocabulary-major logits (a
        # transposed [V, ld] buffer) in place, and logits_grad returns dz in that layout for them: the fused-linear
        # ops form their CPU blocks so (``fused_linear.vocab_major_blocks``).
        self.reads_vocab_major = name == "cpu"
        for op in ("logits_grad_", "logits_grad_into", "row_stats_grad", "row_stats_grad_into", "scale_unless_one_",
                   "advise_huge_pages_"):
            if torch._C._dispatch_has_kernel_for_dispatch_key(f"minillm_fast::{op}", key):
                setattr(self, op, getattr(torch.ops.minillm_fast, op))

    @staticmethod
    def row_stats(z, u, tokens, inv_temp):
        return torch.ops.minillm_fast.row_stats(z, u, tokens, inv_temp)

    @staticmethod
    def logits_grad(z, u, tokens, stats, coef, inv_temp):
        return torch.ops.minillm_fast.logits_grad(z, u, tokens, stats, coef, inv_temp)

    @staticmethod
    def jsd_rows(z, u, stats, beta, inv_temp):
        return torch.ops.minillm_fast.jsd_rows(z, u, stats, beta, inv_temp)

    @staticmethod
    def jsd_grad(z, u, stats, jsd, coef, beta, inv_temp):
        return torch.ops.minillm_fast.jsd_grad(z, u, stats, jsd, coef, beta, inv_temp)

    @staticmethod
    def sample_rows(z, u, use_teacher, uniform, inv_temp):
        return torch.ops.minillm_fast.sample_rows(z, u, use_teacher, uniform, inv_temp)
