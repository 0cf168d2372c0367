"""Where benchmarks keep what they download or build once (wheels, unpacked
models, the arm64 root): ``$GRAPHOPT_BENCH_CACHE``, default
``~/.cache/graphopt-bench``, outside the repository.

In tests/ because tests use what the benchmarks set up there (the arm64 root
of tests/aarch64_guest.py); benchmarks/models.py re-exports it.
"""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """The cache folder (created on demand)."""
    root = Path(os.environ.get("GRAPHOPT_BENCH_CACHE", Path.home() / ".cache" / "graphopt-bench"))
    root.mkdir(parents=True, exist_ok=True)
    return root
