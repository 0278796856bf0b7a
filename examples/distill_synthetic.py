"""Distillation on the CPU in a few minutes: a small teacher, a smaller student, every method, one table.

The task is generated here (``minillm_fast.trainer.synthetic``): instructions such as ``reverse: c a d`` or
``sort: h b e`` with space-separated letters as responses, tokenised character by character. Steps:

1. train a teacher (Llama, hidden 128, 2 layers) from scratch with SFT;
2. train the student (hidden 64, 2 layers) briefly with SFT: the common starting point, as in the paper;
3. from that starting point, run each method for the same number of optimizer steps: ``sft`` (more SFT),
   ``kd`` (word-level forward KL + LM loss), ``seqkd`` (SFT on teacher samples), ``gkd`` (on-policy JSD) and
   ``minillm`` (teacher-mixed rollouts, PPO on the reverse KL, PT loss on the task's text);
4. evaluate each on held-out prompts: Rouge-L of sampled responses (x100) and the per-token reverse KL
   KL(student || teacher) on the student's own samples.

Usage: ``python examples/distill_synthetic.py [--workdir DIR] [--steps 120] [--threads 1]``. Everything is
written under ``--workdir`` (default: a fresh temporary directory).
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

if importlib.util.find_spec("minillm_fast") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillm_fast.trainer import TrainConfig, evaluate, synthetic, train  # noqa: E402
from minillm_fast.trainer.data import load_prompt_data  # noqa: E402

METHODS = ("sft", "kd", "seqkd", "gkd", "minillm")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default=None, help="where data, checkpoints and metrics go (default: temp)")
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--init-steps", type=int, default=100, help="SFT steps of the student's starting point")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per method")
    parser.add_argument("--lr", type=float, default=1e-3, help="the student's learning rate, every method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is usually fastest)")
    parser.add_argument("--backend", default="torch", help="minillm_fast backend (auto, cpu, torch, ...)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="minillm_synthetic_"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()

    synthetic.write_jsonl(synthetic.make_records(4000, seed=args.seed), workdir / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_records(128, seed=args.seed + 1), workdir / "eval.jsonl")
    synthetic.write_text_corpus(synthetic.make_records(1000, seed=args.seed + 2), workdir / "pt.txt")
    tokenizer = synthetic.char_tokenizer()
    common = dict(train_data=str(workdir / "train.jsonl"), eval_data=str(workdir / "eval.jsonl"),
                  prompt_template=synthetic.PROMPT_TEMPLATE, prompt_template_with_context=synthetic.PROMPT_TEMPLATE,
                  max_length=40, max_prompt_length=24, pt_length=64, eval_samples=128, eval_batch_size=64,
                  eval_interval=10**9, save_interval=10**9, keep_checkpoints=1, backend=args.backend,
                  tensorboard=False, seed=args.seed, resume="never")

    def config(name, **overrides) -> TrainConfig:
        return TrainConfig(**{**common, "output_dir": str(workdir / name), **overrides})

    # 1. The teacher, from scratch.
    teacher = synthetic.tiny_llama(len(tokenizer), hidden=args.teacher_hidden, layers=2, seed=args.seed + 1)
    train(config("teacher", method="sft", total_steps=args.teacher_steps, lr=3e-3, min_lr=3e-4,
                 lr_schedule="cosine", warmup_steps=20, batch_size=32, num_rollouts=256, rollout_batch_size=256),
          student=teacher, tokenizer=tokenizer)

    # 2. The student's starting point: a little SFT.
    student = synthetic.tiny_llama(len(tokenizer), hidden=args.student_hidden, layers=2, seed=args.seed + 2)
    train(config("student_init", method="sft", total_steps=args.init_steps, lr=args.lr, warmup_steps=10,
                 batch_size=16, num_rollouts=256, rollout_batch_size=256), student=student, tokenizer=tokenizer)
    start = copy.deepcopy(student.state_dict())

    eval_cfg = config("eval")
    held_out = load_prompt_data(eval_cfg.eval_data, tokenizer, eval_cfg).examples
    cpu = torch.device("cpu")
    rows = [(f"teacher (hidden {args.teacher_hidden})", evaluate(eval_cfg, teacher, None, held_out, tokenizer, cpu)),
            ("student start (SFT)", evaluate(eval_cfg, student, teacher, held_out, tokenizer, cpu))]

    # 3. Every method from the same starting point, the same number of steps.
    per_method = {
        "sft": dict(lr=args.lr, batch_size=16, num_rollouts=64),
        "kd": dict(lr=args.lr, batch_size=16, num_rollouts=64),
        "seqkd": dict(lr=args.lr, batch_size=16, num_rollouts=64),
        "gkd": dict(lr=args.lr, batch_size=16, num_rollouts=64),
        "minillm": dict(lr=args.lr, batch_size=16, num_rollouts=64, ppo_epochs=4,
                        pt_data=str(workdir / "pt.txt"), pt_batch_size=4),
    }
    for method in args.methods.split(","):
        student.load_state_dict(start)
        tic = time.time()
        results = train(config(method, method=method, total_steps=args.steps, warmup_steps=10,
                               rollout_batch_size=64, **per_method[method]),
                        student=student, teacher=teacher, tokenizer=tokenizer)
        rows.append((f"{method} ({time.time() - tic:.0f} s)", results))

    # 4. The table.
    print(f"\n{'model':<24} {'Rouge-L':>8} {'rev. KL':>8} {'length':>7}")
    for name, r in rows:
        kl = f"{r['reverse_kl']:8.3f}" if "reverse_kl" in r else f"{'-':>8}"
        print(f"{name:<24} {r['rougeL']:8.1f} {kl} {r['response_length']:7.1f}")
    print(f"\n{len(held_out)} held-out prompts, one sample each at temperature 1; reverse KL per token, nats. "
          f"Total {time.time() - started:.0f} s; outputs in {workdir}")


if __name__ == "__main__":
    main()
