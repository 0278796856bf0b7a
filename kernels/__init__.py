"""Triton kernels of minillm_fast (installed as ``minillm_fast.kernels``). The row kernels run one program per row
(launched by ``minillm_fast.backends.triton_backend``); the fused-linear kernels form logit tiles from hidden states
and lm_head weights on chip (launched by ``minillm_fast.backends.triton_fused_linear``). Row-wise math is shared
through ``online_softmax``. The kernels know nothing of autograd or of PyTorch beyond pointers and strides.
Semantics: ``minillm_fast.backends``."""
from .fused_linear import fused_linear_grad_kernel, fused_linear_merge_kernel, fused_linear_stats_kernel
from .jsd import jsd_grad_kernel, jsd_rows_kernel
from .logits_grad import logits_grad_kernel
from .online_softmax import LAUNCH_OPTIONS
from .row_stats import row_stats_kernel
from .sample import sample_rows_kernel

__all__ = ["LAUNCH_OPTIONS", "row_stats_kernel", "logits_grad_kernel", "jsd_rows_kernel", "jsd_grad_kernel",
           "sample_rows_kernel", "fused_linear_stats_kernel", "fused_linear_merge_kernel", "fused_linear_grad_kernel"]
