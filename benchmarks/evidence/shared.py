"""What several experiments share: the default variant, LR-grid sweeps, state bytes, timing."""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import nanoadam_jax as nanoadam
from benchmarks.common import tree_nbytes
from benchmarks.evidence.runner import Runner, _compile, batch_indices
from benchmarks.evidence.settings import ADAMW_WEIGHT_DECAY, Settings, Sweep, Variant
from benchmarks.evidence.stats import lr_table
from benchmarks.evidence.tasks.base import Task


def default_variant(sw: Sweep) -> Variant:
    return Variant("nanoadam", mask_interval=sw.mask_interval)


def _grid(
    runner: Runner, sw: Sweep, variant: Variant, density: float | None = None
) -> dict[str, Any]:
    """``variant`` over ``sw``'s LR grid (the default variant: at every density)."""
    s = runner.s
    if variant.method == "adamw":
        return lr_table(runner.runs(sw.task, variant, sw.lr_grid))
    d = s.densities[0] if density is None else density
    dens = s.densities if variant == default_variant(sw) else (d,)
    return lr_table(runner.runs(sw.task, variant, sw.lr_grid, dens), d)


def state_bytes(task: Task, s: Settings, mask_interval: int) -> dict[str, int]:
    out = {"adamw": tree_nbytes(jax.eval_shape(optax.adamw(1e-3).init, task.params))}
    for d in s.densities:
        tx = nanoadam.nanoadam(1e-3, density=d, mask_interval=mask_interval)
        out[f"nanoadam d={d:g}"] = tree_nbytes(jax.eval_shape(tx.init, task.params))
    out["params"] = tree_nbytes(task.params)
    return out


def time_steps(task: Task, s: Settings) -> dict[str, Any]:
    """Wall and CPU time per training step, single run (no vmap), rounds interleaved."""
    txs = {
        "adamw": optax.adamw(1e-3, weight_decay=ADAMW_WEIGHT_DECAY),
        "nanoadam": nanoadam.nanoadam(1e-3, density=s.densities[0], mask_interval=s.mask_interval),
    }
    inputs, y = jax.tree.map(jnp.asarray, task.train)
    state, fns = {}, {}
    for name, tx in txs.items():

        def chunk(p, o, idx, inputs, y, tx=tx):
            def step(carry, i):
                p, o = carry
                batch = tuple(a[i] for a in inputs)
                loss, g = jax.value_and_grad(task.loss)(p, task.frozen, batch, y[i])
                u, o = tx.update(g, o, p)
                return (optax.apply_updates(p, u), o), loss

            (p, o), losses = jax.lax.scan(step, (p, o), idx)
            return p, o, losses[-1]

        p = jax.tree.map(jnp.copy, task.params)
        state[name] = (p, tx.init(p))
        fns[name] = jax.jit(chunk, donate_argnums=(0, 1))
    idx = batch_indices(len(y), s.timing_steps * (s.timing_rounds + 1), s.batch_size, 0)
    idx = jnp.asarray(idx.reshape(s.timing_rounds + 1, s.timing_steps, s.batch_size))
    for name in txs:
        fns[name] = _compile(fns[name], (*state[name], idx[0], inputs, y), s)
    wall: dict[str, list[float]] = {n: [] for n in txs}
    cpu: dict[str, list[float]] = {n: [] for n in txs}
    for r in range(s.timing_rounds + 1):  # round 0 warms up (not counted)
        names = list(txs) if r % 2 == 0 else list(txs)[::-1]
        for name in names:
            w0, c0 = time.perf_counter(), time.process_time()
            p, o, loss = fns[name](*state[name], idx[r], inputs, y)
            jax.block_until_ready(loss)
            state[name] = (p, o)
            if r:
                wall[name].append((time.perf_counter() - w0) / s.timing_steps)
                cpu[name].append((time.process_time() - c0) / s.timing_steps)
    med = {
        n: {"wall_ms": 1e3 * statistics.median(wall[n]), "cpu_ms": 1e3 * statistics.median(cpu[n])}
        for n in txs
    }
    return {
        "per_step": med,
        "ratio_wall": med["nanoadam"]["wall_ms"] / med["adamw"]["wall_ms"],
        "ratio_cpu": med["nanoadam"]["cpu_ms"] / med["adamw"]["cpu_ms"],
        "rounds": s.timing_rounds,
        "steps_per_round": s.timing_steps,
        "raw_wall_s_per_step": wall,
        "raw_cpu_s_per_step": cpu,
        "note": "single run, jitted lax.scan of steps_per_round steps per call, batch "
        f"{s.batch_size}; nanoadam density {s.densities[0]:g}, mask_interval {s.mask_interval} "
        "(refreshes included at their real frequency); medians over rounds",
    }


def _neighbour_lrs(s: Settings, sw: Sweep, best: float) -> list[float]:
    """``best`` and its ``e3_lr_neighbours`` neighbours on each side in the LR grid."""
    grid = sorted(set(sw.lr_grid))
    i, k = grid.index(best), s.e3_lr_neighbours
    return [grid[j] for j in range(max(0, i - k), min(len(grid), i + k + 1))]
