"""``minillm_fast.hf``: last hidden states and lm_heads of stock ``transformers`` causal LMs, for the fused-linear
losses.

Tiny models built from configs (no downloads): Llama with tied and untied embeddings, GPT-2, Gemma 2
(``final_logit_softcapping``), Cohere and Cohere 2 (``logit_scale``), Granite (``logits_scaling``, divides) and
HyperCLOVAX (``logits_scaling``, multiplies), where this ``transformers`` has them. Checks:

* ``last_hidden_state(model, ids, mask)`` through the head's transforms reproduces ``model(ids, mask).logits``;
* the fused losses from ``fused_linear_args(...)`` equal the logits ops on the models' logits, values and the
  gradient of every student parameter (tied embeddings: the one Parameter gets both contributions);
* what ``lm_head`` reads from configs (composite models' text configs, Falcon-H1's ``lm_head_multiplier``) and what
  it rejects.
"""
from __future__ import annotations

import math
import types

import pytest
import torch

from minillm_fast import hf, loss
from _helpers import assert_close_rel

transformers = pytest.importorskip("transformers")

F32 = torch.float32
SPECIAL = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: intra-op threads only add overhead (and spin against other jobs on a shared machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _decoder(config_name, vocab, hidden, **extra):
    cls = getattr(transformers, config_name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {config_name}")
    return cls(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.2,
               **SPECIAL, **extra)


# kind: config factory (vocab, hidden) -> config; the head transforms lm_head() must find
KINDS = {
    "llama_tied": (lambda v, h: _decoder("LlamaConfig", v, h, tie_word_embeddings=True), None, None),
    "llama": (lambda v, h: _decoder("LlamaConfig", v, h, tie_word_embeddings=False), None, None),
    "gpt2": (lambda v, h: transformers.GPT2Config(vocab_size=v, n_embd=h, n_layer=1, n_head=2, n_positions=64,
                                                  initializer_range=0.2, bos_token_id=0, eos_token_id=1),
             None, None),
    "gemma2": (lambda v, h: _decoder("Gemma2Config", v, h, head_dim=h // 2, final_logit_softcapping=0.8),
               0.8, None),
    "cohere": (lambda v, h: _decoder("CohereConfig", v, h, logit_scale=0.5), None, 0.5),
    "cohere2": (lambda v, h: _decoder("Cohere2Config", v, h, logit_scale=0.3), None, 0.3),
    "granite": (lambda v, h: _decoder("GraniteConfig", v, h, logits_scaling=3.0), None, 1 / 3.0),
    "hyperclovax": (lambda v, h: _hyperclovax(v, h, logits_scaling=0.7), None, 0.7),
}


def _hyperclovax(vocab, hidden, **extra):
    try:
        config = transformers.AutoConfig.for_model("hyperclovax")
    except (ValueError, KeyError):
        pytest.skip(f"transformers {transformers.__version__} has no HyperCLOVAX")
    return type(config)(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                        initializer_range=0.2, **SPECIAL, **extra)


def tiny(kind, vocab=97, hidden=32, seed=0):
    config = KINDS[kind][0](vocab, hidden)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    return ids, mask


def head_logits(hidden, head: hf.LMHead):
    z = hidden @ head.weight.T
    if head.bias is not None:
        z = z + head.bias
    if head.logit_scale is not None:
        z = z * head.logit_scale
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z


# ----------------------------------------------------------------------------------------------------------
# Hidden states + head transforms = the model's logits
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", list(KINDS))
def test_hidden_states_and_head_reproduce_the_logits(kind):
    model = tiny(kind)
    ids, mask = batch(97)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        hidden = hf.last_hidden_state(model, ids, mask)
    head = hf.lm_head(model)
    assert hidden.shape == (2, 7, head.weight.shape[1])
    assert (head.softcap, head.logit_scale) == pytest.approx(KINDS[kind][1:]), (head.softcap, head.logit_scale)
    assert head.weight is model.get_output_embeddings().weight
    if kind in ("llama_tied", "gpt2", "gemma2", "cohere"):
        assert head.weight is model.get_input_embeddings().weight, "tied embeddings: one Parameter"
    torch.testing.assert_close(head_logits(hidden, head), logits, rtol=0, atol=1e-5)
    if KINDS[kind][1] or KINDS[kind][2]:  # the transforms matter at these logit sizes
        plain = hidden @ head.weight.T
        assert (plain - logits).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Fused losses from fused_linear_args == logits ops on the models' logits, gradients included
# ----------------------------------------------------------------------------------------------------------

# (student, V_s, H_s), (teacher, V_t, H_t): padded vocabularies both ways, H_s != H_t, soft-cap and scale on
# either side or both.
PAIRS = {
    "llama_tied<-llama": (("llama_tied", 97, 32), ("llama", 101, 48)),
    "gemma2<-cohere": (("gemma2", 97, 32), ("cohere", 97, 16)),
    "granite<-gemma2": (("granite", 101, 32), ("gemma2", 97, 48)),
    "gpt2<-llama_tied": (("gpt2", 97, 32), ("llama_tied", 97, 32)),
    "cohere2<-granite": (("cohere2", 97, 16), ("granite", 99, 32)),
}
OPS = ["reverse_kl", "jsd", "minillm", "pt"]


def _loss(op, fused, args, ids, mask, vocab):
    """One op, fused (``args`` from fused_linear_args) or on logits (``args`` = (student_logits, teacher_logits)),
    on next-token targets from ``ids``."""
    g = torch.Generator().manual_seed(7)
    tokens = torch.where(mask.bool(), ids, torch.zeros_like(ids)) % vocab
    if op == "reverse_kl":
        fn, extra, kw = (loss.fused_linear_reverse_kl if fused else loss.reverse_kl), (), dict(mask=mask,
                                                                                                temperature=1.5)
    elif op == "jsd":
        fn, extra, kw = (loss.fused_linear_jsd if fused else loss.jsd), (), dict(mask=mask, beta=0.3)
    elif op == "minillm":
        shape = ids.shape
        extra = (tokens, torch.randn(shape, generator=g), -4.6 + 0.3 * torch.randn(shape, generator=g),
                 torch.ones(shape))
        fn, kw = (loss.fused_linear_minillm_loss if fused else loss.minillm_loss), dict(mask=mask, clip_eps=0.3)
    else:
        labels = torch.where(mask.bool(), tokens, torch.full_like(tokens, -100))
        fn, extra, kw = (loss.fused_linear_pt_loss if fused else loss.pt_loss), (labels,), dict(kd_ratio=0.4)
    if fused:
        out = fn(args.pop("student_hidden"), args.pop("student_weight"), args.pop("teacher_hidden"),
                 args.pop("teacher_weight"), *extra, **args, **kw)
    else:
        out = fn(*args, *extra, **kw)
    return out if isinstance(out, torch.Tensor) else out.loss, out


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("pair", list(PAIRS))
def test_fused_losses_match_the_logits_ops(pair, op):
    (s_kind, vs, hs), (t_kind, vt, ht) = PAIRS[pair]
    student, teacher = tiny(s_kind, vs, hs, seed=0), tiny(t_kind, vt, ht, seed=1)
    ids, mask = batch(min(vs, vt))
    vocab = min(vs, vt)

    # the fused path: hidden states, never [B, T, V] logits
    hidden = hf.last_hidden_state(student, ids, mask)
    with torch.no_grad():
        teacher_hidden = hf.last_hidden_state(teacher, ids, mask)
    args = hf.fused_linear_args(student, hidden, teacher, teacher_hidden)
    assert args["student_weight"] is student.get_output_embeddings().weight
    assert not any(isinstance(x, torch.Tensor) and x.requires_grad for k, x in args.items() if k.startswith("teacher"))
    fused_value, fused_out = _loss(op, True, args, ids, mask, vocab)
    fused_value.backward()
    fused_grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)

    # the ordinary path: the models' logits
    logits = student(ids, attention_mask=mask).logits
    with torch.no_grad():
        teacher_logits = teacher(ids, attention_mask=mask).logits
    value, out = _loss(op, False, (logits, teacher_logits), ids, mask, vocab)
    value.backward()

    for name in ([] if isinstance(out, torch.Tensor) else out._fields):
        assert_close_rel(getattr(fused_out, name), getattr(out, name), 2e-5, abs_slack=1e-6, what=name)
    assert_close_rel(fused_value, value, 2e-5, what="loss")
    names = {name for name, p in student.named_parameters() if p.grad is not None}
    assert set(fused_grads) == names, f"parameters with a gradient differ: {set(fused_grads) ^ names}"
    for name, p in student.named_parameters():
        if p.grad is not None:
            assert_close_rel(fused_grads[name], p.grad, 1e-4, abs_slack=1e-7, what=f"d/d {name}")
    assert all(p.grad is None for p in teacher.parameters()), "the teacher must get no gradient"

    out_emb, in_emb = student.get_output_embeddings().weight, student.get_input_embeddings().weight
    if out_emb is in_emb:
        # tied: the Parameter got the head's gradient on top of the embedding lookup's (rows of unused tokens
        # only from the head, and rows beyond the shared vocabulary from neither)
        name = next(n for n, p in student.named_parameters() if p is in_emb)
        unused = torch.ones(vs, dtype=torch.bool)
        unused[ids.unique()] = False
        unused[vocab:] = False
        assert (fused_grads[name][unused].abs().sum(-1) > 0).all()
        assert (fused_grads[name][vocab:] == 0).all() or vs == vocab


def test_tied_embedding_gradient_reaches_both_uses():
    """Tied Llama: the embedding Parameter's gradient through the fused loss = the lookup's + the head's, the same
    as through the ordinary logits path (and not just one of the two)."""
    student, teacher = tiny("llama_tied", 97, 32, seed=0), tiny("llama", 97, 32, seed=1)
    emb = student.get_input_embeddings().weight
    assert student.get_output_embeddings().weight is emb
    ids, mask = batch(97)
    with torch.no_grad():
        teacher_hidden = hf.last_hidden_state(teacher, ids, mask)
        teacher_logits = teacher(ids, attention_mask=mask).logits

    hidden = hf.last_hidden_state(student, ids, mask)
    loss.fused_linear_reverse_kl(**hf.fused_linear_args(student, hidden, teacher, teacher_hidden), mask=mask).backward()
    fused = emb.grad.clone()
    student.zero_grad(set_to_none=True)

    loss.reverse_kl(student(ids, attention_mask=mask).logits, teacher_logits, mask=mask).backward()
    assert_close_rel(fused, emb.grad, 1e-4, what="tied embedding gradient")

    # the head's part alone (hidden states detached) is a strict part of it
    student.zero_grad(set_to_none=True)
    detached = hf.last_hidden_state(student, ids, mask).detach()
    loss.fused_linear_reverse_kl(**hf.fused_linear_args(student, detached, teacher, teacher_hidden),
                                 mask=mask).backward()
    head_only = emb.grad.clone()
    assert (fused - head_only)[ids.unique()].abs().sum() > 0, "the embedding lookup's gradient is missing"


def test_teacher_tensors_are_detached():
    student, teacher = tiny("llama", 97, 32), tiny("cohere", 97, 32)
    ids, mask = batch(97)
    args = hf.fused_linear_args(student, hf.last_hidden_state(student, ids, mask), teacher,
                                hf.last_hidden_state(teacher, ids, mask))  # teacher hidden computed WITH grad
    assert args["teacher_hidden"].requires_grad is False and args["teacher_weight"].requires_grad is False
    assert args["softcap"] == (None, None) and args["logit_scale"] == (None, 0.5)
    loss.fused_linear_forward_kl(**args).backward()
    assert all(p.grad is None for p in teacher.parameters())


# ----------------------------------------------------------------------------------------------------------
# What lm_head reads from configs, and what it rejects
# ----------------------------------------------------------------------------------------------------------

class _Stub(torch.nn.Module):
    """A causal-LM-shaped module: an output embedding and a config."""

    base_model_prefix = "body"

    def __init__(self, config, head=None, body=None):
        super().__init__()
        self.config = config
        self.head = torch.nn.Linear(8, 11, bias=True) if head is None else head
        if body is not None:
            self.body = body

    def get_output_embeddings(self):
        return self.head


class _Composite:
    """A composite (vision-language) config: the language model's settings live in its text config."""

    model_type = "paligemma"

    def __init__(self, text_config):
        self.text_config = text_config

    def get_text_config(self, decoder=False):
        return self.text_config


def ns(**kw):
    return types.SimpleNamespace(**kw)


def test_composite_models_read_the_text_config():
    """PaliGemma, Gemma 3n/4 (ConditionalGeneration) and Granite vision models apply the text config's
    final_logit_softcapping / logits_scaling to their logits."""
    text = _decoder("Gemma2Config", 11, 8, head_dim=4, final_logit_softcapping=30.0)
    head = hf.lm_head(_Stub(_Composite(text)))
    assert head.softcap == 30.0 and head.logit_scale is None
    granite = _decoder("GraniteConfig", 11, 8, logits_scaling=8.0)
    assert hf.lm_head(_Stub(_Composite(granite))).logit_scale == pytest.approx(1 / 8)


@pytest.mark.parametrize("config,softcap,scale", [
    (ns(model_type="falcon_h1", lm_head_multiplier=0.37), None, 0.37),  # logits = lm_head(h) * lm_head_multiplier
    (ns(model_type="hyperclovax", logits_scaling=0.25), None, 0.25),  # logits = lm_head(h) * logits_scaling
    (ns(model_type="granitemoe", logits_scaling=4), None, 0.25),  # logits = lm_head(h) / logits_scaling
    (ns(model_type="granite", logits_scaling=1.0), None, None),
    (ns(model_type="cohere", logit_scale=1), None, None),
    (ns(model_type="gemma2", final_logit_softcapping=None), None, None),
    (ns(model_type="gemma2", final_logit_softcapping=0.0), None, None),
    (ns(model_type="nanochat", final_logit_softcapping=15), 15.0, None),
    (ns(), None, None),
], ids=["falcon_h1", "hyperclovax", "granitemoe", "granite_1", "cohere_1", "gemma2_none", "gemma2_0", "nanochat",
        "nothing"])
def test_lm_head_reads_the_config(config, softcap, scale):
    head = hf.lm_head(_Stub(config))
    assert head.softcap == softcap and head.logit_scale == pytest.approx(scale)
    assert isinstance(head.softcap, (float, type(None))) and isinstance(head.logit_scale, (float, type(None)))


@pytest.mark.parametrize("config", [
    ns(logit_scale=0.5, logits_scaling=4.0),
    ns(lm_head_multiplier=2.0, logit_scale=0.5),
    ns(output_multiplier=0.2, final_logit_softcapping=20.0),  # applied before the soft-cap by its forward
    ns(logits_mup_width_multiplier=4.0),  # the hidden states are divided by it before the head
], ids=["two_scales", "multiplier_and_scale", "output_multiplier", "mup_width"])
def test_lm_head_rejects_what_it_cannot_reproduce(config):
    with pytest.raises(ValueError, match="model"):
        hf.lm_head(_Stub(config))


def test_lm_head_rejects_heads_that_are_not_linear():
    with pytest.raises(ValueError, match="model"):
        hf.lm_head(_Stub(ns(), head=torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 11))))
    with pytest.raises(ValueError, match="model"):
        hf.lm_head(torch.nn.Linear(8, 11))


