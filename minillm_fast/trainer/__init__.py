"""A compact MiniLLM trainer on stock Hugging Face causal LMs; it calls only ``minillm_fast``'s public API.

    from minillm_fast.trainer import TrainConfig, train
    cfg = TrainConfig.load("run.yaml", ["lr=1e-5"])
    train(cfg)                                   # or train(cfg, student=model, teacher=model, tokenizer=tok)

Command line: ``python -m minillm_fast.trainer.cli train CONFIG.yaml [key=value ...]`` (``--help`` lists every
key with its default); under ``torchrun`` (DDP or FSDP2, see ``parallel.py``) every rank runs the same command.
Methods: ``minillm``, ``sft``, ``kd``, ``seqkd``, ``gkd``; see ``loop.py`` for the loop.
"""
from ..hf import unshadow_hf_kernels

unshadow_hf_kernels()  # before any module of the trainer imports transformers

from .config import METHODS, TrainConfig  # noqa: E402
from .data import DataError  # noqa: E402
from .evaluate import evaluate, rouge_l  # noqa: E402
from .tokenizer import CharTokenizer  # noqa: E402
from .loop import NonFiniteLossError, train  # noqa: E402

__all__ = ["METHODS", "TrainConfig", "train", "evaluate", "rouge_l", "CharTokenizer", "DataError",
           "NonFiniteLossError"]
