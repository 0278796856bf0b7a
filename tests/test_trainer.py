"""End-to-end tests of minillm_fast.trainer on the CPU with tiny Llama models and the synthetic letters task."""
from __future__ import annotations

import json
import math
import weakref

import pytest
import torch

import minillm_fast
from transformers import LlamaForCausalLM  # noqa: F401  (the first import takes seconds: pay it at collection)

from minillm_fast.trainer import DataError, NonFiniteLossError, TrainConfig, train
from minillm_fast.trainer import checkpoint, synthetic
from minillm_fast.trainer.cli import main as cli_main
from minillm_fast.trainer.data import Example, collate, load_prompt_data, response_mask
from minillm_fast.trainer.metrics import read_metrics
from minillm_fast.trainer.models import response_logits
from minillm_fast.trainer.rollout import generate
from minillm_fast.trainer.tokenizer import CharTokenizer

TOK = synthetic.char_tokenizer()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot on a busy machine (spinning workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    synthetic.write_jsonl(synthetic.make_records(64, seed=0), d / "train.jsonl")
    synthetic.write_jsonl(synthetic.make_records(16, seed=1), d / "eval.jsonl")
    synthetic.write_text_corpus(synthetic.make_records(32, seed=2), d / "pt.txt")
    return d


def models(teacher_scale: float = 1.0):
    teacher = synthetic.tiny_llama(len(TOK), hidden=64, seed=1)
    with torch.no_grad():  # a peaked teacher: its distributions are far from the random student's
        teacher.lm_head.weight.mul_(teacher_scale)
    return synthetic.tiny_llama(len(TOK), hidden=32, seed=2), teacher


def config(data_dir, out, **overrides) -> TrainConfig:
    values = dict(train_data=str(data_dir / "train.jsonl"), eval_data=str(data_dir / "eval.jsonl"),
                  output_dir=str(out), prompt_template=synthetic.PROMPT_TEMPLATE,
                  prompt_template_with_context=synthetic.PROMPT_TEMPLATE, max_length=40, max_prompt_length=24,
                  pt_length=24, num_rollouts=8, rollout_batch_size=8, batch_size=4, pt_batch_size=2,
                  ppo_epochs=1, total_steps=2, lr=1e-3, warmup_steps=0, eval_interval=1000, save_interval=1000,
                  eval_samples=8, backend="torch", progress=False, tensorboard=False)
    values.update(overrides)
    return TrainConfig(**values)


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# Configuration and CLI
# ------------------------------------------------------------------------------------------------------------

def test_defaults_are_the_reference_hyper_parameters():
    c = TrainConfig()
    assert (c.method, c.alpha, c.clip_eps, c.gamma, c.reward_scale, c.reward_clip) == ("minillm", 0.2, 0.2, 0.95,
                                                                                       0.5, 100.0)
    assert (c.ppo_epochs, c.lr, c.warmup_steps, c.adam_beta1, c.adam_beta2, c.grad_clip) == (4, 5e-6, 100, 0.9,
                                                                                             0.95, 1.0)
    assert (c.kd_ratio, c.pt_weight, c.max_length, c.max_prompt_length, c.num_rollouts) == (0.5, 1.0, 512, 256, 256)
    assert (c.temperature, c.lr_schedule, c.total_steps, c.teacher_mix, c.length_norm, c.single_step) == (
        1.0, "constant", 5000, True, True, True)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: kd\nlr: 1e-4\nbatch_size: 4\n")  # YAML reads 1e-4 as a string: coerced
    c = TrainConfig.load(path, ["lr=3e-3", "teacher_mix=false", "ppo_epochs=2"])
    assert (c.method, c.lr, c.batch_size, c.teacher_mix, c.ppo_epochs, c.sampling_alpha) == ("kd", 3e-3, 4, False,
                                                                                            2, 0.0)
    with pytest.raises(ValueError, match="did you mean 'alpha'"):
        TrainConfig.load(None, ["alpah=0.1"])
    with pytest.raises(ValueError, match="alpha"):
        TrainConfig.load(None, ["alpha=1.0"])
    with pytest.raises(ValueError, match="method"):
        TrainConfig.load(None, ["method=ppo"])


def test_cli_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for key, default in [("alpha", "0.2"), ("clip_eps", "0.2"), ("gamma", "0.95"), ("lr", "5e-06"),
                         ("warmup_steps", "100"), ("kd_ratio", "0.5"), ("ppo_epochs", "4")]:
        assert f"  {key} (" in out and f"default {default}" in out


def test_cli_trains_from_saved_models(data_dir, tmp_path, capsys):
    student, teacher = models()
    for name, model in (("student", student), ("teacher", teacher)):
        model.save_pretrained(tmp_path / name)
        TOK.save(tmp_path / name)
    cfg = config(data_dir, tmp_path / "out", student=str(tmp_path / "student"), teacher=str(tmp_path / "teacher"))
    (tmp_path / "run.yaml").write_text(cfg.to_yaml())
    assert cli_main(["train", str(tmp_path / "run.yaml"), "total_steps=1", "method=kd"]) == 0
    assert "rougeL" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert checkpoint.latest(tmp_path / "out").name == "step_00000001"


def test_different_tokenizers_are_refused(data_dir, tmp_path):
    student, teacher = models()
    other = CharTokenizer(list(reversed(TOK.chars)))
    with pytest.raises(ValueError, match="tokenizers differ"):
        train(config(data_dir, tmp_path), student=student, teacher=teacher, tokenizer=TOK, teacher_tokenizer=other)


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

def test_batch_layout_left_padded_prompts_right_padded_responses():
    eos, pad = TOK.eos_token_id, TOK.pad_token_id
    seq = collate([Example([5, 6, 7], [8, eos], "x"), Example([9], [10, 11, 12, eos], "y")], pad)
    assert seq.prompt.tolist() == [[5, 6, 7], [pad, pad, 9]]
    assert seq.prompt_mask.tolist() == [[True] * 3, [False, False, True]]
    assert seq.response.tolist() == [[8, eos, pad, pad], [10, 11, 12, eos]]
    assert seq.mask.tolist() == [[True, True, False, False], [True] * 4]  # the EOS is a valid target
    inputs = seq.model_inputs()  # logits of input positions [P-1, L-1) predict the response
    assert inputs["input_ids"].tolist() == [[5, 6, 7, 8, eos, pad], [pad, pad, 9, 10, 11, 12]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]]
    # after the first EOS everything is masked, even when the pad id is the EOS id
    assert response_mask(torch.tensor([[3, eos, eos, eos], [eos, 4, eos, 5]]), eos).tolist() == [
        [True, True, False, False], [True, False, False, False]]


