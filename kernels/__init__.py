"""Triton kernels of minillm_fast (installed as ``minillm_fast.kernels``): one program per row, row-wise math shared
through ``online_softmax``. The kernels know nothing of autograd or of PyTorch beyond pointers and strides; the
launch wrapper is ``minillm_fast.backends.triton_backend``. Semantics: ``minillm_fast.backends``."""
from .jsd import jsd_grad_kernel, jsd_rows_kernel
from .logits_grad import logits_grad_kernel
from .row_stats import row_stats_kernel
from .sample import sample_rows_kernel

__all__ = ["row_stats_kernel", "logits_grad_kernel", "jsd_rows_kernel", "jsd_grad_kernel", "sample_rows_kernel"]
