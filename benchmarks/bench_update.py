"""Section 1: update time and optimizer-state bytes, NanoAdam vs ``optax.adam(w)``.

For each model size (a synthetic tree of 2-D leaves, see
:func:`benchmarks.common.synthetic_shapes`; every leaf is sparse) and each optimizer:

* **time**: one jitted update ``(params, state, grads) -> (params, state)`` with
  ``params`` and ``state`` donated, compiled ahead of time and run once (step 0, which is
  a refresh for NanoAdam). Then, in each round, every optimizer runs a window of
  ``STEPS = 100`` consecutive updates (dispatched back to back, blocked at the end); with
  ``mask_interval = 100`` every such window holds exactly one refresh. Optimizers take
  turns inside a round (rotated order) and the reported time per step is the median over
  rounds. ``ratio_vs_adamw`` is that median divided by AdamW's.
* **refresh cost**: single blocked steps, interleaved: a NanoAdam step forced to refresh
  (its step counter set to 0, same executable), a normal NanoAdam step and an AdamW step;
  medians over repetitions. ``refresh_cost_adamw_steps = (refresh - normal) / adamw``:
  the extra time of one refresh in AdamW steps (spread over ``mask_interval`` steps).
* **sizes**: ``FULL_PLAN`` (1M, 10M, 25M with every density, the variants and
  ``optax.adam`` too; 100M with one round, densities 0.01 and 0.1 only, to bound the run
  time on a 2-core machine) or ``QUICK_PLAN`` (1M, densities 0.01 and 0.1).
* **variants** (density 0.1): ``nanoadam-bf16`` stores its moments in bfloat16
  (``moment_dtype=jnp.bfloat16``, the paper's memory model; the update math stays
  float32); ``nanoadam-leaf`` selects per leaf (``scope="leaf"``: exactly ``k`` of the
  whole tensor, one chunk per leaf, ``int32`` positions) instead of per chunk.
* **page faults**: minor page faults of the process per step of the timed windows
  (``faults_per_step``). On XLA:CPU a program's scratch buffer is allocated for every
  call; a large one (the refresh branch's scratch counts even on steps that skip it) is
  mapped fresh each time, and every page touched is a fault.
* **state bytes**: sum of ``nbytes`` over the optimizer state's leaves.
  ``state_floor``: per selected entry the two moments (float32: 8 bytes, bfloat16: 4)
  and one stored position (``uint16`` for chunks of at most 65535 entries, else
  ``int32``), over AdamW's 8 bytes per entry: ``1.25 * d`` by default.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nanoadam_jax as nanoadam
from benchmarks import common

TITLE = "Update time and optimizer state: nanoadam vs optax.adam / optax.adamw"
LR = 1e-3
MASK_INTERVAL = 100
STEPS = 100
DENSITIES = (0.01, 0.05, 0.1, 0.5)
#: Variants run at this density (one more row per size each, where the plan asks for them).
VARIANT_DENSITY = 0.1
#: name prefix -> (keyword arguments of ``nanoadam``, moment bytes, index bytes per entry)
VARIANTS = {
    "nanoadam-bf16": ({"moment_dtype": jnp.bfloat16}, 4, 2),
    "nanoadam-leaf": ({"scope": "leaf"}, 8, 4),
}


@dataclass(frozen=True)
class Plan:
    """What runs at one model size."""

    n_params: int
    rounds: int
    refresh_reps: int
    densities: tuple[float, ...] = DENSITIES
    with_adam: bool = True
    variants: bool = True


#: The largest size gets one round, two densities, no variants and no ``optax.adam`` row: on
#: a 2-core machine one window of 100 NanoAdam steps at 100M parameters takes minutes.
FULL_PLAN = (
    Plan(1_000_000, rounds=5, refresh_reps=5),
    Plan(10_000_000, rounds=5, refresh_reps=5),
    Plan(25_000_000, rounds=3, refresh_reps=3),
    Plan(
        100_000_000,
        rounds=1,
        refresh_reps=2,
        densities=(0.01, 0.1),
        with_adam=False,
        variants=False,
    ),
)
QUICK_PLAN = (Plan(1_000_000, rounds=2, refresh_reps=2, densities=(0.01, 0.1)),)

COLUMNS = [
    ("size", "size"),
    ("optimizer", "optimizer"),
    ("step_ms", "ms/step (median)"),
    ("ratio_vs_adamw", "time / adamw"),
    ("state_bytes", "state bytes"),
    ("state_ratio_vs_adamw", "state / adamw"),
    ("state_floor", "floor"),
    ("refresh_step_ms", "refresh step ms"),
    ("normal_step_ms", "normal step ms"),
    ("refresh_cost_adamw_steps", "refresh cost (adamw steps)"),
    ("faults_per_step", "page faults / step"),
    ("rounds", "rounds"),
    ("compile_s", "compile s"),
]


def optimizers(
    densities: tuple[float, ...] = DENSITIES, with_adam: bool = True, variants: bool = True
) -> dict[str, Any]:
    txs: dict[str, Any] = {"adamw": optax.adamw(LR)}
    if with_adam:
        txs["adam"] = optax.adam(LR)
    for d in densities:
        txs[f"nanoadam d={d:g}"] = nanoadam.nanoadam(LR, density=d, mask_interval=MASK_INTERVAL)
    if variants and VARIANT_DENSITY in densities:
        for prefix, (kwargs, _, _) in VARIANTS.items():
            txs[f"{prefix} d={VARIANT_DENSITY:g}"] = nanoadam.nanoadam(
                LR, density=VARIANT_DENSITY, mask_interval=MASK_INTERVAL, **kwargs
            )
    return txs


def floor_of(name: str, density: float) -> float:
    """The state floor of a row (see the module docstring)."""
    prefix = name.split(" ")[0]
    _, moment_bytes, index_bytes = VARIANTS.get(prefix, (None, 8, 2))
    return common.state_floor(density, moment_bytes, index_bytes)


class Runner:
    """One optimizer's params, state and compiled update (params and state donated)."""

    def __init__(self, tx: Any, params: Any, grads: Any):
        self.tx = tx
        self.grads = grads
        self.faults: list[float] = []
        self.params = common.copy_tree(params)
        self.state = tx.init(self.params)
        self.state_bytes = common.tree_nbytes(self.state)
        t0 = time.perf_counter()
        jitted = jax.jit(common.update_step(tx), donate_argnums=(0, 1))
        self.compiled = jitted.lower(self.params, self.state, grads).compile()
        self.compile_s = time.perf_counter() - t0
        self.step()  # step 0: a refresh for NanoAdam; the next STEPS steps hold exactly one.
        jax.block_until_ready(self.params)

    def step(self) -> tuple[Any, Any]:
        self.params, self.state = self.compiled(self.params, self.state, self.grads)
        return self.params, self.state

    def window(self, steps: int) -> float:
        """Seconds per step over ``steps`` back-to-back updates (page faults counted)."""
        seconds, faults = common.timed_window(self.step, steps)
        self.faults.append(faults)
        return seconds

    def single(self, refresh: bool = False) -> float:
        """Seconds of one blocked update (forced to refresh if asked)."""
        jax.block_until_ready((self.params, self.state))
        if refresh:
            self.state = common.force_refresh(self.state)
        t0 = time.perf_counter()
        self.step()
        jax.block_until_ready((self.params, self.state))
        return time.perf_counter() - t0


