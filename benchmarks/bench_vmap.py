"""Section: one ``jax.vmap``-ed step over several densities vs the same runs one by one.

A hyperparameter grid is cheapest as one vmapped program: one compilation, one dispatch
per step. This measures what that costs per step. One leaf of ``1000 x 1000`` (float32
Gaussian weights); ``DENSITIES`` (4 runs). ``mask_interval = 10**6``: the selection is
made at step 0 (not timed) and no refresh is due afterwards, so every timed step is an
ordinary step.

* **vmapped**: ``jax.jit(jax.vmap(step, in_axes=(0, 0, 0, None)))`` over ``(density,
  params, state, grads)``: each run has its own parameters and state (stacked, donated),
  the gradient is shared. The density is traced, so the state is sized by
  ``max_density = max(DENSITIES)`` (``nanoadam(..., max_density=...)``, required when
  ``init`` runs under ``jax.vmap`` over densities).
* **singles sized like the grid** (a third row): the same singles with
  ``max_density=max(DENSITIES)``, i.e. the state and the per-chunk work a vmapped run
  has (``jax.vmap`` needs one shape for all runs): this isolates what vmapping costs.
* **singles**: four separately compiled steps, each ``nanoadam(lr, density=d,
  mask_interval=10**6)`` with its own static density (what one would run one at a
  time), params and state donated.

In each round the vmapped step runs a window of ``STEPS`` steps, then each single runs a
window of ``STEPS``; ``ratio_vs_singles = vmapped / (sum of the four singles)`` per round,
median over rounds (target: about 1). The same is measured for ``optax.adamw`` (4 runs
with the same hyperparameters) as a reference for what vmapping costs by itself.
``faults_per_step``: minor page faults of the process per vmapped step (see the update
section: on XLA:CPU a large scratch buffer is mapped fresh at every call);
``temp_bytes``: the compiled vmapped program's scratch (``memory_analysis``).
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nanoadam_jax as nanoadam
from benchmarks import common

TITLE = "Vmapped step over 4 densities vs 4 single runs"
LR = 1e-3
DENSITIES = (0.01, 0.05, 0.1, 0.2)
MASK_INTERVAL = 10**6
SHAPE = (1000, 1000)
FULL = {"rounds": 7, "steps": 20}
QUICK = {"rounds": 2, "steps": 3}

COLUMNS = [
    ("optimizer", "optimizer"),
    ("runs", "runs"),
    ("vmapped_ms", "vmapped ms/step"),
    ("singles_ms", "sum of singles ms/step"),
    ("ratio_vs_singles", "vmapped / singles"),
    ("faults_per_step", "page faults / vmapped step"),
    ("singles_faults_per_step", "page faults / single steps"),
    ("temp_bytes", "vmapped temp bytes"),
    ("compile_s", "vmapped compile s"),
]


def nano(density: Any, max_density: float | None = None) -> Any:
    return nanoadam.nanoadam(
        LR, density=density, mask_interval=MASK_INTERVAL, max_density=max_density
    )


class Stepper:
    """A compiled, donated step with its own params and state; ``window`` times it."""

    def __init__(self, fn, extra: tuple, params: Any, state: Any, grads: Any):
        self.extra = extra
        self.grads = grads
        t0 = time.perf_counter()
        self.compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(params, state, *extra, grads)
        self.compiled = self.compiled.compile()
        self.compile_s = time.perf_counter() - t0
        self.params, self.state = params, state
        self.step()  # step 0: the selection (not timed)
        jax.block_until_ready(self.params)
        self.faults: list[float] = []

    def step(self) -> tuple[Any, Any]:
        self.params, self.state = self.compiled(self.params, self.state, *self.extra, self.grads)
        return self.params, self.state

    def window(self, steps: int) -> float:
        seconds, faults = common.timed_window(self.step, steps)
        self.faults.append(faults)
        return seconds


def steppers(
    name: str, params: Any, grads: Any, same_state: bool = False
) -> tuple[Stepper, list[Stepper]]:
    """The vmapped stepper and the single ones of one optimizer (``same_state``: the
    singles sized like the grid, for its largest density)."""
    runs = len(DENSITIES)
    stacked = jax.tree.map(lambda x: jnp.stack([x] * runs), params)
    if name == "adamw":
        tx = optax.adamw(LR)
        step = common.update_step(tx)

        def vstep(p, s, g):
            return jax.vmap(step, in_axes=(0, 0, None))(p, s, g)

        vmapped = Stepper(vstep, (), stacked, jax.vmap(tx.init)(stacked), grads)
        singles = []
        for _ in DENSITIES:
            p = common.copy_tree(params)
            singles.append(Stepper(step, (), p, tx.init(p), grads))
        return vmapped, singles

    top = max(DENSITIES)

    def one(p, s, d, g):
        return common.update_step(nano(d, top))(p, s, g)

    def vstep(p, s, d, g):
        return jax.vmap(one, in_axes=(0, 0, 0, None))(p, s, d, g)

    dens = jnp.asarray(DENSITIES, jnp.float32)
    state = jax.vmap(lambda d, p: nano(d, top).init(p))(dens, stacked)
    vmapped = Stepper(vstep, (dens,), stacked, state, grads)
    singles = []
    for d in DENSITIES:
        tx = nano(d, top) if same_state else nano(d)
        p = common.copy_tree(params)
        singles.append(Stepper(common.update_step(tx), (), p, tx.init(p), grads))
    return vmapped, singles


def bench(rounds: int, steps: int) -> list[dict[str, Any]]:
    key = jax.random.PRNGKey(0)
    params = {"w": 0.02 * jax.random.normal(key, SHAPE)}
    grads = {"w": 1e-3 * jax.random.normal(jax.random.fold_in(key, 1), SHAPE)}
    rows = []
    nano_name = f"nanoadam d={','.join(f'{d:g}' for d in DENSITIES)}"
    for name in ("adamw", nano_name, nano_name + " (singles sized like the grid)"):
        same_state = name.endswith("(singles sized like the grid)")
        vmapped, singles = steppers(name.split(" (")[0], params, grads, same_state)

        def all_singles(singles=singles):
            return sum(s.window(steps) for s in singles)

        times = common.interleaved(
            {"vmapped": lambda v=vmapped: v.window(steps), "singles": all_singles}, rounds
        )
        ratios = [common.ratio(a, b) for a, b in zip(times["vmapped"], times["singles"])]
        ma = vmapped.compiled.memory_analysis()
        single_faults = [sum(fs) for fs in zip(*(s.faults for s in singles))]
        rows.append(
            {
                "optimizer": name,
                "runs": len(DENSITIES),
                "densities": list(DENSITIES) if name != "adamw" else None,
                "max_density": max(DENSITIES) if name != "adamw" else None,
                "leaf_shape": list(SHAPE),
                "mask_interval": MASK_INTERVAL if name != "adamw" else None,
                "rounds": rounds,
                "steps": steps,
                "vmapped_ms": 1e3 * common.median(times["vmapped"]),
                "singles_ms": 1e3 * common.median(times["singles"]),
                "ratio_vs_singles": common.median(ratios),
                "ratio_rounds": ratios,
                "faults_per_step": common.median(vmapped.faults),
                "singles_faults_per_step": common.median(single_faults),
                "temp_bytes": int(ma.temp_size_in_bytes),
                "singles_temp_bytes": [
                    int(s.compiled.memory_analysis().temp_size_in_bytes) for s in singles
                ],
                "compile_s": vmapped.compile_s,
                "singles_compile_s": sum(s.compile_s for s in singles),
            }
        )
        del vmapped, singles
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    return bench(**(QUICK if quick else FULL))
