"""Section 4: the update, selection and memory measurements on a GPU backend.

Empty (no rows) unless ``jax.default_backend() == "gpu"``. On a GPU it reuses the CPU
sections' code at sizes that suit a GPU; every row carries a ``kind`` (``update``,
``selection`` or ``memory``) and the columns of that kind's section.
"""

from __future__ import annotations

from typing import Any

import jax

from benchmarks import bench_memory, bench_selection, bench_update

TITLE = "GPU (empty unless a GPU backend is present)"
FULL_UPDATE_SIZES = {25_000_000: 5, 100_000_000: 5}
QUICK_UPDATE_SIZES = {1_000_000: 2}
FULL_SELECTION_SIZES = {1_000_000: 5, 25_000_000: 5, 100_000_000: 3}
QUICK_SELECTION_SIZES = {100_000: 2}
UPDATE_DENSITIES = (0.01, 0.1)

COLUMNS_BY_KIND = {
    "update": bench_update.COLUMNS,
    "selection": bench_selection.COLUMNS,
    "memory": bench_memory.COLUMNS,
}
COLUMNS: list[tuple[str, str]] = []


def available() -> bool:
    return jax.default_backend() == "gpu"


def run(quick: bool = False) -> list[dict[str, Any]]:
    if not available():
        return []
    rows: list[dict[str, Any]] = []
    sizes = QUICK_UPDATE_SIZES if quick else FULL_UPDATE_SIZES
    for n, rounds in sizes.items():
        for row in bench_update.bench_size(n, rounds, 2 if quick else 5, UPDATE_DENSITIES):
            rows.append({"kind": "update", **row})
    sizes = QUICK_SELECTION_SIZES if quick else FULL_SELECTION_SIZES
    for n, rounds in sizes.items():
        for row in bench_selection.bench_size(n, rounds):
            rows.append({"kind": "selection", **row})
    configs = bench_memory.QUICK_CONFIGS if quick else bench_memory.FULL_CONFIGS[-1:]
    for cfg in configs:
        for row in bench_memory.bench_config(cfg):
            rows.append({"kind": "memory", **row})
    return rows