def test_records_prompt_truncation_and_context(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "copy: a b", "response": "a b"}) + "\n\n"
                    + json.dumps({"instruction": "sort: " + "h " * 30, "input": "abc", "output": "a"}) + "\n")
    cfg = TrainConfig(prompt_template="{instruction}\n", prompt_template_with_context="{instruction}:{context}\n",
                      max_length=40, max_prompt_length=24)
    data = load_prompt_data(path, TOK, cfg)
    assert data.truncated_prompts == 1 and len(data.examples) == 2
    first, second = data.examples
    assert TOK.decode(first.prompt) == "copy: a b\n" and first.response == TOK.encode("a b") + [TOK.eos_token_id]
    assert len(second.prompt) == 24 and TOK.decode(second.prompt).endswith(":abc\n")  # the end is kept


@pytest.mark.parametrize("line, message", [
    ('{"instruction": "copy: a", "response": "a"', "not valid JSON"),
    ('["a list"]', "expected a JSON object"),
    ('{"instruction": "copy: a"}', "missing field 'response'"),
    ('{"instruction": 3, "response": "a"}', "'instruction' must be a string"),
])
def test_malformed_record_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"instruction": "copy: a", "response": "a"})
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(DataError, match=rf"bad\.jsonl:3: .*{message}"):
        load_prompt_data(path, TOK, TrainConfig(max_length=40, max_prompt_length=24))


# ------------------------------------------------------------------------------------------------------------
# Rollouts
# ------------------------------------------------------------------------------------------------------------

def test_cached_sampling_matches_one_scoring_pass():
    """Logits seen step by step through the KV caches (left-padded prompts) equal the scoring pass's."""
    student, teacher = models()
    student.eval(), teacher.eval()
    seen = []
    hook = student.lm_head.register_forward_hook(lambda m, i, o: seen.append(o[:, -1].detach().clone()))
    prompts = collate([Example(TOK.encode("copy: a b c\n"), [], ""), Example(TOK.encode("sort: b\n"), [], "")],
                      TOK.pad_token_id, with_response=False)
    seq = generate(student, teacher, prompts, source="mixture", max_new_tokens=12, eos_id=TOK.eos_token_id,
                   pad_id=TOK.pad_token_id, alpha=0.2, generator=torch.Generator().manual_seed(0), backend="torch")
    hook.remove()
    with torch.no_grad():
        full = response_logits(student, seq)
    assert full.shape[1] == seq.response.shape[1] == len(seen)
    for t, step_logits in enumerate(seen):
        rows = seq.mask[:, t]
        torch.testing.assert_close(full[rows, t], step_logits[rows], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["minillm", "sft", "kd", "seqkd", "gkd"])
