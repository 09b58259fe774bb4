"""``python -m bench``: run the benchmark suite (see bench/suite.py)."""

from bench.suite import run

run()
