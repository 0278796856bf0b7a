"""Smoke-run every trainer method for a few steps on a given device, dtype and kernel backend (tiny random
models, the synthetic task): the one-shot check to include in a GPU validation script.

    python examples/trainer_smoke.py --device cuda --dtype bfloat16 --backend auto --out DIR

Prints one line per method (loss, Rouge-L, reverse KL, seconds) and exits with status 1 if any method fails or
reports a non-finite loss. Everything is written under ``--out``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if importlib.util.find_spec("minillm_fast") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm_fast.trainer import TrainConfig, synthetic, train  # noqa: E402
from minillm_fast.trainer.metrics import read_metrics  # noqa: E402

METHODS = ("minillm", "sft", "kd", "seqkd", "gkd")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="trainer_smoke_"))
    out.mkdir(parents=True, exist_ok=True)
    synthetic.write_jsonl(synthetic.make_records(256, seed=0), out / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_records(32, seed=1), out / "eval.jsonl")
    synthetic.write_text_corpus(synthetic.make_records(64, seed=2), out / "pt.txt")
    tokenizer = synthetic.char_tokenizer()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    print(f"device {device}, dtype {dtype}, backend {args.backend}, torch {torch.__version__}")
    failed = False
    for method in METHODS:
        teacher = synthetic.tiny_llama(len(tokenizer), hidden=128, seed=1).to(device, dtype)
        student = synthetic.tiny_llama(len(tokenizer), hidden=64, seed=2).to(device, dtype)
        cfg = TrainConfig(method=method, train_data=str(out / "train.jsonl"), eval_data=str(out / "eval.jsonl"),
                          pt_data=str(out / "pt.txt"), output_dir=str(out / method),
                          prompt_template=synthetic.PROMPT_TEMPLATE,
                          prompt_template_with_context=synthetic.PROMPT_TEMPLATE, max_length=40,
                          max_prompt_length=24, pt_length=32, num_rollouts=16, rollout_batch_size=16, batch_size=4,
                          grad_accum_steps=2, pt_batch_size=4, total_steps=args.steps, lr=1e-3, warmup_steps=0,
                          eval_samples=32, save_interval=2, device=str(device), backend=args.backend,
                          progress=False, tensorboard=False, resume="never")
        tic = time.time()
        try:
            results = train(cfg, student=student, teacher=teacher, tokenizer=tokenizer)
            losses = [m["loss"] for m in read_metrics(cfg.output_dir) if "loss" in m]
            ok = len(losses) == args.steps and all(isinstance(x, float) and math.isfinite(x) for x in losses)
            failed |= not ok
            print(f"{method:8s} {'ok  ' if ok else 'FAIL'} losses {json.dumps([round(x, 4) for x in losses])} "
                  f"rougeL {results['rougeL']:.1f} reverse_kl {results['reverse_kl']:.4f} {time.time() - tic:.1f}s")
        except Exception:  # report and go on with the other methods
            failed = True
            print(f"{method:8s} FAIL\n{traceback.format_exc()}")
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