def test_every_method_trains(data_dir, tmp_path, method):
    student, teacher = models()
    before = weights(student)
    cfg = config(data_dir, tmp_path, method=method, pt_data=str(data_dir / "pt.txt"), grad_accum_steps=2,
                 batch_size=2)
    results = train(cfg, student=student, teacher=teacher, tokenizer=TOK)
    assert 0 <= results["rougeL"] <= 100 and math.isfinite(results["reverse_kl"])
    steps = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)
    if method == "minillm":
        assert {"pg_loss", "reg_loss", "pt_loss", "reward", "clip_fraction"} <= set(steps[0])
    assert any(not torch.equal(before[k], v) for k, v in weights(student).items())
    assert checkpoint.latest(tmp_path).name == "step_00000002"


def test_gpt2_models_with_dropout_configured(data_dir, tmp_path):
    """Another architecture (learned absolute positions: left padding must not shift them), whose config asks for
    dropout 0.1: the student must run without it in both phases, so on the first PPO step, before any update and
    without teacher mixing (w = 1), every ratio q_theta / q_old is 1 and nothing is clipped."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2(width, seed):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(GPT2Config(vocab_size=len(TOK), n_embd=width, n_layer=2, n_head=4, n_positions=64,
                                          bos_token_id=TOK.eos_token_id, eos_token_id=TOK.eos_token_id))

    student, teacher = gpt2(32, 2), gpt2(64, 1)
    train(config(data_dir, tmp_path, total_steps=1, batch_size=8, teacher_mix=False, clip_eps=0.01),
          student=student, teacher=teacher, tokenizer=TOK)
    (step,) = [m for m in read_metrics(tmp_path) if "loss" in m]
    assert step["clip_fraction"] == 0.0 and math.isfinite(step["loss"]) and not student.training


@pytest.mark.parametrize("method", ["minillm", "kd"])
def test_padded_vocabularies_that_differ(data_dir, tmp_path, method):
    """Output layers of 97 (student) and 101 (teacher) rows over a 21-token tokenizer: distributions are compared
    over the first 97 columns; samples beyond the tokenizer decode to nothing."""
    student = synthetic.tiny_llama(97, hidden=32, seed=2)
    teacher = synthetic.tiny_llama(101, hidden=64, seed=1)
    results = train(config(data_dir, tmp_path, method=method), student=student, teacher=teacher, tokenizer=TOK)
    assert math.isfinite(results["reverse_kl"]) and all(math.isfinite(m["loss"]) for m in read_metrics(tmp_path)
                                                        if "loss" in m)


def test_minillm_lowers_the_held_out_reverse_kl(data_dir, tmp_path):
    torch.manual_seed(0)
    student, teacher = models(teacher_scale=20.0)
    cfg = config(data_dir, tmp_path, total_steps=6, lr=3e-3, batch_size=8, ppo_epochs=2, eval_at_start=True,
                 eval_samples=16)
    train(cfg, student=student, teacher=teacher, tokenizer=TOK)
    kl = [m["eval/reverse_kl"] for m in read_metrics(tmp_path) if "eval/reverse_kl" in m]
    assert len(kl) == 2 and kl[1] < 0.92 * kl[0], kl


@pytest.mark.parametrize("method,backend", [("minillm", "fast"), ("sft", "fast"), ("kd", "fast"), ("gkd", "fast"),
                                            ("minillm", "triton")])
def test_fused_linear_trains_like_the_logits_path(data_dir, tmp_path, method, backend):
    """fused_linear=True (losses from hidden states and lm_heads, PT loss included for MiniLLM) takes the same
    steps as the logits path: same losses, same weights after two steps (float32 rounding). Padded vocabularies
    that differ, and a tied student embedding, exercise the head handling. backend="triton" (interpreted): the
    fused-linear losses run on the on-chip kernels."""
    if backend == "triton":
        from _helpers import backend_unavailable_reason
        if backend_unavailable_reason("triton"):
            pytest.skip(backend_unavailable_reason("triton"))
    else:
        backend = "cpu" if minillm_fast.available_backends().count("cpu") else "torch"
    runs = []
    for fused in (False, True):
        student = synthetic.tiny_llama(97, hidden=32, seed=2)
        teacher = synthetic.tiny_llama(101, hidden=64, seed=1)
        student.lm_head.weight = student.model.embed_tokens.weight  # tied
        cfg = config(data_dir, tmp_path / str(fused), method=method, fused_linear=fused, eval_data="",
                     pt_data=str(data_dir / "pt.txt") if method == "minillm" else "", backend=backend)
        train(cfg, student=student, teacher=teacher, tokenizer=TOK)
        runs.append(([m["loss"] for m in read_metrics(tmp_path / str(fused)) if "loss" in m], weights(student)))
    (losses, plain), (fused_losses, fused_weights) = runs
    assert len(losses) == 2
    torch.testing.assert_close(torch.tensor(fused_losses), torch.tensor(losses), rtol=1e-5, atol=1e-6)
    for key in plain:
        torch.testing.assert_close(fused_weights[key], plain[key], rtol=1e-4, atol=1e-6)


def test_fused_linear_is_refused_with_fsdp():
    with pytest.raises(ValueError, match="fused_linear"):
        TrainConfig(fused_linear=True, parallel="fsdp").validate()


def test_gradient_accumulation_does_not_depend_on_the_split(data_dir, tmp_path):
    """Global token count: 1 x 8 sequences and 4 x 2 sequences give the same update."""
    results = []
    for batch_size, accum in ((8, 1), (2, 4)):
        student, teacher = models()
        train(config(data_dir, tmp_path / f"b{batch_size}", total_steps=1, batch_size=batch_size,
                     grad_accum_steps=accum, pt_data=str(data_dir / "pt.txt"), pt_batch_size=4,
                     eval_data=""), student=student, teacher=teacher, tokenizer=TOK)
        results.append(weights(student))
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], rtol=1e-4, atol=1e-6)


class Crash(RuntimeError):
    pass


def test_resume_after_interruption_equals_uninterrupted_run(data_dir, tmp_path):
    common = dict(total_steps=6, save_interval=2, batch_size=4, pt_data=str(data_dir / "pt.txt"), eval_data="")
    student, teacher = models()
    train(config(data_dir, tmp_path / "straight", **common), student=student, teacher=teacher, tokenizer=TOK)
    expected = weights(student)

    # interrupted: crashes during step 4, after the checkpoint at step 2 (rounds are 2 steps long)
    student, teacher = models()
    calls = []

    def crash(module, args):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 4 * 2:  # two student forwards (rollout batch + PT batch) per step
                raise Crash("simulated kill")

    hook = student.register_forward_pre_hook(crash)
    with pytest.raises(Crash):
        train(config(data_dir, tmp_path / "resumed", **common), student=student, teacher=teacher, tokenizer=TOK)
    hook.remove()
    assert checkpoint.latest(tmp_path / "resumed").name == "step_00000002"

    student, teacher = models()  # a fresh process: fresh models, same config
    train(config(data_dir, tmp_path / "resumed", **common), student=student, teacher=teacher, tokenizer=TOK)
    for key, value in weights(student).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    losses = [[m["loss"] for m in read_metrics(tmp_path / d) if "loss" in m] for d in ("straight", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_killed_save_leaves_the_previous_checkpoint_loadable(data_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    student, teacher = models()
    train(config(data_dir, tmp_path, eval_data=""), student=student, teacher=teacher, tokenizer=TOK)
    good = checkpoint.latest(tmp_path)
    # what a SIGKILL in the middle of the next save leaves: a temporary directory with partial files
    partial = tmp_path / "checkpoints" / ".tmp-killed"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    (partial / "trainer_state.pt").write_bytes(b"garbage")
    assert checkpoint.latest(tmp_path) == good
    reloaded = AutoModelForCausalLM.from_pretrained(good)
    for key, value in reloaded.state_dict().items():
        torch.testing.assert_close(value, student.state_dict()[key])
    student, teacher = models()
    train(config(data_dir, tmp_path, eval_data="", total_steps=4), student=student, teacher=teacher, tokenizer=TOK)
    assert not partial.exists() and checkpoint.latest(tmp_path).name == "step_00000004"


def test_nothing_is_written_outside_the_output_dir(data_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p for p in tmp_path.rglob("*"))
    data_before = sorted(p for p in data_dir.rglob("*"))
    student, teacher = models()
    train(config(data_dir, tmp_path / "out", save_interval=1, tensorboard=True), student=student, teacher=teacher,
          tokenizer=TOK)
    after = sorted(p for p in tmp_path.rglob("*") if p != tmp_path / "out" and tmp_path / "out" not in p.parents)
    assert after == before and sorted(p for p in data_dir.rglob("*")) == data_before


# ------------------------------------------------------------------------------------------------------------
# Non-finite losses
# ------------------------------------------------------------------------------------------------------------

def nan_logits_on(student, steps):
    """Make the student's training-step logits NaN in the given optimizer steps (1-based; one forward each)."""
    calls = []

    def hook(module, args, output):
        if torch.is_grad_enabled():
            calls.append(1)
            if steps == "all" or len(calls) in steps:
                return output * float("nan")
        return output

    return student.lm_head.register_forward_hook(hook)


