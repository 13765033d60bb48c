"""Section: cost of selecting one leaf (the selection work of a refresh), by scope and method.

For each leaf size ``n`` (a float32 ``(n / 1000, 1000)`` matrix of Gaussian weights) and
density ``DENSITY``, the jitted time of the library's selection of that leaf, laid out as
the optimizer lays it out (:func:`nanoadam_jax.layout.leaf_layout`):

* ``scope``: ``chunk`` (the default: chunks of at most 16384 entries, ``k`` per chunk) or
  ``leaf`` (one chunk per leaf, exactly ``k`` of the whole tensor);
* ``method``: ``threshold`` (:func:`nanoadam_jax.selection.chunk_positions`, the library's:
  a 32-pass bisection on the key bits per row, no sort) or ``top_k``
  (:func:`benchmarks._selection_variants.chunk_positions_top_k`: ``jax.lax.top_k`` per row,
  then a sort of the positions).

Both compute the keys (:func:`nanoadam_jax.selection_keys`) and return the sorted positions
per chunk. Methods take turns within a round (rotated order); each measurement repeats the
call enough times to last about 50 ms; the first warm call (after ahead-of-time
compilation) is one more sample; the reported time is the median of the samples and
``ratio_vs_threshold`` divides it by the threshold search's (same scope). Every result is
checked: ``top_k`` returns the same positions as ``threshold`` (``exact_match``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import nanoadam_jax as nanoadam
from benchmarks import common
from benchmarks._selection_variants import chunk_positions_top_k

TITLE = "Selection cost of one leaf by scope and method (jitted)"
DENSITY = 0.1
METHODS = {
    "threshold": nanoadam.selection.chunk_positions,
    "top_k": chunk_positions_top_k,
}
SCOPES = ("chunk", "leaf")
#: ``{leaf size: rounds}``. The first (warm, already compiled) call of each method counts as
#: one more sample; the largest sizes get fewer rounds (a per-leaf ``top_k`` of 2.5e7 keys
#: takes seconds on a 2-core CPU).
FULL_SIZES = {10_000: 7, 100_000: 7, 1_000_000: 5, 10_000_000: 2, 25_000_000: 1}
QUICK_SIZES = {10_000: 2, 100_000: 2}
COLS = 1000
#: Target duration of one measurement (calls are repeated until about this long).
TARGET_S = 0.05

COLUMNS = [
    ("n", "leaf size"),
    ("scope", "scope"),
    ("chunk", "chunk"),
    ("method", "method"),
    ("ms", "ms (median)"),
    ("ratio_vs_threshold", "time / threshold"),
    ("exact_match", "same positions"),
    ("samples", "samples"),
    ("compile_s", "compile s"),
]


def selector(lay: Any, method: str, density: float):
    """``x -> positions`` of one leaf, as the optimizer selects it."""
    fn = METHODS[method]

    def select(x):
        keys = nanoadam.selection_keys(lay.view(x))
        return fn(keys, lay.capacity, lay.capacity)

    return select


def bench_size(n: int, rounds: int, density: float = DENSITY) -> list[dict[str, Any]]:
    shape = (max(1, n // COLS), COLS)
    x = jax.random.normal(jax.random.PRNGKey(n % 9973), shape, jnp.float32)
    rows = []
    for scope in SCOPES:
        lay = nanoadam.layout.leaf_layout(shape, scope=scope, max_density=density)
        fns: dict[str, Any] = {}
        compile_s: dict[str, float] = {}
        out: dict[str, np.ndarray] = {}
        reps: dict[str, int] = {}
        first: dict[str, float] = {}
        for m in METHODS:
            compiled, lower_s, xla_s = common.lower_and_compile(
                selector(lay, m, density), x, donate=()
            )
            compile_s[m] = lower_s + xla_s
            t0 = time.perf_counter()
            out[m] = np.asarray(jax.block_until_ready(compiled(x)))
            first[m] = time.perf_counter() - t0
            reps[m] = max(1, int(TARGET_S / max(first[m], 1e-6)))
            fns[m] = compiled

        def runner(m):
            def go():
                fn, r = fns[m], reps[m]
                t0 = time.perf_counter()
                res = None
                for _ in range(r):
                    res = fn(x)
                jax.block_until_ready(res)
                return (time.perf_counter() - t0) / r

            return go

        times = common.interleaved({m: runner(m) for m in METHODS}, rounds)
        for m in METHODS:
            times[m].insert(0, first[m])
        base = common.median(times["threshold"])
        for m in METHODS:
            t = common.median(times[m])
            rows.append(
                {
                    "n": int(np.prod(shape)),
                    "shape": list(shape),
                    "density": density,
                    "scope": scope,
                    "chunk": lay.chunk,
                    "chunks": lay.chunks,
                    "k_per_chunk": lay.capacity,
                    "method": m,
                    "ms": 1e3 * t,
                    "ms_rounds": [1e3 * v for v in times[m]],
                    "ratio_vs_threshold": common.ratio(t, base),
                    "selected": int(np.sum(out[m] < lay.chunk)),
                    "exact_match": bool(np.array_equal(out[m], out["threshold"])),
                    "samples": len(times[m]),
                    "reps_per_round": reps[m],
                    "compile_s": compile_s[m],
                }
            )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    sizes = QUICK_SIZES if quick else FULL_SIZES
    rows: list[dict[str, Any]] = []
    for n, rounds in sizes.items():
        rows += bench_size(n, rounds)
    return rows
