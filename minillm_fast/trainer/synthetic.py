"""A synthetic instruction task and tiny models, generated here so tests and examples need no downloads.

Records look like Dolly's: ``{"instruction": "reverse: c a d", "response": "d a c"}`` with tasks ``copy``,
``reverse`` and ``sort`` over a few letters; responses are space-separated letters, so Rouge-L's word tokens
are the letters themselves. The tokenizer is character-level (``CharTokenizer``); models are Llama
configurations small enough to train on a CPU in seconds.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .tokenizer import CharTokenizer

TASKS = ("copy", "reverse", "sort")
LETTERS = "abcdefgh"
PROMPT_TEMPLATE = "{instruction}\n"  # short prompts: the reference's Dolly template would dwarf these tasks


def make_records(n: int, seed: int, *, tasks=TASKS, letters=LETTERS, min_len: int = 3, max_len: int = 6) -> list:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        task = rng.choice(tasks)
        seq = [rng.choice(letters) for _ in range(rng.randint(min_len, max_len))]
        answer = {"copy": seq, "reverse": seq[::-1], "sort": sorted(seq)}[task]
        records.append({"instruction": f"{task}: {' '.join(seq)}", "response": " ".join(answer)})
    return records


def write_jsonl(records, path) -> Path:
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def write_text_corpus(records, path) -> Path:
    """A plain-text corpus for the PT loss: each record as one document."""
    path = Path(path)
    path.write_text("\n\n".join(f"{r['instruction']}\n{r['response']}" for r in records) + "\n", encoding="utf-8")
    return path


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.from_texts(["".join(TASKS) + LETTERS + " :\n"])


def tiny_llama(vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4, seed: int = 0,
               max_positions: int = 128):
    """A Llama-architecture causal LM with random weights (dropout 0, untied embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=max_positions, tie_word_embeddings=False,
                         pad_token_id=CharTokenizer.pad_token_id, eos_token_id=CharTokenizer.eos_token_id,
                         bos_token_id=None)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)