def test_last_hidden_state_needs_an_lm_head_called_once():
    """The hidden states are the lm_head's input: a model without a Linear head, or whose forward calls it twice,
    is rejected (a wrong tensor would be silently wrong)."""
    with pytest.raises(ValueError, match="model"):
        hf.last_hidden_state(torch.nn.Identity(), torch.zeros(1, 3, dtype=torch.long))

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(4, 5)

        def get_output_embeddings(self):
            return self.head

        def forward(self, input_ids, attention_mask=None):
            h = torch.randn(*input_ids.shape, 4)
            return self.head(h) + self.head(h)

    with pytest.raises(ValueError, match="2 times"):
        hf.last_hidden_state(TwoHeads(), torch.zeros(1, 3, dtype=torch.long))


def test_last_hidden_state_through_a_ddp_style_wrapper():
    """A wrapper with ``.module`` (DistributedDataParallel) is called itself, and its model's head is used."""
    model = tiny("llama", 97, 32)

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.calls = 0

        def forward(self, *args, **kwargs):
            self.calls += 1
            return self.module(*args, **kwargs)

    ids, mask = batch(97)
    wrapped = Wrapper(model)
    with torch.no_grad():
        a = hf.last_hidden_state(wrapped, ids, mask)
        b = hf.last_hidden_state(model, ids, mask)
    assert wrapped.calls == 1
    torch.testing.assert_close(a, b)
    assert hf.lm_head(wrapped).weight is model.get_output_embeddings().weight


def test_last_hidden_state_passes_extra_arguments():
    """position_ids and friends reach the base model (here: shifted positions change the hidden states)."""
    model = tiny("llama", 97, 32)
    ids, mask = batch(97)
    with torch.no_grad():
        a = hf.last_hidden_state(model, ids, mask)
        b = hf.last_hidden_state(model, ids, mask, position_ids=torch.arange(7).expand(2, 7) + 5)
        c = model(ids, attention_mask=mask, position_ids=torch.arange(7).expand(2, 7) + 5).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(head_logits(b, hf.lm_head(model)), c, rtol=0, atol=1e-5)
    assert math.isfinite(float(b.sum()))
