"""Tile sweep of the on-chip fused-linear kernels (``backend="triton"``) on a CUDA GPU: for each tile config
(BLOCK_N, BLOCK_V, BLOCK_K, num_warps, num_stages), the statistics pass and the gradient pass (d hidden and d weight)
at one shape, bf16, with ``triton.testing.do_bench``. TFLOP/s count 2 N V (H_s + H_t) for the statistics and
2 N V (3 H_s + H_t) for the gradient. Configs that exceed the GPU's shared memory are reported, not fatal.

    python -m benchmarks.fused_linear_tiles [--shape 8192x4096x128256] [--configs "128,128,64,8,4;64,128,64,8,3"]
"""
from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

DEFAULT_CONFIGS = "64,128,64,8,3;128,128,64,8,3;128,128,64,8,4;128,128,32,8,4;128,64,64,4,4;256,64,64,8,3"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8192x4096x128256", help="NxHxV (both models alike)")
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="';'-separated BLOCK_N,BLOCK_V,BLOCK_K,warps,stages")
    args = parser.parse_args(argv)
    import triton.testing

    from minillm_fast.backends import triton_fused_linear as tfl
    n, h, v = (int(x) for x in args.shape.split("x"))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def head():
        return SimpleNamespace(hidden=torch.randn(n, h, device="cuda", generator=gen).bfloat16(),
                               weight=(torch.randn(v, h, device="cuda", generator=gen) * h ** -0.5).bfloat16(),
                               bias=None, logit_scale=None, softcap=None)
    student, teacher = head(), head()
    coef = torch.zeros(n, 4, device="cuda")
    coef[:, 0] = 1.0 / n  # reverse KL's gradient (c_kl): both tiles recomputed
    print(f"on-chip fused-linear tiles, {torch.cuda.get_device_name()}, N={n} H={h} V={v} bf16", flush=True)
    for text in args.configs.split(";"):
        cfg = tfl.TileConfig(*(int(x) for x in text.split(",")))
        tfl.CONFIG["stats_16bit"] = tfl.CONFIG["grad_16bit"] = cfg
        try:
            stats = tfl.row_stats(student, teacher, None, 1.0)
            t_stats = triton.testing.do_bench(lambda: tfl.row_stats(student, teacher, None, 1.0), warmup=2, rep=3)
            t_grad = triton.testing.do_bench(lambda: tfl.logits_grad_pullback(
                student, teacher, None, stats, coef, 1.0, needs=(True, True, False)), warmup=1, rep=3)
        except Exception as exc:  # noqa: BLE001 - e.g. OutOfResources: report and go on
            print(f"{text}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
            continue
        print(f"{text}: stats {t_stats:.1f} ms ({2 * n * v * 2 * h / t_stats / 1e9:.0f} TFLOP/s), "
              f"grad {t_grad:.1f} ms ({2 * n * v * 4 * h / t_grad / 1e9:.0f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
