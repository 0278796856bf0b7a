"""The training loop (``train``) and what it needs set up around it.

One round of the loop is the paper's algorithm box:

1. collect sequences without gradient: MiniLLM samples from p~ = (1 - alpha) q + alpha p with both models' KV
   caches and scores each sample once (log q_old, importance weight, reward); ``gkd`` samples from the student,
   ``seqkd`` from the teacher; ``sft`` and ``kd`` take the data's responses;
2. optimise: ``ppo_epochs`` passes (one for the other methods) over the collected sequences in shuffled
   optimizer steps of ``batch_size x grad_accum_steps`` sequences; MiniLLM's total is
   pg + reg + pt_weight * PT loss; AdamW, gradient clipping, warm-up then schedule;
3. between rounds: evaluate, checkpoint.

Checkpoints are written between rounds only, so no rollout buffer is ever saved: a resumed run redraws the same
prompts with the same sampling RNG and continues exactly as the uninterrupted run would have. (One exception: the
final checkpoint, written when ``total_steps`` is reached, may fall inside a round; extending a finished run with a
larger ``total_steps`` then starts a new round, dropping the unfinished round's remaining steps.)

Under ``torchrun`` the same loop runs on every rank: each generates a slice of the round's rollouts (all-gathered
afterwards) and trains on a slice of every optimizer step, with global token counts and gradients summed over
ranks, so the updates are those of one process on the same batch; only rank 0 logs and writes checkpoints
(``parallel.py`` explains the rest).
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import checkpoint, parallel
from .config import TrainConfig
from .data import PromptData, Sequences, ShuffledStream, collate, load_prompt_data, load_text_blocks, \
    shuffled_batches
from .evaluate import evaluate
from .metrics import MetricsLog, NullLog
from .models import load_model, output_vocab, resolve_dtype
from .objectives import accumulate_gradients
from .rollout import generate, max_new_tokens, row_budgets, score
from .tokenizer import as_tokenizer, check_same_tokenizer, load_tokenizer

log = logging.getLogger("minillm_fast.trainer")


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite_steps`` consecutive optimizer steps with a non-finite loss or gradient."""


