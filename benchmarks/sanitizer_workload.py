"""A small CUDA workload for compute-sanitizer (``benchmarks/gpu_check.sh`` runs it under memcheck, racecheck and
synccheck): every CUDA kernel of the ``cuda`` backend, forward and backward, on odd vocabularies (a scalar tail,
vector loads, split rows, rows split across a cluster), -inf entries and a padded teacher; and the fused-linear ops
on the ``cuda`` (blocked) and ``triton`` (on-chip) paths. Tiny shapes: the sanitizers slow kernels down by 10-100x.

    compute-sanitizer --tool racecheck --error-exitcode 9 python -m benchmarks.sanitizer_workload
"""
import math
import os
import sys

import torch

from minillm_fast import loss, sampling


def logits_ops(backend: str) -> None:
    # (V, teacher padding, row_stats_grad plan): padded teachers have odd row strides (the two-pass kernels, scalar
    # and vector paths); unpadded and opted in, the statistics-and-gradient op: at 40000 the one-pass kernel (rows
    # split across 10-block clusters), and the two passes in L2, 2 rows per chunk (split rows merged by logits_grad).
    for v, pad, plan in ((7, 3, None), (1003, 3, None), (40000, 3, None), (40000, 0, None), (40000, 0, "l2:2")):
        os.environ[loss.GRAD_IN_PASS_ENV] = "1" if pad == 0 else "0"
        if plan:
            os.environ["MINILLM_FAST_FUSED_PLAN"] = plan
        z = torch.randn(5, v, device="cuda", dtype=torch.bfloat16).requires_grad_()
        u = torch.randn(5, v + pad, device="cuda")
        u[:, ::5] = -math.inf
        loss.reverse_kl(z, u, backend=backend).backward()
        loss.jsd(z, u, beta=0.4, backend=backend).backward()
        t = torch.randint(0, v, (5,), device="cuda")
        loss.minillm_loss(z, u, t, torch.randn(5, device="cuda"), torch.zeros(5, device="cuda"),
                          torch.ones(5, device="cuda"), mask=None, backend=backend).loss.backward()
        sampling.sample_mixture(z, u, backend=backend)
        os.environ.pop("MINILLM_FAST_FUSED_PLAN", None)
    os.environ.pop(loss.GRAD_IN_PASS_ENV)


def fused_linear_ops(backend: str) -> None:
    n, h, v = 37, 64, 1003
    hs = torch.randn(n, h, device="cuda", dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(v, h, device="cuda") * h ** -0.5).to(torch.bfloat16).requires_grad_()
    ht = torch.randn(n, h + 32, device="cuda", dtype=torch.bfloat16)
    wt = (torch.randn(v + 5, h + 32, device="cuda") * h ** -0.5).to(torch.bfloat16)
    t = torch.randint(0, v, (n,), device="cuda")
    loss.fused_linear_reverse_kl(hs, w, ht, wt, softcap=(20.0, None), backend=backend).backward()
    # without a soft-cap the cuda path writes dz straight into its 16-bit group buffer (logits_grad_into)
    loss.fused_linear_reverse_kl(hs, w, ht, wt, logit_scale=0.5, backend=backend).backward()
    loss.fused_linear_minillm_loss(hs, w, ht, wt, t, torch.randn(n, device="cuda"), torch.zeros(n, device="cuda"),
                                   torch.ones(n, device="cuda"), mask=None, backend=backend).loss.backward()
    if backend == "cuda":  # opted in: each block's dz written by its statistics' pass (row_stats_grad_into)
        os.environ[loss.GRAD_IN_PASS_ENV] = "1"
        loss.fused_linear_minillm_loss(hs, w, ht, wt, t, torch.randn(n, device="cuda"),
                                       torch.zeros(n, device="cuda"), torch.ones(n, device="cuda"), mask=None,
                                       backend=backend).loss.backward()
        os.environ.pop(loss.GRAD_IN_PASS_ENV)


def main(argv=None) -> None:
    backends = (argv if argv is not None else sys.argv[1:]) or ["cuda", "triton"]
    for backend in backends:
        if backend == "cuda":
            logits_ops(backend)
        fused_linear_ops(backend)
    torch.cuda.synchronize()
    print("sanitizer workload done:", ", ".join(backends))


if __name__ == "__main__":
    main()
