"""Data: prompt/response JSON Lines, the plain-text corpus of the PT loss, padded batches and shuffled streams.

Layout of a batch (``Sequences``), as the algorithm page fixes it: prompts **left**-padded to width P, responses
**right**-padded to width R; the model reads ``cat(prompt, response)[:, :-1]`` with position ids from the cumulative
attention mask, and its logits at input positions [P-1, L-1) predict response tokens 0..R-1. A response's first
EOS is a target and counts as valid; everything after it is masked.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch


class DataError(ValueError):
    """Bad input data; the message names the file and, for JSON Lines, the line."""


@dataclass
class Example:
    prompt: list[int]
    response: list[int]  # ends with EOS unless it had to be truncated
    reference: str  # the response text, for Rouge-L


@dataclass
class PromptData:
    examples: list[Example]
    truncated_prompts: int  # prompts longer than max_prompt_length (their last tokens were kept)
    truncated_responses: int  # responses cut to fit max_length (no EOS then)


def _record_field(record: dict, names, where: str, required: bool) -> str:
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            return value
    if required:
        raise DataError(f"{where}: missing field {names[0]!r}" + (f" (or {names[1]!r})" if len(names) > 1 else ""))
    return ""


def load_prompt_data(path, tokenizer, cfg) -> PromptData:
    """Read Dolly-style records (``instruction``, optional ``context`` or ``input``, ``response`` or ``output``).

    A line that is not a JSON object with those fields stops with ``DataError("<file>:<line>: ...")``; blank lines
    are skipped. The prompt is ``cfg.prompt_template`` (or ``prompt_template_with_context``) filled in. An
    over-long prompt keeps its last ``max_prompt_length`` tokens (the template's end, "### Response:", matters
    most; the reference drops such records instead) and is counted; a response is cut to fit ``max_length``.
    """
    examples, truncated_prompts, truncated_responses = [], 0, 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            instruction = _record_field(record, ("instruction",), where, required=True)
            context = _record_field(record, ("context", "input"), where, required=False)
            response = _record_field(record, ("response", "output"), where, required=True)
            template = cfg.prompt_template_with_context if context else cfg.prompt_template
            prompt_text = template.format(instruction=instruction, context=context)
            prompt, response_ids = _encode_pair(tokenizer, prompt_text, response)
            if len(prompt) > cfg.max_prompt_length:
                prompt, truncated_prompts = prompt[-cfg.max_prompt_length:], truncated_prompts + 1
            response_ids = response_ids + [tokenizer.eos_token_id]
            budget = cfg.max_length - len(prompt)
            if len(response_ids) > budget:
                response_ids, truncated_responses = response_ids[:budget], truncated_responses + 1
            examples.append(Example(prompt, response_ids, response))
    if not examples:
        raise DataError(f"{path}: no records")
    return PromptData(examples, truncated_prompts, truncated_responses)


def _encode_pair(tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Tokenise prompt + response jointly (as the reference does, so merges across the seam match what the model
    sees at inference), falling back to separate encodings when the prompt's tokens are not a prefix."""
    prompt_ids, joint = tokenizer.encode(prompt), tokenizer.encode(prompt + response)
    if joint[:len(prompt_ids)] == prompt_ids:
        return prompt_ids, joint[len(prompt_ids):]
    return prompt_ids, tokenizer.encode(response)