def test_a_non_finite_step_is_skipped_and_reported(data_dir, tmp_path):
    student, teacher = models()
    nan_logits_on(student, {2})
    train(config(data_dir, tmp_path, total_steps=3, eval_data=""), student=student, teacher=teacher, tokenizer=TOK)
    steps = {m["step"]: m for m in read_metrics(tmp_path) if "loss" in m}
    assert steps[2]["skipped"] == 1 and steps[2]["loss"] == "nan"
    assert "skipped" not in steps[1] and "skipped" not in steps[3] and math.isfinite(steps[3]["loss"])
    assert all(torch.isfinite(p).all() for p in student.parameters())


def test_consecutive_non_finite_steps_stop_the_run(data_dir, tmp_path):
    student, teacher = models()
    nan_logits_on(student, "all")
    before = weights(student)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps had a non-finite loss"):
        train(config(data_dir, tmp_path, total_steps=10, max_nonfinite_steps=3, eval_data=""), student=student,
              teacher=teacher, tokenizer=TOK)
    assert all(torch.equal(before[k], v) for k, v in weights(student).items())


# ------------------------------------------------------------------------------------------------------------
# Memory: no full-vocabulary float32 tensor beyond the logits themselves
# ------------------------------------------------------------------------------------------------------------

def test_training_step_holds_no_extra_full_vocabulary_tensor(data_dir, tmp_path, monkeypatch):
    """Watch every float32 buffer with the vocabulary as last dimension and more rows than the kernels' chunk,
    created during MiniLLM training steps (two rollout micro-batches, then two PT micro-batches): at no time may
    more be alive than one micro-batch's student logits, teacher logits and the logits' gradient."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from minillm_fast.backends import torch_backend

    vocab = 97  # padded output layers (97 rows, 21 tokens): a size no other dimension here takes
    if not hasattr(torch_backend, "CHUNK_ELEMENTS"):
        pytest.skip("the torch backend no longer exposes CHUNK_ELEMENTS")
    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 32 * vocab)  # its temporaries: 32 rows at a time
    big = 64 * vocab * 4  # bytes: more than a chunk and than any weight ([<= 64, 97]); logits here have >= 80 rows

    class Tracker(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.alive, self.peak = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.shape[-1:] == (vocab,) and t.dtype == torch.float32 and \
                        t.untyped_storage().nbytes() > big:
                    self.alive.append((weakref.ref(t), t.untyped_storage().data_ptr()))
            self.alive = [(ref, ptr) for ref, ptr in self.alive if ref() is not None]
            self.peak = max(self.peak, len({ptr for _, ptr in self.alive}))  # views share their buffer
            return out

    from minillm_fast.trainer import objectives
    tracker, original = Tracker(), objectives.accumulate_gradients

    def tracked(*args, **kwargs):
        with tracker:
            return original(*args, **kwargs)

    monkeypatch.setattr("minillm_fast.trainer.loop.accumulate_gradients", tracked)
    student = synthetic.tiny_llama(vocab, hidden=32, seed=2)
    teacher = synthetic.tiny_llama(vocab, hidden=64, seed=1)
    train(config(data_dir, tmp_path, eval_data="", pt_data=str(data_dir / "pt.txt"), total_steps=1, batch_size=4,
                 grad_accum_steps=2, pt_batch_size=4, pt_length=48), student=student, teacher=teacher,
          tokenizer=TOK)
    assert tracker.peak == 3, tracker.peak
