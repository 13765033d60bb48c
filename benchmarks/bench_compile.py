"""Section: compile time of the jitted update as the number of leaves grows.

A tree of ``N`` leaves of ``256 x 256`` (``{"layer_000": {"kernel": w}, ...}``, all sparse
under the default labels) for ``N`` in ``FULL_LEAVES`` (quick: ``QUICK_LEAVES``). For each
optimizer the step ``(params, state, grads) -> (params, state)`` (``tx.update`` then
``optax.apply_updates``; params and state donated) is lowered from
``jax.ShapeDtypeStruct`` inputs and compiled ahead of time, side by side in one process:
``lower_s`` (tracing and lowering), ``compile_s`` (XLA's ``.compile()``) and their sum
``total_s``; ``compile_ratio_vs_adamw`` and ``total_ratio_vs_adamw`` divide them by
AdamW's at the same ``N``. ``hlo_instructions`` counts the instructions of the optimized
HLO (every computation: fusions, loop bodies, both branches of the refresh conditional).

NanoAdam is ``nanoadam(1e-3, density=0.1, mask_interval=100)`` (the defaults): its program
holds the ordinary step and the refresh branch (selection and carry-over of the moments);
leaves of the same shape share one refresh program (a loop over the stacked leaves), so
its size should grow with the number of distinct shapes, not of leaves.
"""

from __future__ import annotations

import gc
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nanoadam_jax as nanoadam
from benchmarks import common

TITLE = "Compile time of the jitted update vs the number of leaves"
LR = 1e-3
DENSITY = 0.1
SHAPE = (256, 256)
FULL_LEAVES = (8, 32, 128, 512)
QUICK_LEAVES = (8, 32)

COLUMNS = [
    ("n_leaves", "leaves"),
    ("n_params", "params"),
    ("optimizer", "optimizer"),
    ("lower_s", "lower s"),
    ("compile_s", "compile s"),
    ("total_s", "total s"),
    ("compile_ratio_vs_adamw", "compile / adamw"),
    ("total_ratio_vs_adamw", "total / adamw"),
    ("hlo_instructions", "HLO instructions"),
    ("hlo_ratio_vs_adamw", "HLO / adamw"),
]


def optimizers() -> dict[str, Any]:
    return {
        "adamw": optax.adamw(LR),
        f"nanoadam d={DENSITY:g}": nanoadam.nanoadam(LR, density=DENSITY, mask_interval=100),
    }


def tree_of(n_leaves: int) -> dict[str, Any]:
    """``n_leaves`` leaves of :data:`SHAPE` as ``ShapeDtypeStruct``s (nothing allocated)."""
    leaf = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
    return {f"layer_{i:03d}": {"kernel": leaf} for i in range(n_leaves)}


def bench_leaves(n_leaves: int) -> list[dict[str, Any]]:
    params = tree_of(n_leaves)
    stats = {}
    for name, tx in optimizers().items():
        state = jax.eval_shape(tx.init, params)
        compiled, lower_s, compile_s = common.lower_and_compile(
            common.update_step(tx), params, state, params
        )
        stats[name] = {
            "lower_s": lower_s,
            "compile_s": compile_s,
            "total_s": lower_s + compile_s,
            "hlo_instructions": common.hlo_instructions(compiled),
        }
        del compiled
        gc.collect()
    base = stats["adamw"]
    rows = []
    for name, st in stats.items():
        rows.append(
            {
                "n_leaves": n_leaves,
                "leaf_shape": list(SHAPE),
                "n_params": n_leaves * SHAPE[0] * SHAPE[1],
                "optimizer": name,
                **st,
                "compile_ratio_vs_adamw": common.ratio(st["compile_s"], base["compile_s"]),
                "total_ratio_vs_adamw": common.ratio(st["total_s"], base["total_s"]),
                "hlo_ratio_vs_adamw": common.ratio(
                    st["hlo_instructions"], base["hlo_instructions"]
                ),
            }
        )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in QUICK_LEAVES if quick else FULL_LEAVES:
        rows += bench_leaves(n)
    return rows
