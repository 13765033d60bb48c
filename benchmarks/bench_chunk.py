"""Section: the chunk length (``chunk_size``) and the selection method, in the optimizer.

NanoAdam selects ``k`` entries per chunk of at most ``chunk_size`` consecutive entries
(default :data:`nanoadam_jax.layout.DEFAULT_CHUNK_SIZE`). This measures what the choice
costs on a synthetic tree of 2-D leaves (:func:`benchmarks.common.synthetic_params`, all
sparse; full: 16 leaves of ``1024 x 1024``, 16.8M parameters; quick: 4 leaves of
``64 x 1024``), density 0.1, for ``chunk_size`` in ``CHUNK_SIZES``:

* **ordinary step**: ``nanoadam(..., mask_interval=10**9, chunk_size=c)``: after step 0
  (not timed) no refresh is due;
* **refresh step**: ``mask_interval=1``: every step re-selects (and carries the moments
  over, ``refresh_policy="keep"``) before its update;
* **adamw**: ``optax.adamw`` on the same tree.

Each is a jitted, donated ``update + apply_updates`` step; in every round each runs a
window of steps (ordinary: ``steps``, refresh: ``refresh_steps``), optimizers in turns
(rotated), median over rounds. ``step_ratio_vs_adamw`` and ``refresh_ratio_vs_adamw``
divide the ordinary and the refresh step by AdamW's step; ``refresh_cost_adamw_steps =
(refresh - ordinary) / adamw``: one refresh in AdamW steps (spread over ``mask_interval``
steps in training).

**Selection method** (rows with ``method="top_k"``): the default chunk again, with the
library's per-row threshold search (:func:`nanoadam_jax.selection.chunk_positions`)
replaced by ``jax.lax.top_k`` per row
(:func:`benchmarks._selection_variants.chunk_positions_top_k`, patched into
``nanoadam_jax.selection`` while the step is traced). Ordinary steps do not select, so
only the refresh step differs.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Iterator
from typing import Any

import jax
import optax

import nanoadam_jax as nanoadam
from benchmarks import common
from benchmarks._selection_variants import chunk_positions_top_k

TITLE = "Chunk length and selection method: ordinary and refresh steps vs AdamW"
LR = 1e-3
DENSITY = 0.1
CHUNK_SIZES = (1024, 4096, 16384, 65536)
FULL = {"n_params": 16 * 2**20, "rounds": 5, "steps": 10, "refresh_steps": 2}
QUICK = {"n_params": 2**18, "rounds": 2, "steps": 3, "refresh_steps": 1}

COLUMNS = [
    ("chunk_size", "chunk_size"),
    ("chunk", "chunk used"),
    ("method", "method"),
    ("index_dtype", "positions"),
    ("step_ms", "ordinary ms"),
    ("step_ratio_vs_adamw", "ordinary / adamw"),
    ("refresh_ms", "refresh ms"),
    ("refresh_ratio_vs_adamw", "refresh / adamw"),
    ("refresh_cost_adamw_steps", "refresh cost (adamw steps)"),
    ("state_ratio_vs_adamw", "state / adamw"),
    ("compile_s", "compile s (both)"),
]


@contextlib.contextmanager
def selection_method(method: str) -> Iterator[None]:
    """Trace NanoAdam with ``method`` as its per-chunk selection."""
    if method == "threshold":
        yield
        return
    sel = nanoadam.selection
    original = sel.chunk_positions
    sel.chunk_positions = chunk_positions_top_k
    try:
        yield
    finally:
        sel.chunk_positions = original


class Runner:
    """A compiled, donated step with its own params and state."""

    def __init__(self, tx: Any, params: Any, grads: Any, method: str = "threshold"):
        self.grads = grads
        self.params = common.copy_tree(params)
        self.state = tx.init(self.params)
        self.state_bytes = common.tree_nbytes(self.state)
        with selection_method(method):
            t0 = time.perf_counter()
            self.compiled = (
                jax.jit(common.update_step(tx), donate_argnums=(0, 1))
                .lower(self.params, self.state, grads)
                .compile()
            )
            self.compile_s = time.perf_counter() - t0
        self.step()  # step 0: the first selection (not timed)
        jax.block_until_ready(self.params)

    def step(self) -> None:
        self.params, self.state = self.compiled(self.params, self.state, self.grads)

    def window(self, steps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        jax.block_until_ready((self.params, self.state))
        return (time.perf_counter() - t0) / steps


def index_dtype(state: Any) -> str:
    """The dtype of the stored positions (``uint16`` or ``int32``)."""
    dtypes = set()
    for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nanoadam.SparseUpdateState)):
        if isinstance(x, nanoadam.SparseUpdateState):
            dtypes |= {str(a.dtype) for a in jax.tree.leaves(x.selected)}
    return ",".join(sorted(dtypes))


def chunk_used(params: Any, chunk_size: int) -> int:
    shape = jax.tree.leaves(params)[0].shape
    return nanoadam.layout.chunk_length(shape, chunk_size)


def bench(n_params: int, rounds: int, steps: int, refresh_steps: int) -> list[dict[str, Any]]:
    params = common.synthetic_params(n_params, seed=0)
    key = jax.random.PRNGKey(1)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(key, p.shape, p.dtype), params)
    default = nanoadam.layout.DEFAULT_CHUNK_SIZE
    configs = [(c, "threshold") for c in CHUNK_SIZES] + [(default, "top_k")]
    adamw = Runner(optax.adamw(LR), params, grads)
    runners: dict[str, Any] = {"adamw": lambda: adamw.window(steps)}
    pairs = {}
    for c, method in configs:
        label = f"c={c} {method}"

        def tx(m, c=c):
            return nanoadam.nanoadam(LR, density=DENSITY, mask_interval=m, chunk_size=c)

        ordinary = Runner(tx(10**9), params, grads, method)
        refresh = Runner(tx(1), params, grads, method)
        pairs[label] = (c, method, ordinary, refresh)
        runners[f"{label}/ordinary"] = lambda r=ordinary: r.window(steps)
        runners[f"{label}/refresh"] = lambda r=refresh: r.window(refresh_steps)
    times = common.interleaved(runners, rounds)
    t_adamw = common.median(times["adamw"])
    rows = []
    for label, (c, method, ordinary, refresh) in pairs.items():
        t_step = common.median(times[f"{label}/ordinary"])
        t_refresh = common.median(times[f"{label}/refresh"])
        rows.append(
            {
                "n_params": common.num_params(params),
                "n_leaves": len(jax.tree.leaves(params)),
                "leaf_shape": list(jax.tree.leaves(params)[0].shape),
                "density": DENSITY,
                "chunk_size": c,
                "chunk": chunk_used(params, c),
                "default_chunk": c == default,
                "method": method,
                "index_dtype": index_dtype(ordinary.state),
                "rounds": rounds,
                "steps": steps,
                "refresh_steps": refresh_steps,
                "adamw_ms": 1e3 * t_adamw,
                "step_ms": 1e3 * t_step,
                "refresh_ms": 1e3 * t_refresh,
                "step_ratio_vs_adamw": common.ratio(t_step, t_adamw),
                "refresh_ratio_vs_adamw": common.ratio(t_refresh, t_adamw),
                "refresh_cost_adamw_steps": common.ratio(t_refresh - t_step, t_adamw),
                "step_ratio_rounds": [
                    common.ratio(a, b) for a, b in zip(times[f"{label}/ordinary"], times["adamw"])
                ],
                "refresh_ratio_rounds": [
                    common.ratio(a, b) for a, b in zip(times[f"{label}/refresh"], times["adamw"])
                ],
                "state_bytes": ordinary.state_bytes,
                "state_ratio_vs_adamw": common.ratio(ordinary.state_bytes, adamw.state_bytes),
                "compile_s": ordinary.compile_s + refresh.compile_s,
            }
        )
    gc.collect()
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    return bench(**(QUICK if quick else FULL))
