"""Reporting: the terminal table, results.json, results.md and the PNG plots.

A result is one flat dict per (op, shape, pass, implementation); see ``run.py --help`` for what each field means.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .harness import human_bytes, human_seconds

ALTERNATIVES = ("eager", "compile", "liger")
COLUMNS = ("op", "shape", "pass", "impl", "time", "GB/s", "%floor", *(f"x{a}" for a in ALTERNATIVES),
           "peak mem", "/grad", "err", "notes")


def _fmt_ratio(x):
    if x is None:
        return "n/a"
    return f"{x:.3g}x" if x < 100 else f"{x:.0f}x"


def _fmt_err(e):
    if e is None:
        return "-"
    if math.isinf(e) or math.isnan(e):
        return str(e)
    return f"{e:.1e}"


def _notes(r: dict) -> str:
    notes = []
    if r["status"] != "ok":
        note = r.get("note") or r["status"]
        notes.append(note if len(note) <= 100 else note[:97] + "...")
    else:
        if r.get("compile_s") is not None:
            notes.append(f"compile {human_seconds(r['compile_s'])}*")
        if r.get("samples"):
            n = f"n={len(r['samples'])}"
            if r.get("fewer_calls"):  # fewer timed calls than wanted, and why
                n += f" of {r.get('repeats_wanted')}: {r['fewer_calls']}"
            notes.append(n)
        if r.get("note"):
            notes.append(r["note"])
    if r.get("mem_note"):
        notes.append("mem: " + r["mem_note"])
    return "; ".join(notes)


def row_cells(r: dict, first_of_group: bool) -> list[str]:
    ok = r["status"] == "ok"
    speedups = r.get("speedup") or {}
    return [
        r["op"] if first_of_group else "",
        r["shape"] if first_of_group else "",
        r["mode"] if first_of_group else "",
        r["impl"],
        human_seconds(r.get("median_s")) if ok else "-",
        (f"{r['tflops']:.3g} TF/s" if r.get("tflops") else f"{r['gbps']:.3g}") if ok and r.get("gbps") else "-",
        f"{r['pct_floor']:.3g}%" if ok and r.get("pct_floor") is not None else "-",
        *(_fmt_ratio(speedups[a]) if a in speedups else "" for a in ALTERNATIVES),
        human_bytes(r.get("peak_bytes")) if r.get("peak_bytes") is not None else "-",
        f"{r['peak_grad_buffers']:.2f}" if r.get("peak_grad_buffers") is not None else "-",
        _fmt_err(r.get("err")),
        _notes(r),
    ]


def _groups(results):
    key = None
    for r in results:
        k = (r["op"], r["shape"], r["mode"])
        yield r, k != key
        key = k


def text_table(results: list[dict]) -> str:
    rows = [list(COLUMNS)]
    separators = []
    for r, first in _groups(results):
        if first and len(rows) > 1:
            separators.append(len(rows))
        rows.append(row_cells(r, first))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    right = {"time", "GB/s", "%floor", "peak mem", "/grad", "err", *(f"x{a}" for a in ALTERNATIVES)}
    lines = []
    for i, row in enumerate(rows):
        if i in separators:
            lines.append("")
        cells = [c.rjust(w) if COLUMNS[j] in right else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header_lines(meta: dict) -> list[str]:
    lines = [
        f"device: {meta['device']}   dtype: {meta['dtype']}   date: {meta['date']}",
        f"command: {meta['command']}",
        f"torch {meta['torch']}, triton {meta.get('triton') or '-'}, minillm_fast {meta['minillm_fast']}; "
        f"measured copy bandwidth {meta['copy_gb_per_s']:.3g} GB/s (read + write)"
        + (f"; compile init {meta['compile_init_s']:.1f} s (one-time, excluded)" if meta.get("compile_init_s") else ""),
    ]
    return lines


FOOTNOTE = ("xALT = ALT's median time / ours (>1: ours faster). %floor = floor time / measured time, floor = must-move "
            "bytes / copy bandwidth. peak mem = peak beyond the inputs; /grad = in units of one student-gradient "
            "buffer. err = max |out - ref| / max |ref| vs float64 on the first rows (fwd+bwd: gradient included). "
            "* compile time: first call minus median, reported apart.")


def markdown(results: list[dict], meta: dict) -> str:
    lines = ["# minillm_fast benchmark", ""]
    lines += [f"- {line}" for line in header_lines(meta)]
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r, first in _groups(results):
        cells = [c.replace("|", "\\|") for c in row_cells(r, first)]
        if first:
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", FOOTNOTE, ""]
    return "\n".join(lines)


def write(results: list[dict], meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    (out_dir / "results.md").write_text(markdown(results, meta))


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------

COLORS = {"ours:cuda": "tab:blue", "ours:triton": "tab:cyan", "ours:cpu": "tab:purple", "ours:torch": "tab:gray",
          "eager": "tab:red", "compile": "tab:orange", "liger": "tab:green"}


def _minor_log_label(ax):
    """Label the 2 and 5 minor ticks of a log y axis that spans at most 2 decades (else none)."""
    def label(y, _):
        low, high = ax.get_ylim()
        if y <= 0 or low <= 0 or high / low > 100:
            return ""
        mantissa = y / 10 ** math.floor(math.log10(y) + 1e-9)
        return f"{y:g}" if any(abs(mantissa - m) < 1e-6 for m in (2, 5)) else ""
    return label


def plot(results: list[dict], meta: dict, out_dir: Path) -> list[Path]:
    """time_vs_vocab.png and memory_vs_vocab.png: per op and pass, per 1,000 tokens, log-log, one line per impl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in results if r["status"] == "ok"]
    panels = sorted({(r["op"], r["mode"]) for r in ok}, key=lambda p: (list(dict.fromkeys(
        r["op"] for r in results)).index(p[0]), p[1]))
    written = []
    for metric, ylabel, fname in (("median_s", "ms per 1,000 tokens", "time_vs_vocab.png"),
                                  ("peak_bytes", "peak MiB beyond inputs per 1,000 tokens", "memory_vs_vocab.png")):
        if not panels:
            break
        cols = min(3, len(panels))
        nrows = math.ceil(len(panels) / cols)
        # Fixed margins (in inches, so any grid lays out alike) instead of tight_layout, which lays every tick
        # label out once more to fit them (seconds per figure on a CPU).
        width, height = 5 * cols, 3.6 * nrows
        fig, axes = plt.subplots(nrows, cols, figsize=(width, height), squeeze=False)
        fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                            top=1 - 0.6 / height, wspace=0.3, hspace=0.45)
        for ax, (op, mode) in zip(axes.flat, panels):
            by_impl: dict[str, list[tuple[int, float]]] = {}
            for r in ok:
                value = r.get(metric)
                if r["op"] != op or r["mode"] != mode or value is None or value <= 0:
                    continue
                scale = 1e3 if metric == "median_s" else 1 / 2**20
                by_impl.setdefault(r["impl"], []).append((r["v"], value * scale * 1000 / r["n"]))
            for impl, points in sorted(by_impl.items(), key=lambda kv: (not kv[0].startswith("ours"), kv[0])):
                points.sort()
                style = "-o" if impl.startswith("ours") else "--s"
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=impl, markersize=4,
                        color=COLORS.get(impl))
            ax.set_xscale("log")
            ax.set_yscale("log")
            # Ticks at the measured vocabularies only: log axes' automatic (minor) ticks over a narrow range of
            # one or two points cost seconds per figure to lay out.
            vocabs = sorted({p[0] for points in by_impl.values() for p in points})
            if vocabs:
                ax.set_xticks(vocabs, [f"{v:,}" for v in vocabs], fontsize=8)
                ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            # Plain numbers on the y axis (the default log labels are typeset as math, slowly).
            ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(_minor_log_label(ax)))
            ax.set_title(f"{op} ({mode})", fontsize=10)
            ax.set_xlabel("vocabulary size")
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
            if by_impl:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.suptitle(f"{meta['device']} - {meta['dtype']} - {meta['date']}", fontsize=10)
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
