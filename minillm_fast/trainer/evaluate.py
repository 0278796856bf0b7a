"""Evaluation on held-out prompts: Rouge-L of sampled responses against the references (the paper's metric),
and the student's reverse KL to the teacher on its own held-out rollouts.

Rouge-L comes from Google's ``rouge-score`` package when it is installed (``RougeScorer(["rougeL"],
use_stemmer=True)``, as the S-NI evaluation the reference copies). Without it, ``rouge_l`` falls back to this
file's LCS implementation: the same tokenisation (lower-case, runs of characters other than a-z and 0-9 split
tokens) and the same F-measure 2PR / (P + R) of the longest common subsequence, but **no Porter stemming**, so
scores on English prose can differ slightly from the package's; on stem-free text (e.g. the synthetic task) they
agree. Scores are reported x100, like the paper's tables.
"""
from __future__ import annotations

import re

import torch

from .. import loss
from .data import Example, collate
from .models import response_logits
from .rollout import generate, max_new_tokens, row_budgets

try:
    from rouge_score import rouge_scorer as _rouge_scorer
    _SCORER = _rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
except ImportError:  # pragma: no cover - exercised when rouge-score is absent
    _SCORER = None


def _tokens(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _lcs_length(a: list[str], b: list[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l_fallback(prediction: str, reference: str) -> float:
    """Rouge-L F-measure in [0, 1] without stemming (see the module docstring)."""
    pred, ref = _tokens(prediction), _tokens(reference)
    if not pred or not ref:
        return 0.0
    lcs = _lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str) -> float:
    """Rouge-L F-measure in [0, 1] (``rouge-score`` when installed, else ``rouge_l_fallback``)."""
    if _SCORER is None:
        return rouge_l_fallback(prediction, reference)
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


@torch.no_grad()
def evaluate(cfg, student, teacher, examples: list[Example], tokenizer, device, *, seeding: str = "stream",
             dist=None, lockstep=None) -> dict:
    """Sample one response per held-out prompt from ``student`` alone (temperature ``cfg.temperature``, a fixed
    seed, so every evaluation sees the same draws for the same weights) and report:

    * ``rougeL``: mean Rouge-L F x100 of the decoded responses (up to the first EOS) against the references;
    * ``reverse_kl``: KL(q || p) over the whole vocabulary, averaged over the valid tokens of those rollouts
      (the per-token reverse KL the MiniLLM objective minimises; omitted without a teacher);
    * ``response_length``: mean valid tokens per response (EOS included).

    ``seeding="sequence"``: prompt i draws from its own generator (``parallel.sequence_generators``), so results
    do not depend on batching or on the number of processes. ``dist`` (``parallel.Dist``): each rank evaluates a
    contiguous slice of the prompts and the sums are all-reduced (every rank returns the same metrics);
    ``lockstep`` keeps sharded models' collectives matched when the slices differ in length.
    """
    from .parallel import Dist, sequence_generators

    dist = dist or Dist()
    if cfg.eval_samples:
        examples = examples[:cfg.eval_samples]
    mine = dist.shard_uneven(len(examples))
    per_rank = -(-len(examples) // dist.world_size)
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 7919) if seeding == "stream" else None
    rouge_sum, length_sum, kl_sum, kl_count = 0.0, 0, 0.0, 0
    for start in range(0, per_rank, cfg.eval_batch_size):  # the same number of chunks on every rank
        indices = mine[start:start + cfg.eval_batch_size]
        if not len(indices):
            if lockstep is not None:  # nothing left here: take part in the others' forwards
                lockstep.idle_generation((student,))
                lockstep.idle_forward((student, teacher) if teacher is not None else (student,))
            continue
        chunk = [examples[i] for i in indices]
        prompts = collate(chunk, tokenizer.pad_token_id, with_response=False).to(device)
        budget = max_new_tokens(cfg, prompts, cfg.eval_max_new_tokens)
        if seeding == "sequence":  # each prompt's own noise and length budget: independent of the batching
            generator = sequence_generators(cfg.seed + 7919, 0, indices, device)
            budget = row_budgets(cfg, prompts, cfg.eval_max_new_tokens)
        seq = generate(student, teacher, prompts, source="student", max_new_tokens=budget,
                       eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, temperature=cfg.temperature,
                       generator=generator, backend=cfg.backend, lockstep=lockstep)
        if teacher is not None:
            stats = loss.token_stats(response_logits(student, seq), response_logits(teacher, seq), seq.response,
                                     alpha=0.0, temperature=cfg.temperature, mask=seq.mask, backend=cfg.backend)
            kl_sum += float(stats.reverse_kl.sum())
            kl_count += seq.num_tokens()
        for row, example in enumerate(chunk):
            ids = seq.response[row][seq.mask[row]].tolist()
            if ids and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
            rouge_sum += rouge_l(tokenizer.decode(ids), example.reference)
            length_sum += int(seq.mask[row].sum())
    if dist.enabled:
        totals = dist.all_reduce_sum(torch.tensor([rouge_sum, length_sum, kl_sum, kl_count], dtype=torch.float64,
                                                  device=device)).tolist()
        rouge_sum, length_sum, kl_sum, kl_count = totals
    metrics = {"rougeL": 100.0 * rouge_sum / len(examples), "response_length": length_sum / len(examples)}
    if teacher is not None:
        metrics["reverse_kl"] = kl_sum / max(kl_count, 1)
    return metrics