def load_text_blocks(path, tokenizer, block_length: int) -> torch.Tensor:
    """The PT corpus as [N, block_length + 1] token blocks: documents (separated by blank lines) each followed by
    EOS, concatenated, cut into non-overlapping blocks (input = block[:-1], labels = block[1:])."""
    text = Path(path).read_text(encoding="utf-8")
    ids: list[int] = []
    for document in text.split("\n\n"):
        if document.strip():
            ids += tokenizer.encode(document.strip("\n")) + [tokenizer.eos_token_id]
    if len(ids) < 2:
        raise DataError(f"{path}: the PT corpus is empty")
    width = min(block_length + 1, len(ids))
    n_blocks = len(ids) // width
    return torch.tensor(ids[:n_blocks * width], dtype=torch.long).view(n_blocks, width)


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Sequences:
    """Prompt + response pairs, plus (for MiniLLM rollouts) per-response-token statistics of the rollout."""

    prompt: torch.Tensor  # [B, P] int64, left-padded
    prompt_mask: torch.Tensor  # [B, P] bool
    response: torch.Tensor  # [B, R] int64, right-padded
    mask: torch.Tensor  # [B, R] bool: valid response tokens (up to and including the first EOS)
    old_logprobs: torch.Tensor | None = None  # [B, R] float32: log q_old(y_t)
    importance_weights: torch.Tensor | None = None  # [B, R] float32: q_old(y_t) / p~(y_t)
    rewards: torch.Tensor | None = None  # [B, R] float32: clip((log p - log q_old) / scale)
    advantages: torch.Tensor | None = None  # [B, R] float32, filled per optimizer step
    reverse_kl: torch.Tensor | None = None  # [B, R] float32: KL(q_old || p) per token (logged)

    _per_token = ("old_logprobs", "importance_weights", "rewards", "advantages", "reverse_kl")

    def __len__(self) -> int:
        return self.prompt.shape[0]

    def _map(self, fn_prompt, fn_response) -> "Sequences":
        out = {"prompt": fn_prompt(self.prompt), "prompt_mask": fn_prompt(self.prompt_mask),
               "response": fn_response(self.response), "mask": fn_response(self.mask)}
        for name in self._per_token:
            value = getattr(self, name)
            out[name] = None if value is None else fn_response(value)
        return Sequences(**out)

    def select(self, index) -> "Sequences":
        return self._map(lambda x: x[index], lambda x: x[index])

    def to(self, device) -> "Sequences":
        return self._map(lambda x: x.to(device), lambda x: x.to(device))

    def trim(self) -> "Sequences":
        """Drop prompt columns that are padding in every row and response columns past every row's end."""
        first = int(self.prompt_mask.any(0).int().argmax()) if self.prompt_mask.any() else self.prompt.shape[1]
        last = int(self.mask.any(0).nonzero().max()) + 1 if self.mask.any() else 1
        return self._map(lambda x: x[:, first:], lambda x: x[:, :last])

    def split(self, size: int) -> list["Sequences"]:
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Inputs whose logits (with ``logits_to_keep = R``) are exactly the R positions predicting the response:
        the last token is never an input, so no [B, L, V] tensor is sliced (a slice would force a copy)."""
        tokens = torch.cat([self.prompt, self.response], 1)[:, :-1]
        attention = torch.cat([self.prompt_mask, torch.ones_like(self.mask)], 1)[:, :-1].long()
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": tokens, "attention_mask": attention, "position_ids": positions}

    def labels(self, ignore_index: int = -100) -> torch.Tensor:
        return torch.where(self.mask, self.response, torch.full_like(self.response, ignore_index))

    @staticmethod
    def cat(parts: list["Sequences"], pad_id: int) -> "Sequences":
        width_p = max(p.prompt.shape[1] for p in parts)
        width_r = max(p.response.shape[1] for p in parts)

        def left(x, width, value):
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x, width, value):
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        out = {"prompt": torch.cat([left(p.prompt, width_p, pad_id) for p in parts]),
               "prompt_mask": torch.cat([left(p.prompt_mask, width_p, False) for p in parts]),
               "response": torch.cat([right(p.response, width_r, pad_id) for p in parts]),
               "mask": torch.cat([right(p.mask, width_r, False) for p in parts])}
        for name in Sequences._per_token:
            values = [getattr(p, name) for p in parts]
            out[name] = None if values[0] is None else torch.cat([right(v, width_r, 0.0) for v in values])
        return Sequences(**out)

    def with_fields(self, **changes) -> "Sequences":
        return replace(self, **changes)


def response_mask(response: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Valid positions of right-padded responses: everything up to and including the first EOS (works when the
    pad id equals the EOS id)."""
    is_eos = (response == eos_id).long()
    return (is_eos.cumsum(1) - is_eos) == 0


def collate(examples: list[Example], pad_id: int, with_response: bool = True) -> Sequences:
    """Left-pad the prompts and right-pad the responses (``with_response=False``: an empty response, R = 0)."""
    b = len(examples)
    width_p = max(len(e.prompt) for e in examples)
    width_r = max(len(e.response) for e in examples) if with_response else 0
    prompt = torch.full((b, width_p), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(b, width_p, dtype=torch.bool)
    response = torch.full((b, width_r), pad_id, dtype=torch.long)
    mask = torch.zeros(b, width_r, dtype=torch.bool)
    for i, e in enumerate(examples):
        if e.prompt:
            prompt[i, -len(e.prompt):] = torch.tensor(e.prompt)
            prompt_mask[i, -len(e.prompt):] = True
        if with_response:
            response[i, :len(e.response)] = torch.tensor(e.response)
            mask[i, :len(e.response)] = True
    return Sequences(prompt, prompt_mask, response, mask)


class ShuffledStream:
    """Endless shuffled passes over ``n`` items. Each pass's order is a function of (seed, pass number), so the
    stream's whole state is one integer, ``position``: a resumed run draws exactly what the interrupted one would."""

    def __init__(self, n: int, seed: int, position: int = 0):
        if n < 1:
            raise ValueError("ShuffledStream: nothing to draw from")
        self.n, self.seed, self.position = n, seed, position
        self._order_pass, self._order = -1, None

    def _order_of(self, pass_number: int) -> list[int]:
        if pass_number != self._order_pass:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + pass_number)
            self._order, self._order_pass = torch.randperm(self.n, generator=g).tolist(), pass_number
        return self._order

    def take(self, k: int) -> list[int]:
        out = []
        for _ in range(k):
            out.append(self._order_of(self.position // self.n)[self.position % self.n])
            self.position += 1
        return out


def shuffled_batches(n: int, size: int, seed: int) -> list[list[int]]:
    """A permutation of range(n) cut into consecutive batches of ``size`` (the last may be smaller)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + size] for i in range(0, n, size)]


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["DataError", "Example", "PromptData", "Sequences", "ShuffledStream", "collate", "load_prompt_data",
           "load_text_blocks", "response_mask", "shuffled_batches", "ceil_div"]
