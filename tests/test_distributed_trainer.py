"""Multi-process training on this CPU (gloo): 2-process runs, DDP and FSDP2, against 1-process runs on the same
global batch; resume across world sizes; whitening over ranks; a cheap 4-process run.

One ``torchrun --standalone --nproc_per_node=2`` launch runs this file as a script (``worker`` below): every
scenario in turn, in the same two processes. The 1-process references run in the pytest process. The batch is
laid out so that both see the same micro-batches (global step of 4 sequences = 2 micro-batches of 2 in one
process, 1 micro-batch of 2 per rank), so the results agree to float32 rounding of the cross-rank sums.
A second launch, of 4 processes, checks what needs no model (``small_worker``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm_fast import rl
from minillm_fast.trainer import TrainConfig, checkpoint, synthetic, train
from minillm_fast.trainer.metrics import read_metrics

TOK = synthetic.char_tokenizer()
WORLD = 2


def models():
    return synthetic.tiny_llama(len(TOK), hidden=32, seed=2), synthetic.tiny_llama(len(TOK), hidden=64, seed=1)


def config(data_dir, out, **overrides) -> TrainConfig:
    """Global step of 4 sequences; rollout and evaluation chunks that line up with the ranks' slices."""
    values = dict(train_data=str(Path(data_dir) / "train.jsonl"), eval_data=str(Path(data_dir) / "eval.jsonl"),
                  output_dir=str(out), prompt_template=synthetic.PROMPT_TEMPLATE,
                  prompt_template_with_context=synthetic.PROMPT_TEMPLATE, max_length=40, max_prompt_length=24,
                  pt_length=24, num_rollouts=8, rollout_batch_size=4, batch_size=2, grad_accum_steps=2,
                  pt_batch_size=2, ppo_epochs=1, total_steps=3, lr=1e-3, warmup_steps=0, eval_interval=1000,
                  save_interval=2, keep_checkpoints=0, eval_samples=5, eval_batch_size=2, backend="torch",
                  progress=False, tensorboard=False, rollout_seeding="sequence", device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


MINILLM = dict(method="minillm", pt_data="{data}/pt.txt")
SCENARIOS = {  # name: (config overrides, output directory prepared by the test before the launch or not)
    "minillm_ddp": dict(MINILLM, parallel="ddp"),
    "minillm_fsdp": dict(MINILLM, parallel="fsdp", total_steps=2),  # resumed by one process to step 3
    "minillm_fsdp_from_1proc": dict(MINILLM, parallel="fsdp"),  # resumes the 1-process step-2 checkpoint
    "gkd_ddp_sharded_teacher": dict(method="gkd", parallel="ddp", teacher_sharding="shard", total_steps=2),
}


# ------------------------------------------------------------------------------------------------------------
# The worker: every rank runs this under torchrun
# ------------------------------------------------------------------------------------------------------------

def worker(data_dir: str, work: str) -> None:
    import torch.distributed as dist

    from minillm_fast.trainer.cli import main as cli_main

    torch.set_num_threads(1)
    work, report = Path(work), {}
    for name, overrides in SCENARIOS.items():
        overrides = {k: v.format(data=data_dir) if isinstance(v, str) else v for k, v in overrides.items()}
        student, teacher = models()
        start = time.perf_counter()
        train(config(data_dir, work / name, **overrides), student=student, teacher=teacher, tokenizer=TOK)
        report[name] = time.perf_counter() - start
    rank = dist.get_rank()
    whitening_over_ranks(work)

    # a global batch that does not divide: a clear error on every rank, before any collective
    try:
        train(config(data_dir, work / "indivisible", batch_size=3, grad_accum_steps=1), tokenizer=TOK,
              student=models()[0], teacher=models()[1])
        report["indivisible"] = "no error"
    except ValueError as e:
        report["indivisible"] = str(e)

    # the command line, as torchrun users launch it (models saved by the test); last, since it may tear down
    # the process group it did not create (here: it did not)
    start = time.perf_counter()
    cli_main(["train", str(work / "kd_cli.yaml")])
    report["kd_cli"] = time.perf_counter() - start
    if rank == 0:
        (work / "report.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def whitening_over_ranks(work: Path) -> None:
    """Each rank whitens its slice of one batch with process_group: the result should be the whole batch's
    whitening (the last rank's slice has no valid token)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(8, 12, generator=g) * 3 + 1
    lengths = torch.tensor([7, 1, 12, 3, 5, 9, 0, 0]) if world == 4 else torch.tensor([7, 1, 12, 3, 0, 0, 0, 0])
    mask = torch.arange(12)[None, :] < lengths[:, None]
    k = 8 // world
    local = rl.advantages(rewards[rank * k:(rank + 1) * k], mask[rank * k:(rank + 1) * k],
                          process_group=dist.group.WORLD)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local)
    if rank == 0:
        torch.save({"global": rl.advantages(rewards, mask), "ranks": torch.cat(gathered)},
                   work / f"advantages_{world}.pt")


def small_worker(work: str) -> None:
    """Four processes, nothing that needs transformers: whitening over ranks, and the divisibility error."""
    import torch.distributed as dist

    work = Path(work)
    dist.init_process_group("gloo")
    whitening_over_ranks(work)
    try:
        train(config(work, work / "indivisible", num_rollouts=6), tokenizer=TOK)  # fails before loading models
        message = "no error"
    except ValueError as e:
        message = str(e)
    if dist.get_rank() == 0:
        (work / "report_4.json").write_text(json.dumps({"indivisible": message}))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------------
# The tests
# ------------------------------------------------------------------------------------------------------------

def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone`` (a free port) on this file; fails the test with the workers' output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "WORLD_SIZE", "RANK", "LOCAL_"))}
    repo = str(Path(__file__).resolve().parents[1])  # the package, uninstalled (pytest.ini: pythonpath = .)
    env["PYTHONPATH"] = os.pathsep.join([repo] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", __file__, *args],
                          capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 1-process references (here), then one 2-process launch of every scenario."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dist")
    data = root / "data"
    data.mkdir()
    synthetic.write_jsonl(synthetic.make_records(64, seed=0), data / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_records(16, seed=1), data / "eval.jsonl")
    synthetic.write_text_corpus(synthetic.make_records(32, seed=2), data / "pt.txt")
    one, two = root / "one", root / "two"
    timings = {}
    try:
        for name, overrides in (("minillm", dict(MINILLM, pt_data=str(data / "pt.txt"))),
                                ("gkd", dict(method="gkd", total_steps=2)),
                                ("kd", dict(method="kd"))):
            student, teacher = models()
            start = time.perf_counter()
            train(config(data, one / name, **overrides), student=student, teacher=teacher, tokenizer=TOK)
            timings[name] = time.perf_counter() - start
        # what the 2-process run resumes: the 1-process run's step-2 checkpoint
        shutil.copytree(one / "minillm" / "checkpoints" / "step_00000002",
                        two / "minillm_fsdp_from_1proc" / "checkpoints" / "step_00000002")
        # the command-line run loads saved models
        student, teacher = models()
        for name, model in (("student", student), ("teacher", teacher)):
            model.save_pretrained(two / "models" / name)
            TOK.save(two / "models" / name)
        cfg = config(data, two / "kd_cli", method="kd", student=str(two / "models" / "student"),
                     teacher=str(two / "models" / "teacher"))
        (two / "kd_cli.yaml").write_text(cfg.to_yaml())

        start = time.perf_counter()
        proc = torchrun(WORLD, "full", str(data), str(two))
        timings["launch"] = time.perf_counter() - start
        report = json.loads((two / "report.json").read_text())

        # one process resumes the 2-process FSDP run's step-2 checkpoint to step 3
        shutil.copytree(two / "minillm_fsdp", one / "minillm_from_2proc")
        student, teacher = models()
        train(config(data, one / "minillm_from_2proc", **dict(MINILLM, pt_data=str(data / "pt.txt"))),
              student=student, teacher=teacher, tokenizer=TOK)
    finally:
        torch.set_num_threads(threads)
    print(f"\n1-process references {timings}, 2-process scenarios {report}")
    return {"one": one, "two": two, "stdout": proc.stdout, "report": report}


def final_weights(out) -> dict:
    from safetensors.torch import load_file
    return load_file(checkpoint.latest(out) / checkpoint.WEIGHTS_FILE)


def step_losses(out, key="loss") -> dict:
    return {m["step"]: m[key] for m in read_metrics(out) if key in m}


def weights_at(out, step: int) -> dict:
    from safetensors.torch import load_file
    return load_file(Path(out) / "checkpoints" / f"step_{step:08d}" / checkpoint.WEIGHTS_FILE)


def assert_same_run(run, reference, *, steps):
    """Every step's loss and gradient norm to float32 rounding (AdamW's update hardly depends on the gradient's
    scale: the norm is what shows that gradients are summed over ranks, not averaged), and the final weights."""
    for key in ("loss", "grad_norm"):
        ref, got = step_losses(reference, key), step_losses(run, key)
        assert sorted(got) == list(range(1, steps + 1)), got
        for step, value in got.items():
            assert value == pytest.approx(ref[step], rel=1e-5, abs=1e-7), (key, step, value, ref[step])
    expected = weights_at(reference, steps)
    for key, value in final_weights(run).items():
        torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)


def eval_at(out, step: int) -> dict:
    (line,) = [m for m in read_metrics(out) if "eval/rougeL" in m and m["step"] == step]
    return line


def test_ddp_minillm_matches_one_process(runs):
    """DDP student, replicated teacher, per-sequence seeded teacher-mixed rollouts, PT loss, gradient
    accumulation: every step's loss and the final weights equal the 1-process run's."""
    assert_same_run(runs["two"] / "minillm_ddp", runs["one"] / "minillm", steps=3)
    for key in ("pg_loss", "reg_loss", "pt_loss", "reward", "num_tokens", "clip_fraction", "response_length"):
        ref, got = step_losses(runs["one"] / "minillm", key), step_losses(runs["two"] / "minillm_ddp", key)
        assert got == pytest.approx(ref, rel=1e-5), key
    ref, got = eval_at(runs["one"] / "minillm", 3), eval_at(runs["two"] / "minillm_ddp", 3)
    assert got["eval/rougeL"] == pytest.approx(ref["eval/rougeL"], rel=1e-6)  # distributed evaluation
    assert got["eval/reverse_kl"] == pytest.approx(ref["eval/reverse_kl"], rel=1e-5)


def test_fsdp_minillm_matches_one_process(runs):
    """FSDP2 student and sharded teacher: losses, weights, and a checkpoint gathered into one plain model."""
    assert_same_run(runs["two"] / "minillm_fsdp", runs["one"] / "minillm", steps=2)
    from transformers import AutoModelForCausalLM  # the gathered checkpoint is a plain Hugging Face model
    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint.latest(runs["two"] / "minillm_fsdp"))
    assert reloaded.config.architectures == ["LlamaForCausalLM"]


def test_resume_across_world_sizes(runs):
    """A 2-process FSDP checkpoint resumed by one process, and a 1-process checkpoint resumed by two (FSDP: the
    optimizer state is re-sharded), both continue exactly as the uninterrupted 1-process run."""
    reference = runs["one"] / "minillm"
    for resumed in (runs["one"] / "minillm_from_2proc", runs["two"] / "minillm_fsdp_from_1proc"):
        assert checkpoint.latest(resumed).name == "step_00000003"
        ref, got = step_losses(reference), step_losses(resumed)
        assert got[3] == pytest.approx(ref[3], rel=1e-5)
        for key, value in final_weights(resumed).items():
            torch.testing.assert_close(value, final_weights(reference)[key], rtol=1e-5, atol=1e-6, msg=key)
    # evaluation with an FSDP student and a sharded teacher over slices of 3 and 2 prompts (chunks of 2: the
    # second rank idles through the first's last chunk) equals the 1-process evaluation
    ref, got = eval_at(reference, 3), eval_at(runs["two"] / "minillm_fsdp_from_1proc", 3)
    assert got["eval/rougeL"] == pytest.approx(ref["eval/rougeL"], rel=1e-6)
    assert got["eval/reverse_kl"] == pytest.approx(ref["eval/reverse_kl"], rel=1e-5)


def test_sharded_teacher_with_ddp_student_gkd(runs):
    """gkd: on-policy student samples, sharded teacher (generation in lockstep)."""
    assert_same_run(runs["two"] / "gkd_ddp_sharded_teacher", runs["one"] / "gkd", steps=2)
    ref, got = eval_at(runs["one"] / "gkd", 2), eval_at(runs["two"] / "gkd_ddp_sharded_teacher", 2)
    assert got["eval/reverse_kl"] == pytest.approx(ref["eval/reverse_kl"], rel=1e-5)


def test_command_line_under_torchrun(runs):
    """``minillm-fast train`` under torchrun, models loaded from disk: kd equals the in-memory 1-process run;
    only rank 0 printed the results and wrote the logs."""
    assert_same_run(runs["two"] / "kd_cli", runs["one"] / "kd", steps=3)
    printed = [line for line in runs["stdout"].splitlines() if line.startswith("{")]
    assert len(printed) == 1 and "rougeL" in json.loads(printed[0])
    lines = read_metrics(runs["two"] / "kd_cli")
    assert lines[0]["world_size"] == WORLD and len([m for m in lines if "loss" in m]) == 3  # one writer


def test_whitening_over_ranks_equals_whitening_the_global_batch(runs):
    out = torch.load(runs["two"] / "advantages_2.pt")
    torch.testing.assert_close(out["ranks"], out["global"], rtol=1e-5, atol=1e-6)


def test_four_processes(tmp_path):
    """Whitening over 4 ranks (one without valid tokens), and the error when num_rollouts does not divide."""
    torchrun(4, "small", str(tmp_path))
    out = torch.load(tmp_path / "advantages_4.pt")
    torch.testing.assert_close(out["ranks"], out["global"], rtol=1e-5, atol=1e-6)
    message = json.loads((tmp_path / "report_4.json").read_text())["indivisible"]
    assert "num_rollouts = 6" in message and "world size 4" in message, message


def test_indivisible_global_batch_is_a_clear_error(runs):
    message = runs["report"]["indivisible"]
    assert "batch_size x grad_accum_steps = 3" in message and "world size 2" in message, message


def test_single_process_whitening_is_unchanged():
    """process_group=None is the old code path, bit for bit."""
    g = torch.Generator().manual_seed(1)
    rewards, mask = torch.randn(5, 9, generator=g), torch.rand(5, 9, generator=g) > 0.3
    torch.testing.assert_close(rl.advantages(rewards, mask), rl.advantages(rewards, mask, process_group=None),
                               rtol=0, atol=0)


def test_sequence_seeded_rollouts_do_not_depend_on_batching():
    """Per-row generators and length budgets: each prompt's response is the same alone or batched with others
    (other prompt widths, other rows finishing earlier), which is what makes rollouts world-size independent."""
    from minillm_fast.trainer.data import Example, collate
    from minillm_fast.trainer.parallel import sequence_generators
    from minillm_fast.trainer.rollout import generate, row_budgets

    student, teacher = models()
    cfg = config(".", ".", max_length=30)
    examples = [Example(TOK.encode(text), [], "") for text in ("copy: a b c d e f\n", "sort: b\n", "reverse: c a\n")]

    def rollouts(indices):
        prompts = collate([examples[i] for i in indices], TOK.pad_token_id, with_response=False)
        seq = generate(student, teacher, prompts, source="mixture", max_new_tokens=row_budgets(cfg, prompts),
                       eos_id=TOK.eos_token_id, pad_id=TOK.pad_token_id, alpha=0.2,
                       generator=sequence_generators(cfg.seed, 3, indices, "cpu"), backend="torch")
        return [seq.response[row][seq.mask[row]].tolist() for row in range(len(indices))]

    together = rollouts([0, 1, 2])
    assert [rollouts([i])[0] for i in range(3)] == together
    assert rollouts([2, 0]) == [together[2], together[0]]
    assert len(together[1]) <= 30 - len(examples[1].prompt) and len(set(map(len, together))) > 1


if __name__ == "__main__":
    {"full": worker, "small": small_worker}[sys.argv[1]](*sys.argv[2:])
