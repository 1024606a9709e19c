"""Benchmarks: each module has ``main(out_dir) -> dict`` that prints its figures and writes ``<name>.json``.

Figures are ratios against a baseline measured side by side in the same run, never absolute timings
compared across runs.

The benchmarks run with torch's allocator settings as the stages get them (no ``THP_MEM_ALLOC_ENABLE``):
with huge-page-backed blocks, freed and allocated again every step, the AuxK step measured 0.63-0.66 of its
limit against 0.68-0.69 without (``python -m bench train``).
"""
