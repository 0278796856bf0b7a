"""The behaviours design.md says must be *documented* are documented where users look: the docstrings."""
from __future__ import annotations

import inspect

from minillm_fast import loss, rl, sampling


def _doc(obj) -> str:
    return " ".join((inspect.getdoc(obj) or "").split())


def test_jsd_documents_its_endpoints():
    doc = _doc(loss.jsd)
    assert "beta=0" in doc and "beta=1" in doc
    assert "forward_kl" in doc and "reverse_kl" in doc


def test_infinite_divergences_are_documented():
    assert "+inf" in _doc(loss.reverse_kl)
    assert "+inf" in _doc(loss.forward_kl)


def test_common_semantics_are_documented():
    doc = _doc(loss)
    for phrase in ("min(V_s, V_t)", "torch.no_grad()", "-inf", "reduction", "num_tokens", "float32"):
        assert phrase in doc, phrase


def test_pt_loss_says_there_is_no_shift():
    doc = _doc(loss.pt_loss).lower()
    assert "no shift" in doc and "aligned" in doc


def test_advantages_document_the_whitening_deviation():
    doc = _doc(rl.advantages).lower()
    assert "valid tokens only" in doc and "padding" in doc and "reference" in doc


def test_sampler_documents_empty_rows_and_determinism():
    doc = _doc(sampling.sample_mixture)
    assert "-1" in doc and "generator" in doc
