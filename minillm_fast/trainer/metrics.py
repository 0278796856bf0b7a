"""Metrics: one JSON object per line in ``<output_dir>/metrics.jsonl`` (and TensorBoard when installed)."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .checkpoint import inside

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON Lines log. On resume from step S, lines logged after S by the interrupted run are dropped
    first, so the file reads as one uninterrupted run."""

    def __init__(self, output_dir, *, resume_step: int | None, tensorboard: bool):
        self.path = inside(output_dir, Path(output_dir) / METRICS_FILE)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and _step_of(line) <= resume_step]
            temp = self.path.with_name(self.path.name + ".tmp")
            temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(temp, self.path)
        self.file = open(self.path, "a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(log_dir=str(inside(output_dir, Path(output_dir) / "tensorboard")))
            except ImportError:
                pass

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **{k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                                   for k, v in metrics.items()}}
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class NullLog:
    """What ranks other than 0 log to: nothing (only rank 0 writes metrics)."""

    def log(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 0


def read_metrics(output_dir) -> list[dict]:
    path = Path(output_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
