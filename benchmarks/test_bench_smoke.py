"""CI smoke test of the benchmark suite (``pytest benchmarks -k smoke``, ~20 s on a CPU): a tiny ``--quick`` run of
two ops end to end (timing, error check, memory child, table, JSON, Markdown, plots), so the suite cannot rot.
The default test run (``pytest`` / ``pytest tests``) does not collect this folder."""
from __future__ import annotations

import json

import pytest
import torch

from benchmarks import harness, ops, run


def test_smoke_quick_run_writes_every_output(tmp_path, capsys):
    rc = run.main(["--quick", "--ops", "reverse_kl,minillm_loss", "--backends", "torch", "--out", str(tmp_path)])
    assert rc == 0
    for name in ("results.json", "results.md", "time_vs_vocab.png", "memory_vs_vocab.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["meta"]["copy_gb_per_s"] > 0
    rows = {(r["op"], r["mode"], r["impl"]): r for r in data["results"]}
    for op in ("reverse_kl", "minillm_loss"):
        for mode in ops.MODES:
            ours, eager = rows[(op, mode, "ours:torch")], rows[(op, mode, "eager")]
            for r in (ours, eager):
                assert r["status"] == "ok", r
                assert r["median_s"] > 0 and r["gbps"] > 0 and r["pct_floor"] > 0
                assert r["err"] is not None and r["err"] < 1e-4, r
                assert r.get("peak_bytes") is not None, r
            assert ours["speedup"]["eager"] > 0
            assert rows[(op, mode, "compile")]["status"] == "skipped"  # --quick leaves compile out, visibly
    liger = rows[("reverse_kl", "fwd", "liger")]
    assert liger["status"] == "unavailable" and liger["note"].startswith("n/a")
    table = capsys.readouterr().out
    assert "ours:torch" in table and "%floor" in table


def test_smoke_rss_peak_sees_an_allocation():
    def allocate():
        return torch.ones(16 << 20)  # 64 MiB, touched
    measured = harness.rss_peak_of(allocate, warmup=None)
    assert 60 << 20 <= measured["peak_bytes"] <= 200 << 20


def test_smoke_cpu_memory_child_measures_only_the_op():
    op = ops.OPS["reverse_kl"]
    job = ops.memory_job(op, ops.ImplSpec("eager"), 64, 32768, torch.float32, "fwd+bwd", seed=0)
    peak, error = harness.cpu_peak_bytes_in_child(job, timeout_s=120)
    assert error is None
    grad = 64 * 32768 * 4
    assert 2 * grad <= peak <= 20 * grad  # eager holds several [N, V] float32 temporaries, not the inputs


@pytest.mark.parametrize("name", list(ops.OPS))
def test_smoke_alternatives_match_the_reference(name):
    op = ops.OPS[name]
    inputs = ops.make_inputs(op.needs, 16, 1000, torch.float32, torch.device("cpu"), seed=1)
    for mode in op.modes:
        checked = ops.check_error(op, ops.ImplSpec("eager"), ops.build_impl(op, ops.ImplSpec("eager")), inputs,
                                  mode)
        if op.reference is not None:
            assert checked["err"] < 1e-4, (mode, checked)
