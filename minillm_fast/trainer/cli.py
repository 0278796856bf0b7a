"""Command line: ``minillm-fast train CONFIG.yaml [key=value ...]`` (also ``python -m minillm_fast.trainer.cli``).

Several processes: ``torchrun --nproc_per_node=N -m minillm_fast.trainer train CONFIG.yaml ...`` (every rank runs
this; only rank 0 prints and writes). See the README's "Multi-process training".

``train --help`` lists every configuration key with its type, default and meaning; ``defaults`` prints a complete
YAML config to start from.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from .config import TrainConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm-fast", description="MiniLLM distillation and its baselines.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train", help="train a student", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train with CONFIG.yaml, then key=value overrides (they win).",
        epilog="configuration keys (defaults are the MiniLLM reference hyper-parameters):\n"
               + TrainConfig.help_text())
    train.add_argument("config", help="YAML file of key: value pairs (use - for none)")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="configuration overrides")
    commands.add_parser("defaults", help="print the default configuration as YAML")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "defaults":
        print(TrainConfig().to_yaml(), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cfg = TrainConfig.load(None if args.config == "-" else args.config, args.overrides)
    except (OSError, ValueError) as e:
        print(f"minillm-fast: {e}", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from .loop import train  # heavy imports (transformers) only once the config is known to be valid

    ours = dist.is_available() and not dist.is_initialized()  # under torchrun, train() joins the job
    try:
        results = train(cfg)
        if results and (not dist.is_initialized() or dist.get_rank() == 0):
            print(json.dumps(results))
    finally:
        if ours and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
