"""The trainer's configuration: one flat dataclass whose defaults are the MiniLLM reference hyper-parameters.

Every field has a help string; ``minillm-fast train --help`` prints them all. A run is configured by a YAML file of
``key: value`` pairs and ``key=value`` overrides on the command line (overrides win). Where a default comes from
the reference code (microsoft/LMOps, ``minillm/``), the help string says so.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

METHODS = ("minillm", "sft", "kd", "seqkd", "gkd")
SCHEDULES = ("constant", "cosine", "linear")

# The reference's Dolly prompt (tools/process_data_dolly.py).
DOLLY_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
                "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
DOLLY_PROMPT_WITH_CONTEXT = ("Below is an instruction that describes a task, paired with an input that provides "
                             "further context. Write a response that appropriately completes the request.\n\n"
                             "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")


def _f(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    # --- what to train -------------------------------------------------------------------------------------
    method: str = _f("minillm", "minillm | sft | kd (word-level forward KL mixed with the LM loss) | seqkd (SFT on "
                                "teacher generations) | gkd (on-policy generalised JSD on student samples)")
    student: str = _f("", "student: a Hugging Face model directory or hub name (loaded with AutoModelForCausalLM)")
    teacher: str = _f("", "teacher: same; not needed by sft")
    tokenizer: str = _f("", "tokenizer directory ('' = the student's); a char_tokenizer.json there selects the "
                            "project's CharTokenizer")
    train_data: str = _f("", "prompt/response JSON Lines: instruction, optional context (or input), response "
                             "(or output)")
    eval_data: str = _f("", "held-out JSON Lines, same format ('' = no evaluation)")
    pt_data: str = _f("", "plain-text corpus for MiniLLM's PT loss, documents separated by blank lines ('' = none)")
    output_dir: str = _f("out", "everything the run writes goes here, and nowhere else")
    prompt_template: str = _f(DOLLY_PROMPT, "prompt for records without context ({instruction})")
    prompt_template_with_context: str = _f(DOLLY_PROMPT_WITH_CONTEXT, "prompt for records with a context "
                                                                      "({instruction}, {context})")
    # --- lengths -------------------------------------------------------------------------------------------
    max_length: int = _f(512, "prompt + response tokens (reference 512)")
    max_prompt_length: int = _f(256, "longer prompts keep their last tokens and are counted (reference 256)")
    pt_length: int = _f(512, "tokens per PT-loss block")
    # --- sampling ------------------------------------------------------------------------------------------
    num_rollouts: int = _f(256, "sequences collected per round (reference 256)")
    rollout_batch_size: int = _f(16, "prompts sampled together (the reference's chunk size)")
    alpha: float = _f(0.2, "teacher-mix share: tokens are drawn from (1 - alpha) q + alpha p (reference 0.2)")
    teacher_mix: bool = _f(True, "ablation: False samples from the student alone (alpha = 0)")
    temperature: float = _f(1.0, "tau of sampling and of every loss (reference 1)")
    # --- MiniLLM loss --------------------------------------------------------------------------------------
    clip_eps: float = _f(0.2, "PPO clip range epsilon (reference 0.2)")
    gamma: float = _f(0.95, "discount of the long-term return (reference 0.95)")
    reward_scale: float = _f(0.5, "reward = clip((log p - log q) / reward_scale, +-reward_clip) (reference 0.5)")
    reward_clip: float = _f(100.0, "reward clip (reference 100)")
    length_norm: bool = _f(True, "ablation: divide returns by the number of remaining tokens (the reference "
                                 "always does)")
    whiten: bool = _f(True, "whiten advantages over the valid tokens of each optimizer step's batch")
    single_step: bool = _f(True, "ablation: add the exact single-step reverse KL to the PG loss")
    pt_weight: float = _f(1.0, "weight of the PT loss in the MiniLLM total (reference lm-coef 1)")
    kd_ratio: float = _f(0.5, "lambda: share of word-level distillation in the PT and kd losses (reference 0.5)")
    gkd_beta: float = _f(0.5, "beta of gkd's generalised JSD (0 = forward KL, 1 = reverse KL)")
    # --- optimisation --------------------------------------------------------------------------------------
    total_steps: int = _f(5000, "optimizer steps (reference 5000)")
    ppo_epochs: int = _f(4, "passes over each round's rollouts, minillm only (reference 4)")
    batch_size: int = _f(8, "sequences per micro-batch")
    grad_accum_steps: int = _f(1, "micro-batches per optimizer step; losses use the step's global token count")
    pt_batch_size: int = _f(8, "PT-loss blocks per optimizer step (split over the micro-batches)")
    lr: float = _f(5e-6, "peak learning rate (reference 5e-6)")
    lr_schedule: str = _f("constant", "after warm-up: constant (reference) | cosine | linear, down to min_lr")
    min_lr: float = _f(0.0, "final learning rate of the cosine and linear schedules")
    warmup_steps: int = _f(100, "linear warm-up steps (reference 100)")
    weight_decay: float = _f(1e-6, "AdamW weight decay (the reference PPO trainer's 1e-6)")
    adam_beta1: float = _f(0.9, "AdamW beta1 (reference 0.9)")
    adam_beta2: float = _f(0.95, "AdamW beta2 (reference 0.95)")
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    grad_clip: float = _f(1.0, "global gradient-norm clip (reference 1.0; 0 = off)")
    max_nonfinite_steps: int = _f(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    # --- evaluation, logging, checkpoints ------------------------------------------------------------------
    eval_interval: int = _f(500, "evaluate at the first round boundary after every eval_interval steps")
    eval_at_start: bool = _f(False, "also evaluate before the first step")
    eval_samples: int = _f(256, "held-out prompts used per evaluation (0 = all)")
    eval_batch_size: int = _f(32, "prompts sampled together in evaluation")
    eval_max_new_tokens: int = _f(0, "evaluation response budget (0 = max_length - prompt length)")
    save_interval: int = _f(500, "checkpoint at the first round boundary after every save_interval steps")
    keep_checkpoints: int = _f(2, "newest checkpoints kept (0 = all)")
    resume: str = _f("auto", "auto (continue from the newest checkpoint in output_dir, if any) | never")
    log_interval: int = _f(1, "steps between metrics lines")
    progress: bool = _f(True, "show a tqdm progress bar")
    tensorboard: bool = _f(True, "also log to output_dir/tensorboard when tensorboard is installed")
    # --- runtime -------------------------------------------------------------------------------------------
    seed: int = _f(42, "seeds data order, sampling and evaluation")
    device: str = _f("auto", "auto (cuda when available) | cpu | cuda | cuda:N")
    dtype: str = _f("auto", "model dtype when loading: auto (bfloat16 on GPU, float32 on CPU) | float32 | "
                            "bfloat16 | float16")
    attn_implementation: str = _f("auto", "auto (flash_attention_2 when flash-attn is installed on GPU, else sdpa)")
    backend: str = _f("auto", "minillm_fast kernel backend: auto | cuda | triton | cpu | torch")
    fused_linear: bool = _f(False, "compute the losses from the last hidden states and lm_heads (loss.fused_linear_*): "
                                   "no [B, T, V] logits tensor; not with parallel=fsdp or a sharded teacher")
    # --- several processes (torchrun; ignored in a single process) -----------------------------------------
    parallel: str = _f("ddp", "student under torchrun: ddp (a replica per rank) | fsdp (FSDP2 fully_shard: "
                              "parameters, gradients and AdamW states sharded over the ranks)")
    teacher_sharding: str = _f("auto", "teacher under torchrun (inference only): replicate | shard (FSDP2, one "
                                       "all-gather per layer per forward) | auto (shard when parallel=fsdp)")
    rollout_seeding: str = _f("auto", "sampling noise: stream (one generator for the run) | sequence (one per "
                                      "sequence, seeded by (seed, round, index): rollouts then do not depend on the "
                                      "world size or batching) | auto (stream in one process, else sequence)")

    def __post_init__(self):
        self.validate()

    # --- derived values ------------------------------------------------------------------------------------
    @property
    def sampling_alpha(self) -> float:
        return self.alpha if self.teacher_mix else 0.0

    @property
    def shard_teacher(self) -> bool:
        return self.teacher_sharding == "shard" or (self.teacher_sharding == "auto" and self.parallel == "fsdp")

    @property
    def needs_teacher(self) -> bool:
        return self.method != "sft"

    def validate(self) -> None:
        def need(ok, name, what):
            if not ok:
                raise ValueError(f"config {name}: expected {what}, got {getattr(self, name)!r}")

        for f in fields(self):  # types first, so that YAML's surprises (1e-3 as a string) fail by name
            value, kind = getattr(self, f.name), _field_type(f)
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, f.name, float(value))
            elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"config {f.name}: expected {kind.__name__}, got {value!r}")
        need(self.method in METHODS, "method", f"one of {METHODS}")
        need(self.lr_schedule in SCHEDULES, "lr_schedule", f"one of {SCHEDULES}")
        need(self.resume in ("auto", "never"), "resume", "'auto' or 'never'")
        need(self.parallel in ("ddp", "fsdp"), "parallel", "'ddp' or 'fsdp'")
        need(self.teacher_sharding in ("auto", "replicate", "shard"), "teacher_sharding",
             "'auto', 'replicate' or 'shard'")
        need(self.rollout_seeding in ("auto", "stream", "sequence"), "rollout_seeding",
             "'auto', 'stream' or 'sequence'")
        # FSDP2 keeps the lm_head weights sharded outside the forward, where the fused ops read them.
        need(not (self.fused_linear and self.parallel == "fsdp"), "fused_linear", "false with parallel=fsdp")
        need(not (self.fused_linear and self.teacher_sharding == "shard"), "fused_linear",
             "false with teacher_sharding=shard")
        need(0.0 <= self.alpha < 1.0, "alpha", "a number in [0, 1)")
        need(0.0 <= self.gamma <= 1.0, "gamma", "a number in [0, 1]")
        need(0.0 <= self.kd_ratio <= 1.0, "kd_ratio", "a number in [0, 1]")
        need(0.0 <= self.gkd_beta <= 1.0, "gkd_beta", "a number in [0, 1]")
        for name in ("temperature", "clip_eps", "reward_scale", "reward_clip", "lr", "adam_eps"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) > 0, name, "a finite number > 0")
        for name in ("pt_weight", "min_lr", "weight_decay", "grad_clip"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        for name in ("adam_beta1", "adam_beta2"):
            need(0.0 <= getattr(self, name) < 1.0, name, "a number in [0, 1)")
        for name in ("max_length", "max_prompt_length", "pt_length", "num_rollouts", "rollout_batch_size",
                     "total_steps", "ppo_epochs", "batch_size", "grad_accum_steps", "pt_batch_size",
                     "max_nonfinite_steps", "eval_interval", "eval_batch_size", "save_interval", "log_interval"):
            need(getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "eval_samples", "eval_max_new_tokens", "keep_checkpoints"):
            need(getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.max_prompt_length < self.max_length, "max_prompt_length", f"< max_length ({self.max_length})")
        need(bool(self.output_dir), "output_dir", "a directory")

    # --- I/O -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True, width=120)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"config: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | dict[str, Any] = ()) -> "TrainConfig":
        """Defaults, then the YAML file ``path`` (if given), then ``overrides`` ("key=value" strings or a dict)."""
        values: dict[str, Any] = {}
        if path is not None:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: expected a YAML mapping of config keys, got {type(loaded).__name__}")
            values.update(loaded)
        if isinstance(overrides, dict):
            values.update(overrides)
        else:
            for item in overrides:
                key, sep, text = item.partition("=")
                if not sep or not key:
                    raise ValueError(f"override {item!r}: expected key=value")
                values[key.strip()] = _parse_value(cls, key.strip(), text)
        values = {k: _coerce(cls, k, v) for k, v in values.items()}
        return cls.from_dict(values)

    @classmethod
    def help_text(cls) -> str:
        lines = []
        for f in fields(cls):
            default = f.default if not isinstance(f.default, str) or len(f.default) < 40 else f.default[:37] + "..."
            lines.append(f"  {f.name} ({_field_type(f).__name__}, default {default!r})\n      {f.metadata['help']}")
        return "\n".join(lines)


def _field_type(f) -> type:
    name = f.type if isinstance(f.type, str) else f.type.__name__  # a string under `from __future__ import annotations`
    return {"str": str, "int": int, "float": float, "bool": bool}[name]


def _fields_by_name(cls):
    return {f.name: f for f in fields(cls)}


def _parse_value(cls, key: str, text: str):
    f = _fields_by_name(cls).get(key)
    if f is None or _field_type(f) is str:
        return text
    kind = _field_type(f)
    if kind is bool:
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"override {key}={text}: expected true or false")
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"override {key}={text}: expected {kind.__name__}") from None


def _coerce(cls, key: str, value):
    """YAML reads 1e-3 as a string and 5 as an int: convert what converts losslessly, leave the rest to validate."""
    f = _fields_by_name(cls).get(key)
    if f is None:
        return value
    kind = _field_type(f)
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value
