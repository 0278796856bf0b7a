"""Measure how multi-process MiniLLM training scales with the world size: peak memory per rank and tokens/s.

    python examples/scaling.py [--out DIR] [--runs 1,2:ddp,2:fsdp,4:ddp,4:fsdp] [--steps 8] [--device cpu]

Each run is one ``torchrun --standalone --nproc_per_node=W`` launch of this file (one thread per rank), training
MiniLLM (teacher-mixed rollouts, PPO step, single-step KL) on the synthetic task with Llama models whose output
layers are padded to 4,096 rows, so that, as in real models, the decoder layers hold most of the parameters
(FSDP all-gathers one layer at a time; the root unit, embeddings and output layer, is gathered whole):
student hidden 256 x 12 layers (10.0 M parameters, 21 % of them in the root unit), teacher hidden 512 x 8
layers (25.2 M, 17 %). ``W:ddp`` is a DDP student with a replicated teacher, ``W:fsdp`` an FSDP2 student with a
sharded teacher. Global batch: 16 rollouts per round, optimizer steps of 8 sequences (the same for every W).

Reported per run, for the rank that uses most: the peak resident memory during training (Linux VmHWM, reset
after step 1 and read after the last step, so model loading, sharding and the final checkpoint are excluded) and
its part above the rank's memory after importing torch and transformers; the whole run's peak (VmHWM before the
reset and ``ru_maxrss`` at the end: every rank builds the full models before sharding, and rank 0 gathers full
weights and optimizer states to write a checkpoint); the student's and teacher's bytes held per rank, counted
from the local shards (student: parameter, gradient, two AdamW moments in float32 = 16 bytes per parameter;
teacher: 4 bytes); tokens/s = valid response tokens trained per second, all ranks together, from the end of
step 1 to the end of the last step (rollouts included, setup and checkpointing excluded), and the share of that
time spent collecting rollouts (generation, scoring, all-gather; rank 0). Workers run with
``MALLOC_MMAP_THRESHOLD_=131072`` (unless set already) so that resident memory measures live memory.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if importlib.util.find_spec("minillm_fast") is None:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VOCAB = 4096


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _reset_peak() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_since_reset_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def worker(args) -> None:
    rss_imports = _rss_mib()
    import torch
    import torch.distributed as dist

    from minillm_fast.hf import unshadow_hf_kernels
    unshadow_hf_kernels()  # this checkout's root is on sys.path
    from transformers import LlamaForCausalLM  # noqa: F401  (counted in the baseline)

    from minillm_fast.trainer import TrainConfig, synthetic, train
    from minillm_fast.trainer.loop import Run

    torch.set_num_threads(1)
    rss_imports = _rss_mib()
    tok = synthetic.char_tokenizer()
    parallel = args.parallel or "ddp"
    student = synthetic.tiny_llama(VOCAB, hidden=256, layers=12, heads=4, seed=2)
    teacher = synthetic.tiny_llama(VOCAB, hidden=512, layers=8, heads=8, seed=1)
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    events, steady_peak, setup_peak = [], [], []
    original_log_step = Run.log_step

    def timed_log_step(self, values, bar):  # every rank, after every optimizer step
        events.append((self.step, time.perf_counter(), values["num_tokens"]))
        if len(events) == 1:
            setup_peak.append(_peak_since_reset_mib())
            _reset_peak()  # from here on: training only (setup and the first round are behind us)
        elif self.step >= self.cfg.total_steps:
            steady_peak.append(_peak_since_reset_mib())  # before the final checkpoint
        return original_log_step(self, values, bar)

    Run.log_step = timed_log_step
    original_collect, rollout_seconds = Run.collect, []

    def timed_collect(self, examples):  # rollouts: generation, scoring, all-gather
        start = time.perf_counter()
        try:
            return original_collect(self, examples)
        finally:
            if events:  # inside the measured window
                rollout_seconds.append(time.perf_counter() - start)

    Run.collect = timed_collect
    out = Path(args.workdir) / f"w{os.environ.get('WORLD_SIZE', '1')}_{parallel}"
    cfg = TrainConfig(method="minillm", train_data=str(Path(args.workdir) / "train.jsonl"), output_dir=str(out),
                      prompt_template=synthetic.PROMPT_TEMPLATE, prompt_template_with_context=synthetic.PROMPT_TEMPLATE,
                      max_length=48, max_prompt_length=24, num_rollouts=16, rollout_batch_size=8, batch_size=4,
                      grad_accum_steps=2, ppo_epochs=1, total_steps=args.steps, lr=1e-4, warmup_steps=0,
                      save_interval=10_000, keep_checkpoints=1, eval_interval=10_000, backend=args.backend,
                      progress=False, tensorboard=False, rollout_seeding="sequence", device=args.device,
                      parallel=parallel, teacher_sharding="shard" if parallel == "fsdp" else "replicate")
    train(cfg, student=student, teacher=teacher, tokenizer=tok)

    def local_numel(model):
        return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())

    rank = {"rss_peak_mib": max(setup_peak[0], _rss_mib()), "rss_imports_mib": rss_imports,
            "rss_steady_mib": steady_peak[-1],
            "student_state_mib": 16 * local_numel(student) / 2 ** 20,
            "teacher_mib": 4 * local_numel(teacher) / 2 ** 20}
    ranks = [rank]
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, rank)
    if not dist.is_initialized() or dist.get_rank() == 0:
        (first, t0, _), (last, t1, _) = events[0], events[-1]
        tokens = sum(n for step, _, n in events if step > first)
        result = {"world_size": len(ranks), "parallel": parallel if len(ranks) > 1 else "-",
                  "student_params": n_student, "teacher_params": n_teacher, "steps": last - first,
                  "seconds": t1 - t0, "tokens": tokens, "tokens_per_s": tokens / (t1 - t0),
                  "rollout_share": sum(rollout_seconds) / (t1 - t0),
                  "rss_peak_mib": max(r["rss_peak_mib"] for r in ranks),
                  "rss_imports_mib": max(r["rss_imports_mib"] for r in ranks),
                  "rss_steady_mib": max(r["rss_steady_mib"] for r in ranks),
                  "rss_steady_above_imports_mib": max(r["rss_steady_mib"] - r["rss_imports_mib"] for r in ranks),
                  "student_state_mib": max(r["student_state_mib"] for r in ranks),
                  "teacher_mib": max(r["teacher_mib"] for r in ranks)}
        (out / "scaling.json").write_text(json.dumps(result))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="work directory (default: a fresh temporary one)")
    parser.add_argument("--runs", default="1,2:ddp,2:fsdp,4:ddp,4:fsdp", help="W or W:ddp|fsdp, comma-separated")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--parallel", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return 0

    from minillm_fast.trainer import synthetic

    work = Path(args.out or tempfile.mkdtemp(prefix="scaling_"))
    work.mkdir(parents=True, exist_ok=True)
    synthetic.write_jsonl(synthetic.make_records(256, seed=0), work / "train.jsonl")
    # A fixed mmap threshold: glibc then returns every freed block of 128 KiB or more to the OS, so RSS follows
    # live memory. (Its default threshold grows with the blocks freed, after which freed layer-sized buffers stay
    # in the heap: FSDP's gather-and-free of every layer then inflated its RSS by ~300 MiB above DDP's here.)
    env = {"MALLOC_MMAP_THRESHOLD_": "131072", **os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for spec in args.runs.split(","):
        world, _, parallel = spec.partition(":")
        parallel = parallel or "ddp"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}", __file__,
               "--worker", "--workdir", str(work), "--parallel", parallel, "--steps", str(args.steps),
               "--device", args.device, "--backend", args.backend]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        row = json.loads((work / f"w{world}_{parallel}" / "scaling.json").read_text())
        row["launch_s"] = time.perf_counter() - start
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| world size | student / teacher | training peak RSS per rank, MiB (above imports) | whole-run peak RSS "
          "per rank, MiB | student state per rank, MiB | teacher per rank, MiB | tokens/s, all ranks | time in "
          "rollouts |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        layout = "one process" if r["world_size"] == 1 else (
            "DDP / replicated" if r["parallel"] == "ddp" else "FSDP2 / sharded")
        print(f"| {r['world_size']} | {layout} | {r['rss_steady_mib']:.0f} ({r['rss_steady_above_imports_mib']:.0f}) | "
              f"{r['rss_peak_mib']:.0f} | {r['student_state_mib']:.0f} | {r['teacher_mib']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {100 * r['rollout_share']:.0f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