def train(cfg: TrainConfig, *, student=None, teacher=None, tokenizer=None, teacher_tokenizer=None) -> dict:
    """Train ``cfg.student`` (or the model passed) with ``cfg.method``; models passed in are trained in place.

    Returns the last evaluation's metrics (``{}`` without eval data). Resumes from the newest checkpoint in
    ``cfg.output_dir`` when ``cfg.resume == "auto"``.
    """
    run = Run.setup(cfg, student, teacher, tokenizer, teacher_tokenizer)
    student, teacher = run.student, run.teacher
    bar = tqdm(total=cfg.total_steps, initial=run.step, disable=not cfg.progress or not run.dist.is_main,
               desc=f"{cfg.method} train", dynamic_ncols=True)
    try:
        results = run.evaluate() if cfg.eval_at_start and run.step == 0 else {}
        while run.step < cfg.total_steps:
            # 1. Collect this round's sequences (no gradient).
            examples = [run.data.examples[i] for i in run.prompts.take(cfg.num_rollouts)]
            buffer = run.collect(examples)
            # 2. Optimise: shuffled optimizer steps over the buffer, ppo_epochs times (minillm) or once.
            for index in run.step_batches(len(buffer)):
                pt_blocks = run.pt_blocks[run.pt.take(cfg.pt_batch_size)].to(run.device) if run.pt else None
                pt_tokens = pt_blocks[:, 1:].numel() if pt_blocks is not None else None
                if run.dist.enabled:  # this rank's contiguous slice of the step (sizes checked at setup)
                    index = run.dist.shard(index)
                    pt_blocks = run.dist.shard(pt_blocks) if pt_blocks is not None else None
                metrics = accumulate_gradients(cfg, student, teacher, buffer.select(index), pt_blocks,
                                               dist=run.dist, pt_tokens=pt_tokens)
                metrics["grad_norm"] = parallel.grad_norm_value(torch.nn.utils.clip_grad_norm_(
                    student.parameters(), cfg.grad_clip or math.inf))
                if math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]):
                    run.optimizer.step()
                    run.scheduler.step()
                    run.nonfinite = 0
                else:
                    run.skip_nonfinite(metrics)  # reported; raises after max_nonfinite_steps in a row
                run.optimizer.zero_grad(set_to_none=True)
                run.step += 1
                run.log_step(metrics, bar)
                if run.step >= cfg.total_steps:
                    break
            run.round += 1
            # 3. Between rounds: evaluate, checkpoint.
            if run.due(run.last_eval, cfg.eval_interval) and run.eval_examples:
                results = run.evaluate()
            if run.due(run.last_save, cfg.save_interval):
                run.save()
        if run.eval_examples and run.last_eval != run.step:
            results = run.evaluate()
        if run.last_save != run.step:
            run.save()
        return results
    finally:
        bar.close()
        run.metrics.close()


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up from 0 (as transformers' schedules, which the reference uses), then constant, cosine or
    linear decay to ``min_lr`` at ``total_steps``."""
    if step < cfg.warmup_steps:
        return step / max(1, cfg.warmup_steps)
    if cfg.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if cfg.lr_schedule == "cosine" else 1.0 - progress
    floor = cfg.min_lr / cfg.lr
    return floor + (1.0 - floor) * shape


@dataclass
class Run:
    """What the loop carries between rounds. The integers (and the RNG states) are what a checkpoint stores."""

    cfg: TrainConfig
    student: torch.nn.Module  # as trained: wrapped in DDP, or sharded in place by FSDP2, under torchrun
    teacher: torch.nn.Module | None
    tokenizer: object
    device: torch.device
    data: PromptData
    eval_examples: list
    pt_blocks: torch.Tensor | None
    prompts: ShuffledStream
    pt: ShuffledStream | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    dist: parallel.Dist = field(default_factory=parallel.Dist)
    seeding: str = "stream"  # "stream": self.generator draws every rollout; "sequence": one generator per sequence
    metrics: MetricsLog | NullLog | None = None
    step: int = 0
    round: int = 0
    nonfinite: int = 0
    last_eval: int = 0
    last_save: int = 0
    config_yaml: str = field(default="", repr=False)

    @property
    def generating_student(self) -> torch.nn.Module:
        """The model that samples: DDP's inner module (sampling needs no gradient and no communication); a
        sharded model itself (its forwards gather the shards)."""
        return parallel.unwrap(self.student)

    @property
    def lockstep(self):
        return parallel.lockstep_for(self.dist, self.device, self.student, self.teacher)

    # --- the loop's helpers ----------------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, examples) -> Sequences:
        """This round's sequences. Under torchrun each rank generates (and scores) a contiguous slice of the
        prompts, then the slices are all-gathered: every rank returns the whole round."""
        cfg, parts = self.cfg, []
        source = {"minillm": "mixture", "gkd": "student", "seqkd": "teacher"}.get(cfg.method)
        if source is None:  # sft, kd: the data's own responses (no model involved: every rank collates them all)
            for start in range(0, len(examples), cfg.rollout_batch_size):
                parts.append(collate(examples[start:start + cfg.rollout_batch_size],
                                     self.tokenizer.pad_token_id).to(self.device))
            return Sequences.cat(parts, self.tokenizer.pad_token_id)
        student, lockstep = self.generating_student, self.lockstep
        mine = self.dist.shard(range(len(examples)))
        for start in range(0, len(mine), cfg.rollout_batch_size):
            indices = mine[start:start + cfg.rollout_batch_size]
            prompts = collate([examples[i] for i in indices], self.tokenizer.pad_token_id,
                              with_response=False).to(self.device)
            if self.seeding == "stream":
                generator, budget = self.generator, max_new_tokens(cfg, prompts)
            else:  # each sequence's own noise and length budget: the same however prompts are split or batched
                generator = parallel.sequence_generators(cfg.seed, self.round, indices, self.device)
                budget = row_budgets(cfg, prompts)
            seq = generate(student, self.teacher, prompts, source=source,
                           max_new_tokens=budget, eos_id=self.tokenizer.eos_token_id,
                           pad_id=self.tokenizer.pad_token_id, alpha=cfg.sampling_alpha,
                           temperature=cfg.temperature, generator=generator, backend=cfg.backend,
                           lockstep=lockstep)
            parts.append(score(student, self.teacher, seq, cfg) if cfg.method == "minillm" else seq)
        local = Sequences.cat(parts, self.tokenizer.pad_token_id)
        if not self.dist.enabled:
            return local
        gathered = self.dist.all_gather_objects(local.to("cpu"))
        return Sequences.cat(gathered, self.tokenizer.pad_token_id).to(self.device)

    def step_batches(self, n: int):
        """Row indices of each optimizer step of this round: a fresh permutation per epoch, a function of
        (seed, round, epoch) alone so that a resumed run shuffles as the interrupted one did."""
        for epoch in range(self.cfg.ppo_epochs if self.cfg.method == "minillm" else 1):
            seed = (self.cfg.seed * 1_000_003 + self.round) * 1009 + epoch
            yield from shuffled_batches(n, self.cfg.batch_size * self.cfg.grad_accum_steps, seed)

    def due(self, last: int, interval: int) -> bool:
        return self.step // interval > last // interval

    def skip_nonfinite(self, metrics: dict) -> None:
        self.nonfinite += 1
        metrics["skipped"] = 1
        detail = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
        if self.dist.is_main:
            log.warning("step %d: non-finite loss or gradient, step skipped (no update): %s", self.step + 1, detail)
        if self.nonfinite >= self.cfg.max_nonfinite_steps:
            self.metrics.log(self.step + 1, metrics)
            raise NonFiniteLossError(
                f"stopping at step {self.step + 1}: {self.nonfinite} consecutive steps had a non-finite loss or "
                f"gradient ({detail}). Nothing was updated in those steps; the newest checkpoint in "
                f"{self.cfg.output_dir} is the last good state. Check the teacher's and the student's logits "
                f"(NaN/inf), the data, and try a lower lr.")

    def log_step(self, metrics: dict, bar) -> None:
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics["round"] = self.round
        if self.step % self.cfg.log_interval == 0 or metrics.get("skipped"):
            self.metrics.log(self.step, metrics)
        bar.update(1)
        bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "reward", "reg_loss") if k in metrics})

    def evaluate(self) -> dict:
        results = evaluate(self.cfg, self.generating_student, self.teacher, self.eval_examples, self.tokenizer,
                           self.device, seeding=self.seeding, dist=self.dist, lockstep=self.lockstep)
        self.metrics.log(self.step, {f"eval/{k}": v for k, v in results.items()})
        self.last_eval = self.step
        return results

    def save(self) -> Path | None:
        """Every rank calls it (FSDP gathers the full weights and optimizer states to rank 0); rank 0 writes the
        checkpoint atomically; the others wait for it. Returns the checkpoint's path (None off rank 0)."""
        state = {"step": self.step, "round": self.round, "prompt_position": self.prompts.position,
                 "pt_position": self.pt.position if self.pt else 0, "nonfinite": self.nonfinite,
                 "last_eval": self.last_eval, "rng": checkpoint.rng_state(self.generator),
                 "rollout_seeding": self.seeding, "world_size": self.dist.world_size}
        self.last_save = self.step
        state["last_save"] = self.step
        weights = parallel.full_model_state(self.student, self.dist)
        optimizer_state = parallel.full_optimizer_state(self.student, self.optimizer, self.dist)
        path = None
        if self.dist.is_main:
            path = checkpoint.save(self.cfg.output_dir, self.step, student=parallel.unwrap(self.student),
                                   tokenizer=self.tokenizer, optimizer_state=optimizer_state,
                                   scheduler=self.scheduler, trainer_state=state, config_yaml=self.config_yaml,
                                   keep=self.cfg.keep_checkpoints, weights=weights)
        self.dist.barrier()
        return path

    def resume(self, state: dict, path: Path) -> None:
        """Continue from a checkpoint's state (its weights are already in the student: see ``setup``)."""
        parallel.load_optimizer_state(self.student, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.round, self.nonfinite = state["step"], state["round"], state["nonfinite"]
        self.last_eval, self.last_save = state["last_eval"], state["last_save"]
        self.prompts.position = state["prompt_position"]
        if self.pt:
            self.pt.position = state["pt_position"]
        checkpoint.set_rng_state(state["rng"], self.generator)
        if self.dist.is_main:
            log.info("resumed from %s (step %d, written by %d process(es), now %d)", path, self.step,
                     state.get("world_size", 1), self.dist.world_size)

    # --- setup -----------------------------------------------------------------------------------------------
    @classmethod
    def setup(cls, cfg: TrainConfig, student, teacher, tokenizer, teacher_tokenizer) -> "Run":
        cfg.validate()
        output_dir = Path(cfg.output_dir)
        d, device = parallel.init(cfg.device)
        parallel.check_divisible(cfg, d.world_size, uses_pt=bool(cfg.pt_data) and cfg.method == "minillm")
        if d.is_main:
            output_dir.mkdir(parents=True, exist_ok=True)
        dtype = resolve_dtype(cfg.dtype, device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        student = student if student is not None else _load(cfg, "student", device, dtype)
        teacher = teacher if teacher is not None or not cfg.needs_teacher else _load(cfg, "teacher", device, dtype)
        tokenizer = as_tokenizer(tokenizer) if tokenizer is not None else load_tokenizer(cfg.tokenizer or cfg.student)
        if teacher_tokenizer is None and cfg.teacher and _has_tokenizer(cfg.teacher) and \
                Path(cfg.teacher) != Path(cfg.tokenizer or cfg.student):
            teacher_tokenizer = load_tokenizer(cfg.teacher)
        if teacher_tokenizer is not None:
            check_same_tokenizer(tokenizer, as_tokenizer(teacher_tokenizer))
        for name, model in (("student", student), ("teacher", teacher)):
            if model is not None and output_vocab(model) < len(tokenizer):
                raise ValueError(f"the {name}'s output layer has {output_vocab(model)} rows but the tokenizer has "
                                 f"{len(tokenizer)} tokens: they do not belong together")
        student.to(device).eval()  # eval(): no dropout in either phase (gradients still flow)
        if teacher is not None:
            teacher.to(device).eval().requires_grad_(False)

        if not cfg.train_data:
            raise ValueError("config train_data: expected a JSON Lines file of prompt/response records")
        data = load_prompt_data(cfg.train_data, tokenizer, cfg)
        eval_examples = load_prompt_data(cfg.eval_data, tokenizer, cfg).examples if cfg.eval_data else []
        pt_blocks = load_text_blocks(cfg.pt_data, tokenizer, cfg.pt_length) if cfg.pt_data and \
            cfg.method == "minillm" else None
        if d.is_main and (data.truncated_prompts or data.truncated_responses):
            log.warning("%s: %d prompts longer than max_prompt_length=%d were truncated (last tokens kept); "
                        "%d responses were cut to fit max_length=%d", cfg.train_data, data.truncated_prompts,
                        cfg.max_prompt_length, data.truncated_responses, cfg.max_length)

        # The checkpoint to resume: rank 0 looks (after clearing what an interrupted save left), everyone loads it.
        if d.is_main:
            checkpoint.remove_temporaries(output_dir)
        found = d.broadcast_object(checkpoint.latest(output_dir) if d.is_main else None)
        if found is not None and cfg.resume == "never":
            raise ValueError(f"{output_dir} already holds checkpoints ({found.name}); resume=never refuses to "
                             "overwrite them: use resume=auto or another output_dir")
        state = None
        if found is not None:
            if not (Path(found) / checkpoint.STATE_FILE).is_file():
                raise FileNotFoundError(f"rank {d.rank}: cannot read {found}, the checkpoint rank 0 resumes: "
                                        "output_dir must be on a file system every node sees")
            checkpoint.load_weights(student, found)  # before wrapping: any world size, any wrapping
            state = checkpoint.load_state(found)
        seeding = parallel.resolve_seeding(cfg.rollout_seeding, d.world_size,
                                           state.get("rollout_seeding") if state else None)
        if state is not None and state.get("rollout_seeding", "stream") != seeding and d.is_main:
            log.warning("the resumed run drew its rollouts with rollout_seeding=%s; from here on: %s",
                        state.get("rollout_seeding", "stream"), seeding)

        student = parallel.wrap_student(student, cfg.parallel, d, device)
        teacher = parallel.wrap_teacher(teacher, "shard" if cfg.shard_teacher else "replicate", d)
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, cfg))
        run = cls(cfg, student, teacher, tokenizer, device, data, eval_examples, pt_blocks,
                  prompts=ShuffledStream(len(data.examples), cfg.seed),
                  pt=ShuffledStream(len(pt_blocks), cfg.seed + 1) if pt_blocks is not None else None,
                  optimizer=optimizer, scheduler=scheduler,
                  generator=torch.Generator(device=device).manual_seed(cfg.seed), dist=d, seeding=seeding,
                  config_yaml=cfg.to_yaml())
        if state is not None:
            run.resume(state, found)
        if d.is_main:
            checkpoint.write_atomic(checkpoint.inside(output_dir, output_dir / "config.yaml"), run.config_yaml)
            run.metrics = MetricsLog(output_dir, resume_step=run.step if found is not None else None,
                                     tensorboard=cfg.tensorboard)
            if found is None:
                run.metrics.log(0, {"data/train_records": len(data.examples),
                                    "data/eval_records": len(eval_examples),
                                    "data/truncated_prompts": data.truncated_prompts,
                                    "data/truncated_responses": data.truncated_responses,
                                    "data/pt_blocks": 0 if pt_blocks is None else len(pt_blocks),
                                    **({"world_size": d.world_size} if d.enabled else {})})
        else:
            run.metrics = NullLog()
        d.barrier()
        return run


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in
                              ("tokenizer.json", "tokenizer_config.json", "vocab.json", "char_tokenizer.json"))


def _load(cfg: TrainConfig, which: str, device, dtype):
    path = getattr(cfg, which)
    if not path:
        raise ValueError(f"config {which}: expected a model directory or hub name (method {cfg.method!r} needs it)")
    return load_model(path, device, dtype, cfg.attn_implementation)
