"""The minillm_fast benchmark suite: ``python -m benchmarks.run --help``."""
