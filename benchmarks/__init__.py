"""runlora_fx's benchmark suite: ``python -m benchmarks layer|model|memory|planner|all [--quick] [--out DIR]``.

Every figure is measured side by side in one run (contenders interleaved, warm-up first, medians and per-round
ratios: `benchmarks.harness`). Results go to ``benchmarks/results/<suite>[_quick].json`` with a markdown table
and PNG plots beside them; docs/BENCHMARKS.md summarises the latest run.

This package imports nothing heavy at import time: `main` loads the suites when called, so that
``python -m benchmarks`` can set the OpenMP wait policy before torch starts its thread pool.
"""
from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """Entry point shared by ``python -m benchmarks`` and ``runlora-fx bench``; returns an exit code."""
    from .cli import main as _main

    return _main(argv)


__all__ = ["main"]
