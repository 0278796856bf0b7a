"""CI smoke test of the benchmark suite (``pytest benchmarks -k smoke``, ~20 s on a CPU): a tiny ``--quick`` run of
two ops end to end (timing, error check, memory child, table, JSON, Markdown, plots), so the suite cannot rot.
The default test run (``pytest`` / ``pytest tests``) does not collect this folder."""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import fused_linear_ops, harness, ops, run
from minillm_fast import fused_linear


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


def test_smoke_fused_linear_blocks(monkeypatch):
    """fused_linear_ops with block configurations (``--blocks``): ours[n,G] and matmuls-blocked[n,G] rows next to
    the default ours and matmuls-blocked, timed, error-checked and memory-measured (a child per run) like ours;
    each configuration's knob is set only around its calls, and drives the blocks of both."""
    monkeypatch.delenv(fused_linear.BLOCKS_ENV, raising=False)
    blocks = fused_linear_ops.parse_blocks("8,16; 16")
    assert blocks == ("8,16", "16")
    rows = fused_linear_ops.run(torch.device("cpu"), torch.float32, [(40, 16, 300)], ops=("fused_linear_reverse_kl",),
                                repeats=1, blocks=blocks)
    by_impl = {r["impl"]: r for r in rows}
    for name in ("ours", "ours[8,16]", "ours[16]", "matmuls-blocked", "matmuls-blocked[8,16]",
                 "matmuls-blocked[16]"):
        assert by_impl[name]["time_s"] > 0, by_impl[name]
    for name in ("ours[8,16]", "ours[16]"):
        assert by_impl[name]["max_rel_error"] < 1e-4 and by_impl[name]["extra_peak_bytes"] is not None
        assert by_impl[name]["ours_speedup"] > 0
    assert "extra_peak_bytes" not in by_impl["matmuls-blocked[8,16]"]
    assert "ours[8,16]" in fused_linear_ops.markdown(rows)
    assert fused_linear.BLOCKS_ENV not in os.environ

    blocked, pulled = [], []
    original_block, original_pull = fused_linear._Problem.block, fused_linear._Head.pull_back

    def block(self, a, b, *args, **kwargs):
        blocked.append((a, b))
        return original_block(self, a, b, *args, **kwargs)

    def pull_back(self, dz, a, b, grads):
        pulled.append((a, b))
        return original_pull(self, dz, a, b, grads)
    monkeypatch.setattr(fused_linear._Problem, "block", block)
    monkeypatch.setattr(fused_linear._Head, "pull_back", pull_back)
    p = fused_linear_ops.Problem.make(20, 16, 300, torch.float32, torch.device("cpu"))
    impls = fused_linear_ops.implementations("fused_linear_reverse_kl", torch.device("cpu"), blocks)
    impls["ours[8,16]"](p)
    impls["matmuls-blocked[8,16]"](p)
    assert blocked == [(0, 8), (8, 16), (16, 20)] and pulled == 2 * blocked  # float32: pulled back per block


def test_smoke_fused_linear_blocks_rejects_malformed():
    with pytest.raises(SystemExit):
        fused_linear_ops.main(["--device", "cpu", "--quick", "--blocks", "8,12"])
