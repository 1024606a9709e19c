"""Benchmarks: each module has ``main(out_dir) -> dict`` that prints its figures and writes ``<name>.json``.

Figures are ratios against a baseline measured side by side in the same run, never absolute timings
compared across runs.
"""

import os

# torch reads this once, at its first large allocation: set before any benchmark allocates
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
