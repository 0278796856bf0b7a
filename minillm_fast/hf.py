"""Hugging Face helpers for the fused-linear losses: hidden states and lm_heads of stock ``transformers`` causal LMs.

    from minillm_fast import hf, loss

    s_hidden = hf.last_hidden_state(student, input_ids, attention_mask)          # no [B, T, V] logits
    with torch.no_grad():
        t_hidden = hf.last_hidden_state(teacher, input_ids, attention_mask)
    kl = loss.fused_linear_reverse_kl(**hf.fused_linear_args(student, s_hidden, teacher, t_hidden),
                                      mask=attention_mask)

``lm_head(model)`` reads what the model's own forward would apply to its last hidden state: the output embedding's
weight and bias (tied input/output embeddings are the same Parameter, so the gradient reaches both uses), and the
config entries below, looked up in the model's config and, for composite (e.g. vision-language) models, in its text
config (``config.get_text_config()``), as their forwards do:

* ``final_logit_softcapping``: ``softcap * tanh(logits / softcap)`` (Gemma 2, Gemma 3n, Gemma 4, PaliGemma, ...);
* ``logit_scale``: logits times it (Cohere, Cohere 2);
* ``logits_scaling``: logits divided by it (the Granite family), or times it for HyperCLOVAX, whose forward
  multiplies ("MuP: multiply logits by logits_scaling (cf. GraniteForCausalLM which divides)");
* ``lm_head_multiplier``: logits times it (Falcon-H1).

Models whose head does more than that (a second projection, per-token scaling, a scale this module does not know,
several scale entries at once) are rejected, not computed wrongly.

``unshadow_hf_kernels()`` keeps ``transformers`` importable from a checkout of this repository (see there).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass

import torch


def unshadow_hf_kernels() -> None:
    """Import Hugging Face's ``kernels`` package (a dependency of recent ``transformers``, which imports it when it is
    installed) where this checkout's top-level ``kernels/`` folder would shadow it. That folder holds our Triton
    kernels (installed as ``minillm_fast.kernels``); with the checkout's root on ``sys.path`` (``python -m`` run from
    the root, pytest's ``pythonpath = .``), ``import kernels`` finds it first and ``import transformers`` fails.
    Called before ``transformers`` is imported (the trainer package, the test suite). Does nothing where that package
    is not installed, is already imported, or no ``sys.path`` entry holds our folder."""
    if "kernels" in sys.modules:
        return
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return

    def holds_ours(entry: str) -> bool:  # our kernels/ folder, recognised by one of its files
        return os.path.isfile(os.path.join(entry or os.getcwd(), "kernels", "online_softmax.py"))
    if not any(holds_ours(entry) for entry in sys.path):
        return
    saved = list(sys.path)
    sys.path[:] = [entry for entry in saved if not holds_ours(entry)]
    try:
        importlib.import_module("kernels")
    except Exception:  # noqa: BLE001 - a broken install: transformers reports it on its own import
        sys.modules.pop("kernels", None)
    finally:
        sys.path[:] = saved


@dataclass(frozen=True)
class LMHead:
    """logits = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap), each step optional."""

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]
    softcap: float | None
    logit_scale: float | None


# model_type prefixes whose forward multiplies the logits by ``logits_scaling`` (the Granite family divides).
MULTIPLIES_BY_LOGITS_SCALING = ("hyperclovax",)
# Config entries that some forwards apply to the logits or to the last hidden state and this module does not.
UNSUPPORTED_ENTRIES = ("output_multiplier", "logits_mup_width_multiplier")


def _configs(model) -> list:
    """The model's config, then its text config when that is a different object (composite models)."""
    config = getattr(model, "config", None)
    if config is None:
        return []
    configs = [config]
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        text = get_text_config()
        if text is not None and text is not config:
            configs.append(text)
    return configs


def _entry(configs, name):
    """The first setting of ``name`` in ``configs`` that is not None."""
    for config in configs:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def lm_head(model) -> LMHead:
    """The lm_head of a ``transformers`` causal LM, with its logit soft-capping and scale read from its config."""
    model = unwrap(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"model: expected a causal LM whose get_output_embeddings() is a torch.nn.Linear, got "
                         f"{type(head).__name__} from {type(model).__name__}")
    configs = _configs(model)
    for name in UNSUPPORTED_ENTRIES:
        if _entry(configs, name) is not None:
            raise ValueError(f"model: the config of {type(model).__name__} sets {name}, which its forward applies "
                             f"around the lm_head and minillm_fast.hf does not; compute its logits instead")
    softcap = _entry(configs, "final_logit_softcapping")
    scales = {}
    for name in ("logit_scale", "logits_scaling", "lm_head_multiplier"):
        value = _entry(configs, name)
        if value is not None and value != 1:
            scales[name] = float(value)
    if len(scales) > 1:
        raise ValueError(f"model: config of {type(model).__name__} sets several logit scales ({sorted(scales)}); "
                         f"which ones its forward applies is ambiguous")
    logit_scale = None
    if "logits_scaling" in scales:
        multiplies = any(str(getattr(c, "model_type", "")).startswith(MULTIPLIES_BY_LOGITS_SCALING) for c in configs)
        logit_scale = scales["logits_scaling"] if multiplies else 1.0 / scales["logits_scaling"]
    elif scales:
        logit_scale = next(iter(scales.values()))
    return LMHead(weight=head.weight, bias=head.bias, softcap=float(softcap) if softcap else None,
                  logit_scale=logit_scale)


def unwrap(model):
    """The model inside a DistributedDataParallel (or similar ``.module``) wrapper; the model itself otherwise."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, torch.nn.Module) and not hasattr(model, "get_output_embeddings") else model


def last_hidden_state(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      **kwargs) -> torch.Tensor:
    """[B, T, H]: exactly the hidden states the model's lm_head reads (after the final norm), with no [B, T, V] logits.

    Runs the model's own forward (so wrappers such as DistributedDataParallel see the call; extra keyword arguments
    such as ``position_ids`` go to it) with a pre-hook on its output embedding that keeps the lm_head's input and
    hands the lm_head only the last position of it: the model's own logits (discarded) cost one position.
    """
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(f"model: expected a causal LM whose get_output_embeddings() is a torch.nn.Linear, got "
                         f"{type(head).__name__} from {type(unwrap(model)).__name__}")
    seen = []

    def keep_input(module, args):
        seen.append(args[0])
        return (args[0][..., -1:, :],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep_input)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise ValueError(f"model: its forward called the lm_head {len(seen)} times (expected once); compute its "
                         f"logits instead")
    return seen[0]


def fused_linear_args(student, student_hidden: torch.Tensor, teacher, teacher_hidden: torch.Tensor) -> dict:
    """Keyword arguments for any ``loss.fused_linear_*`` op from two causal LMs and their last hidden states.

    The teacher's hidden states and lm_head tensors are passed detached (the teacher never gets a gradient).
    """
    s, t = lm_head(student), lm_head(teacher)
    return dict(
        student_hidden=student_hidden, student_weight=s.weight, student_bias=s.bias,
        teacher_hidden=teacher_hidden.detach(), teacher_weight=t.weight.detach(),
        teacher_bias=None if t.bias is None else t.bias.detach(),
        softcap=(s.softcap, t.softcap), logit_scale=(s.logit_scale, t.logit_scale),
    )
