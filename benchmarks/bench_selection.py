"""Section 2: cost of one selection (a mask refresh of one leaf) by method.

For each leaf size ``n`` (a float32 vector of Gaussian weights) and density
``DENSITY``, the jitted time of

* ``nanoadam.select_mask(x, d, method=m)`` for ``m`` in ``bisection`` (the default:
  32 counting passes over the float bits, no sort), ``sort`` (stable argsort) and
  ``top_k`` (``jax.lax.top_k``);
* ``jax.lax.approx_min_k(|x|, k)`` followed by a scatter into a boolean mask (so that
  every row produces the same thing). Only TPUs run an approximate algorithm; on CPU and
  GPU XLA falls back to an exact top-k, and the label says so.

Methods take turns within a round (rotated order); each measurement repeats the call
enough times to last about 50 ms; the first warm call (after ahead-of-time compilation)
is one more sample; the reported time is the median of the samples and
``ratio_vs_bisection`` divides it by the bisection's. Every mask is checked: exactly
``k`` entries, and (exact methods) the same mask as the bisection's; for
``approx_min_k`` the recall of the bisection's selection is reported.

All methods are traced inside ``jax.ensure_compile_time_eval()`` so that ``k`` is a
compile-time constant (``method="top_k"`` needs one; see :mod:`benchmarks._compat`).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import nanoadam_jax as nanoadam
from benchmarks import common

TITLE = "Selection cost by method (one leaf, jitted)"
DENSITY = 0.1
METHODS = ("bisection", "sort", "top_k", "approx_min_k")
#: ``{leaf size: rounds}``. The first (warm, already compiled) call of each method counts as
#: one more sample; the largest sizes get fewer rounds because sorting 2.5e7 keys on a
#: 2-core CPU takes tens of seconds.
FULL_SIZES = {10_000: 7, 100_000: 7, 1_000_000: 5, 10_000_000: 2, 25_000_000: 1}
QUICK_SIZES = {10_000: 3, 100_000: 2}
#: Target duration of one measurement (calls are repeated until about this long).
TARGET_S = 0.05

COLUMNS = [
    ("n", "leaf size"),
    ("label", "method"),
    ("ms", "ms (median)"),
    ("ratio_vs_bisection", "time / bisection"),
    ("exact_match", "same mask as bisection"),
    ("recall", "recall"),
    ("samples", "samples"),
    ("compile_s", "compile s"),
]


def num_selected(n: int, density: float) -> int:
    static = getattr(nanoadam.selection, "num_selected_static", None)
    if static is not None:
        return int(static(n, density))
    return int(nanoadam.num_selected(n, density))


def selector(method: str, n: int, density: float):
    """A function ``x -> bool mask`` for one method."""
    if method == "approx_min_k":
        k = num_selected(n, density)

        def approx(x):
            _, idx = jax.lax.approx_min_k(jnp.abs(x.reshape(-1)), k)
            return jnp.zeros((n,), bool).at[idx].set(True).reshape(x.shape)

        return approx

    def select(x):
        with jax.ensure_compile_time_eval():
            return nanoadam.select_mask(x, density, method=method)

    return select


def method_label(method: str, backend: str) -> str:
    if method == "approx_min_k":
        if backend == "tpu":
            return "approx_min_k (approximate, recall 0.95)"
        return f"approx_min_k (exact fallback on {backend})"
    return method


def bench_size(n: int, rounds: int, density: float = DENSITY) -> list[dict[str, Any]]:
    backend = jax.default_backend()
    x = jax.random.normal(jax.random.PRNGKey(n % 9973), (n,), jnp.float32)
    k = num_selected(n, density)
    fns: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    masks: dict[str, np.ndarray] = {}
    reps: dict[str, int] = {}
    first: dict[str, float] = {}
    for m in METHODS:
        t0 = time.perf_counter()
        fn = jax.jit(selector(m, n, density)).lower(x).compile()
        compile_s[m] = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(x))
        first[m] = time.perf_counter() - t0
        masks[m] = np.asarray(out)
        reps[m] = max(1, int(TARGET_S / max(first[m], 1e-6)))
        fns[m] = fn

    def runner(m):
        def go():
            fn, r = fns[m], reps[m]
            t0 = time.perf_counter()
            out = None
            for _ in range(r):
                out = fn(x)
            jax.block_until_ready(out)
            return (time.perf_counter() - t0) / r

        return go

    times = common.interleaved({m: runner(m) for m in METHODS}, rounds)
    for m in METHODS:
        times[m].insert(0, first[m])
    base = common.median(times["bisection"])
    ref = masks["bisection"]
    rows = []
    for m in METHODS:
        t = common.median(times[m])
        mask = masks[m]
        exact = m != "approx_min_k"
        rows.append(
            {
                "n": n,
                "density": density,
                "k": k,
                "method": m,
                "label": method_label(m, backend),
                "ms": 1e3 * t,
                "ms_rounds": [1e3 * v for v in times[m]],
                "ratio_vs_bisection": common.ratio(t, base),
                "selected": int(mask.sum()),
                "exact_match": bool(np.array_equal(mask, ref)) if exact else None,
                "recall": float((mask & ref).sum() / max(1, ref.sum())),
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
