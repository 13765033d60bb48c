"""Section: the update, selection, chunk and memory measurements on a GPU backend.

Empty (no rows) unless ``jax.default_backend() == "gpu"``. On a GPU it reuses the CPU
sections' code at sizes that suit a GPU; every row carries a ``kind`` (``update``,
``selection``, ``chunk`` or ``memory``) and the columns of that kind's section. A kind that
fails is recorded as one row ``{"kind": ..., "error": ...}`` and the others still run.
"""

from __future__ import annotations

import traceback
from typing import Any

import jax

from benchmarks import bench_chunk, bench_memory, bench_selection, bench_update

TITLE = "GPU (empty unless a GPU backend is present)"
FULL_UPDATE_SIZES = {25_000_000: 5, 100_000_000: 5}
QUICK_UPDATE_SIZES = {1_000_000: 2}
FULL_SELECTION_SIZES = {1_000_000: 5, 25_000_000: 5}
QUICK_SELECTION_SIZES = {100_000: 2}
UPDATE_DENSITIES = (0.01, 0.1)
FULL_CHUNK = {"n_params": 64 * 2**20, "rounds": 5, "steps": 20, "refresh_steps": 5}

COLUMNS_BY_KIND = {
    "update": bench_update.COLUMNS,
    "selection": bench_selection.COLUMNS,
    "chunk": bench_chunk.COLUMNS,
    "memory": bench_memory.COLUMNS,
    "error": [("kind", "kind"), ("failed", "failed"), ("error", "error")],
}
COLUMNS: list[tuple[str, str]] = []


def available() -> bool:
    return jax.default_backend() == "gpu"


def _update(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for n, rounds in (QUICK_UPDATE_SIZES if quick else FULL_UPDATE_SIZES).items():
        rows += bench_update.bench_size(
            n, rounds, 2 if quick else 5, UPDATE_DENSITIES, variants=not quick
        )
    return rows


def _selection(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for n, rounds in (QUICK_SELECTION_SIZES if quick else FULL_SELECTION_SIZES).items():
        rows += bench_selection.bench_size(n, rounds)
    return rows


def _chunk(quick: bool) -> list[dict[str, Any]]:
    return bench_chunk.bench(**(bench_chunk.QUICK if quick else FULL_CHUNK))


def _memory(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for cfg in bench_memory.QUICK_CONFIGS if quick else bench_memory.FULL_CONFIGS[-1:]:
        rows += bench_memory.bench_config(cfg)
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    if not available():
        return []
    rows: list[dict[str, Any]] = []
    for kind, fn in (
        ("update", _update),
        ("selection", _selection),
        ("chunk", _chunk),
        ("memory", _memory),
    ):
        try:
            rows += [{"kind": kind, **row} for row in fn(quick)]
        except Exception as e:  # one failing kind must not lose the others' rows
            rows.append(
                {
                    "kind": "error",
                    "failed": kind,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                    "traceback": traceback.format_exc(limit=8),
                }
            )
    return rows