def size_label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k"


def bench_size(
    n_params: int,
    rounds: int,
    refresh_reps: int,
    densities: tuple[float, ...] = DENSITIES,
    steps: int = STEPS,
    with_adam: bool = True,
    variants: bool = True,
) -> list[dict[str, Any]]:
    """Rows for one model size."""
    params = common.synthetic_params(n_params, seed=0)
    key = jax.random.PRNGKey(1)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(key, p.shape, p.dtype), params)
    txs = optimizers(densities, with_adam, variants)
    runners = {name: Runner(tx, params, grads) for name, tx in txs.items()}
    del params

    times = common.interleaved(
        {n: (lambda r=r: r.window(steps)) for n, r in runners.items()}, rounds
    )

    # Refresh cost: blocked single steps, interleaved.
    adamw_runner = runners["adamw"]
    singles: dict[str, Any] = {"adamw": adamw_runner.single}
    for name, r in runners.items():
        if name.startswith("nanoadam"):
            singles[f"{name}/refresh"] = lambda r=r: r.single(refresh=True)
            singles[f"{name}/normal"] = lambda r=r: r.single()
    one = {k: common.median(v) for k, v in common.interleaved(singles, refresh_reps).items()}

    adamw_t = common.median(times["adamw"])
    adamw_state = runners["adamw"].state_bytes
    n_total = common.num_params(grads)
    rows = []
    for name, r in runners.items():
        t = common.median(times[name])
        nano = name.startswith("nanoadam")
        density = float(name.split("=")[1]) if nano else None
        row: dict[str, Any] = {
            "size": size_label(n_params),
            "n_params": n_total,
            "n_leaves": len(jax.tree.leaves(grads)),
            "optimizer": name,
            "density": density,
            "steps": steps,
            "mask_interval": MASK_INTERVAL if nano else None,
            "rounds": rounds,
            "step_ms": 1e3 * t,
            "step_ms_rounds": [1e3 * x for x in times[name]],
            "ratio_vs_adamw": common.ratio(t, adamw_t),
            "ratio_vs_adamw_rounds": [
                common.ratio(a, b) for a, b in zip(times[name], times["adamw"])
            ],
            "state_bytes": r.state_bytes,
            "state_ratio_vs_adamw": common.ratio(r.state_bytes, adamw_state),
            "state_floor": floor_of(name, density) if nano else None,
            "faults_per_step": common.median(r.faults),
            "compile_s": r.compile_s,
            "refresh_step_ms": None,
            "normal_step_ms": None,
            "adamw_single_step_ms": 1e3 * one["adamw"],
            "refresh_cost_adamw_steps": None,
            "refresh_step_adamw_steps": None,
        }
        if nano:
            ref, nor = one[f"{name}/refresh"], one[f"{name}/normal"]
            row.update(
                refresh_step_ms=1e3 * ref,
                normal_step_ms=1e3 * nor,
                refresh_cost_adamw_steps=common.ratio(ref - nor, one["adamw"]),
                refresh_step_adamw_steps=common.ratio(ref, one["adamw"]),
            )
        rows.append(row)
    del runners
    gc.collect()
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for plan in QUICK_PLAN if quick else FULL_PLAN:
        rows += bench_size(
            plan.n_params,
            plan.rounds,
            plan.refresh_reps,
            plan.densities,
            with_adam=plan.with_adam,
            variants=plan.variants,
        )
    return rows
