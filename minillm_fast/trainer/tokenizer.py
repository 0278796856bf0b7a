"""Tokenizers the trainer understands: any Hugging Face tokenizer, and a tiny character-level one the project
ships so that tests and examples need no downloads.

Both expose the same small interface: ``encode(text) -> list[int]`` (no special tokens added), ``decode(ids)``,
``eos_token_id``, ``pad_token_id``, ``__len__`` (vocabulary size), ``get_vocab()`` and ``save(directory)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

CHAR_TOKENIZER_FILE = "char_tokenizer.json"


class CharTokenizer:
    """One token per character: ids 0 ``<pad>``, 1 ``<eos>``, 2 ``<unk>``, then the characters in the order given."""

    specials = ("<pad>", "<eos>", "<unk>")
    pad_token_id, eos_token_id, unk_token_id = 0, 1, 2

    def __init__(self, chars):
        chars = list(dict.fromkeys(chars))
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer: expected single characters")
        self.chars = chars
        self._ids = {c: i + len(self.specials) for i, c in enumerate(chars)}

    @classmethod
    def from_texts(cls, texts) -> "CharTokenizer":
        return cls(sorted(set("".join(texts))))

    @classmethod
    def load(cls, directory) -> "CharTokenizer":
        with open(Path(directory) / CHAR_TOKENIZER_FILE, encoding="utf-8") as f:
            return cls(json.load(f)["chars"])

    def save(self, directory) -> None:
        with open(Path(directory) / CHAR_TOKENIZER_FILE, "w", encoding="utf-8") as f:
            json.dump({"chars": self.chars}, f, ensure_ascii=False)

    def __len__(self) -> int:
        return len(self.specials) + len(self.chars)

    def get_vocab(self) -> dict[str, int]:
        return {**{s: i for i, s in enumerate(self.specials)}, **self._ids}

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, self.unk_token_id) for c in text]

    def decode(self, ids) -> str:
        """Characters of the ids; special ids and ids beyond the vocabulary (a padded output layer) are skipped."""
        n = len(self.specials)
        return "".join(self.chars[i - n] for i in ids if n <= i < n + len(self.chars))


class HFTokenizer:
    """A Hugging Face tokenizer seen through the same interface (pad falls back to EOS, as is usual for decoders)."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise ValueError("tokenizer: has no EOS token; the trainer needs one to end responses")
        self.hf = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def __len__(self) -> int:
        return len(self.hf)

    def get_vocab(self) -> dict[str, int]:
        return self.hf.get_vocab()

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def save(self, directory) -> None:
        self.hf.save_pretrained(directory)


def load_tokenizer(path: str | os.PathLike):
    if (Path(path) / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(path)
    from transformers import AutoTokenizer
    return HFTokenizer(AutoTokenizer.from_pretrained(path))


def as_tokenizer(tokenizer):
    """Accept our tokenizers or a raw Hugging Face one."""
    if isinstance(tokenizer, (CharTokenizer, HFTokenizer)):
        return tokenizer
    return HFTokenizer(tokenizer)


def check_same_tokenizer(student_tokenizer, teacher_tokenizer) -> None:
    """MiniLLM compares distributions token by token: the two models must share one vocabulary."""
    a, b = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if a != b or student_tokenizer.eos_token_id != teacher_tokenizer.eos_token_id:
        only_a, only_b = len(set(a.items()) - set(b.items())), len(set(b.items()) - set(a.items()))
        raise ValueError(
            f"the student's and the teacher's tokenizers differ ({len(a)} vs {len(b)} tokens; {only_a} and {only_b} "
            "(token, id) pairs found in only one of them): MiniLLM compares the two models' next-token "
            "distributions id by id, so both must use the same tokenizer (padded output layers are fine)")
