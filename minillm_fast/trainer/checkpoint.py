"""Checkpoints: written atomically, found again after any interruption.

Layout: ``<output_dir>/checkpoints/step_<NNNNNNNN>/`` holds the student (``model.safetensors`` + ``config.json``,
loadable with ``AutoModelForCausalLM.from_pretrained``), the tokenizer, the run's ``config.yaml`` and
``trainer_state.pt`` (optimizer, scheduler, RNG states and the loop's counters).

Under ``torchrun`` only rank 0 writes (the trainer gathers sharded weights and optimizer states to it first).

Atomicity: everything is written into a fresh hidden temporary directory beside the checkpoints, flushed to disk,
and only then renamed to its final name with ``os.replace`` (one atomic rename on POSIX). A run killed at any
moment therefore leaves either the complete new checkpoint or none; leftover temporary directories are never
read (only ``step_*`` names are) and are removed by the next run.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
WEIGHTS_FILE = "model.safetensors"
_PREFIX = "step_"
_TEMP_PREFIX = ".tmp-"


def inside(output_dir: Path, path: Path) -> Path:
    """``path``, after checking it resolves inside ``output_dir`` (the trainer writes nowhere else)."""
    root, target = Path(output_dir).resolve(), Path(path).resolve()
    if target != root and root not in target.parents:
        raise ValueError(f"refusing to write {target}: outside the output directory {root}")
    return target


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _quiet_transformers():
    """save_pretrained draws a progress bar per shard; a training log does not want one per checkpoint."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        yield
        return
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "sampling": generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    generator.set_state(state["sampling"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path``'s content with ``text`` in one rename (readers see the old file or the new one)."""
    temp = path.with_name(f"{_TEMP_PREFIX}{path.name}")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


def save(output_dir, step: int, *, student, tokenizer, scheduler, trainer_state: dict, config_yaml: str,
         optimizer=None, optimizer_state: dict | None = None, keep: int = 0, weights: dict | None = None) -> Path:
    """Write checkpoint ``step`` atomically; then keep only the ``keep`` newest (0 = all). Returns its path.

    ``optimizer_state`` (default ``optimizer.state_dict()``) and ``weights`` (default the student's own state
    dict) let a multi-process run pass what it gathered from its shards: a checkpoint has one format whatever
    wrote it (weights loadable with ``from_pretrained``, optimizer state numbered in ``parameters()`` order).
    """
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    root = inside(output_dir, Path(output_dir) / CHECKPOINT_DIR)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{_PREFIX}{step:08d}"
    temp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=root))
    try:
        with _quiet_transformers():
            student.save_pretrained(temp, **({"state_dict": weights} if weights is not None else {}))
        if tokenizer is not None:
            tokenizer.save(temp)
        (temp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), **trainer_state},
                   temp / STATE_FILE)
        _fsync_tree(temp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            stale = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=root))
            os.replace(final, stale / final.name)
            os.replace(temp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(temp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if keep:
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints, oldest first (temporary directories are never listed)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX):].isdigit()
             and (p / STATE_FILE).is_file() and (p / WEIGHTS_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def latest(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_temporaries(output_dir) -> None:
    """Remove what an interrupted save left behind (never a complete checkpoint)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(_TEMP_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def load_weights(student, checkpoint: Path) -> None:
    """Load the student's weights in place (tied weights, stored once, are re-tied)."""
    from safetensors.torch import load_model
    missing, unexpected = load_model(student, checkpoint / WEIGHTS_FILE, strict=False)
    if missing or unexpected:
        raise ValueError(f"{checkpoint / WEIGHTS_FILE}: does not match the student (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")


def load_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
