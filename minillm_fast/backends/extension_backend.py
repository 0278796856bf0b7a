"""The C++ backends (``cpu`` and ``cuda``): the same five primitives, implemented in ``csrc/`` and reached
through ``torch.ops.minillm_fast.*``; the tensors' device picks the kernel (CPU or CUDA dispatch key)."""
from __future__ import annotations

import torch


class ExtensionBackend:
    """One C++ extension ("cpu" or "cuda") seen as a backend module."""

    def __init__(self, name: str):
        self.name = name
        # The optional in-place gradient (see minillm_fast._library.OPTIONAL_SCHEMAS), where the extension has it.
        key = "CPU" if name == "cpu" else "CUDA"
        if torch._C._dispatch_has_kernel_for_dispatch_key("minillm_fast::logits_grad_", key):
            self.logits_grad_ = torch.ops.minillm_fast.logits_grad_

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
