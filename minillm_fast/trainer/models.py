"""Loading the student and the teacher, and the two ways the trainer calls a Hugging Face causal LM.

Works with any decoder-only ``AutoModelForCausalLM``: the KV cache argument is ``cache`` in recent
``transformers`` and ``past_key_values`` before; ``logits_to_keep`` is used when the model accepts it.
"""
from __future__ import annotations

import importlib.util
import inspect
from functools import lru_cache

import torch

from .. import hf
from .data import Sequences
from .parallel import unwrap

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ValueError(f"config dtype: expected auto, float32, bfloat16 or float16, got {name!r}")
    return _DTYPES[name]


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name != "auto":
        return name
    if (device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and importlib.util.find_spec("flash_attn") is not None):
        return "flash_attention_2"
    return "sdpa"


def load_model(path: str, device: torch.device, dtype: torch.dtype, attn_implementation: str):
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM

    # transformers 4.56 renamed torch_dtype to dtype
    dtype_arg = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=resolve_attention(attn_implementation, device, dtype), **{dtype_arg: dtype})
    return model.to(device)


def output_vocab(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


@lru_cache(maxsize=None)
def _forward_params(cls) -> frozenset:
    return frozenset(inspect.signature(cls.forward).parameters)


def forward(model, input_ids, attention_mask, position_ids, *, cache=None, use_cache=False, logits_to_keep=0):
    """Run ``model``; returns (logits of the last ``logits_to_keep`` positions, or all when 0; the new KV cache)."""
    params = _forward_params(type(unwrap(model)))  # a DDP wrapper forwards keyword arguments as they are
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
              "use_cache": use_cache}
    if cache is not None:
        kwargs["cache" if "cache" in params else "past_key_values"] = cache
    sliced = logits_to_keep and "logits_to_keep" not in params
    if logits_to_keep and not sliced:
        kwargs["logits_to_keep"] = logits_to_keep
    out = model(**kwargs)
    logits = out.logits[:, -logits_to_keep:] if sliced else out.logits
    if not use_cache:
        return logits, None
    return logits, (out.cache if hasattr(out, "cache") else out.past_key_values)


def response_logits(model, seq: Sequences) -> torch.Tensor:
    """[B, R, V] logits predicting the response tokens: input positions [P-1, L-1)."""
    logits, _ = forward(model, **seq.model_inputs(), logits_to_keep=seq.response.shape[1])
    return logits


def response_hidden(model, seq: Sequences) -> torch.Tensor:
    """[B, R, H] last hidden states (the lm_head's input) at the positions predicting the response tokens."""
    return hf.last_hidden_state(model, **seq.model_inputs())[:, -seq.response.shape[1]:]


def text_hidden(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T, H] last hidden states of unpadded plain text (the fused twin of ``text_logits``)."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return hf.last_hidden_state(model, input_ids, torch.ones_like(input_ids), position_ids=positions)


def text_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T, V] logits of unpadded plain text (PT loss); labels are input_ids shifted by the caller."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    logits, _ = forward(model, input_ids, torch.ones_like(input_ids), positions)
    return logits
