"""Plan sweep of the cuda backend's statistics-and-gradient op (``row_stats_grad``, see
``csrc/cuda/row_stats_grad.cu``) on a GPU: ``reverse_kl`` and ``minillm_loss`` forward+backward at one shape for each
``MINILLM_FAST_FUSED_PLAN`` value ("default": the binding's choice; "off": the losses' own two passes; "S" or "S,K":
the one-pass kernel with S row buffers and K blocks per row; "l2[s][:R]": the two passes chunk by chunk of R rows
held in L2, their kernels chained by programmatic dependent launch unless "l2s"), with the losses' opt-in ``MINILLM_FAST_GRAD_IN_PASS=1`` set, against the
bandwidth floor (6 bytes per bf16 element -- read both rows, write the gradient -- over the measured copy
bandwidth). Each candidate's gradient is checked against the two-pass path's.

    python -m benchmarks.logits_fused_plans [--shape 8192x128256] [--plans "default;off;1;2,8;l2;l2:64"]
"""
from __future__ import annotations

import argparse
import os

import torch

from benchmarks.harness import copy_bandwidth, median_time
from minillm_fast import loss


def _step(op: str, z, u, tokens):
    zz = z.detach().requires_grad_(True)
    if op == "reverse_kl":
        value = loss.reverse_kl(zz, u, backend="cuda")
    else:
        n = z.shape[0]
        ones, zeros = torch.ones(n, device=z.device), torch.zeros(n, device=z.device)
        value = loss.minillm_loss(zz, u, tokens, ones, zeros - 11.0, ones, mask=None, backend="cuda").loss
    value.backward()
    return zz.grad


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8192x128256", help="NxV")
    parser.add_argument("--plans", default="off;l2;l2s;l2:16;l2:24;l2:48;l2:64;default;1,8",
                        help="';'-separated MINILLM_FAST_FUSED_PLAN values: default, off, S (row buffers) or S,K (and "
                        "blocks per row), l2[s][:R] (R rows per chunk; s: kernels not chained)")
    parser.add_argument("--ops", default="reverse_kl,minillm_loss")
    args = parser.parse_args(argv)
    n, v = (int(x) for x in args.shape.split("x"))
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    z = (torch.randn(n, v, device=device, generator=gen) * 2).bfloat16()
    u = (torch.randn(n, v, device=device, generator=gen) * 2).bfloat16()
    tokens = torch.randint(0, v, (n,), device=device, generator=gen)
    bandwidth = copy_bandwidth(device)
    floor_ms = 6 * n * v / bandwidth * 1e3
    print(f"row_stats_grad plans, {torch.cuda.get_device_name()}, [{n}, {v}] bf16, copy bandwidth "
          f"{bandwidth / 1e9:.0f} GB/s, floor {floor_ms:.2f} ms", flush=True)
    saved = os.environ.get("MINILLM_FAST_FUSED_PLAN")
    os.environ[loss.GRAD_IN_PASS_ENV] = "1"  # the losses' opt-in to the one-pass kernel
    try:
        for op in args.ops.split(","):
            os.environ["MINILLM_FAST_FUSED_PLAN"] = "off"
            reference = _step(op, z, u, tokens).float()
            for plan in args.plans.split(";"):
                if plan == "default":
                    os.environ.pop("MINILLM_FAST_FUSED_PLAN", None)
                else:
                    os.environ["MINILLM_FAST_FUSED_PLAN"] = plan
                try:
                    grad = _step(op, z, u, tokens).float()
                    err = ((grad - reference).norm() / reference.norm()).item()
                    del grad
                    t = median_time(lambda: _step(op, z, u, tokens), device) * 1e3
                except Exception as exc:  # noqa: BLE001 - report and go on
                    print(f"{op} plan {plan}: failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                print(f"{op} plan {plan}: {t:.3f} ms = {t / floor_ms:.2f}x floor; grad rel. diff vs two passes "
                      f"{err:.1e}", flush=True)
    finally:
        if saved is None:
            os.environ.pop("MINILLM_FAST_FUSED_PLAN", None)
        else:
            os.environ["MINILLM_FAST_FUSED_PLAN"] = saved


if __name__ == "__main__":
    main()
