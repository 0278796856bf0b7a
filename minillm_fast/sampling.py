"""Teacher-mixed sampling without materialising the mixture.

MiniLLM draws each next token from p~ = (1 - alpha) q + alpha p. The same distribution, exactly: per row, pick
the teacher with probability alpha (else the student), then draw from that one softmax by inverse CDF. Only the
chosen row is read (two passes over it), and only 2 uniforms per row are drawn from ``generator``.
"""
from __future__ import annotations

import torch

from . import _validate

__all__ = ["sample_mixture"]


def sample_mixture(student_logits, teacher_logits, *, alpha=0.2, temperature=1.0, generator=None, backend="auto"):
    """Draw token ids of the leading shape from (1 - alpha) softmax(z / tau) + alpha softmax(u / tau).

    Deterministic given ``generator`` (a ``torch.Generator`` on the logits' device, or None for the global RNG).
    Padded vocabularies: both softmaxes are over the first min(V_s, V_t) columns. An entry of probability 0
    (logit -inf) is never drawn. A row whose chosen distribution is empty (all -inf) gets -1.
    Returns int64 token ids.
    """
    alpha = _validate.check_range("alpha", alpha, 0.0, 1.0, high_inclusive=False)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    rows = _validate.prepare(student_logits, teacher_logits, temperature=temperature, mask=None, backend=backend)
    n_rows = rows.student.shape[0]
    device = generator.device if generator is not None else student_logits.device
    with torch.no_grad():
        draws = torch.rand(2, n_rows, generator=generator, dtype=torch.float64, device=device)
        draws = draws.to(student_logits.device)
        use_teacher = draws[0] < alpha
        tokens = rows.backend.sample_rows(rows.student, rows.teacher, use_teacher, draws[1].contiguous(),
                                          rows.inv_temp)
    return tokens.reshape(rows.lead_shape)
