"""Diagnostic: where NanoAdam's update time goes on XLA:CPU (not part of the suite).

Times one jitted, donated ``update + apply_updates`` step on the synthetic 25M-parameter
tree of :mod:`benchmarks.bench_update` (d = 0.1, no refresh taken: ``mask_interval`` is
larger than the run), side by side in one process, best of 3 windows of 30 steps:

* ``optax.adamw``;
* ``nanoadam`` (its default ``inplace_apply=True``) and ``nanoadam(inplace_apply=False)``;
* the same two with the refresh ``jax.lax.cond`` removed from the program (``jax.lax.cond``
  patched to call its false branch; the refresh can then never run, so this is a
  diagnostic, not an optimizer).

The gap between the last rows and the middle ones is the per-step cost of having the
refresh branch in the program on this backend. Usage::

    python benchmarks/diag_update_cost.py [--params 25e6] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if not __package__:  # run as `python benchmarks/diag_update_cost.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import optax

import nanoadam_jax as nanoadam
from benchmarks import common


def time_step(tx, params, grads, steps: int = 30, windows: int = 3) -> float:
    """Best per-step milliseconds over ``windows`` windows of ``steps`` donated steps."""

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    f = jax.jit(step, donate_argnums=(0, 1))
    p, s = common.copy_tree(params), tx.init(params)
    p, s = f(p, s, grads)
    jax.block_until_ready(p)
    best = float("inf")
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(steps):
            p, s = f(p, s, grads)
        jax.block_until_ready((p, s))
        best = min(best, (time.perf_counter() - t0) / steps)
    return 1e3 * best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=25e6)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    params = common.synthetic_params(int(args.params))
    key = jax.random.PRNGKey(1)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(key, p.shape, p.dtype), params)

    def nano(inplace: bool):
        return nanoadam.nanoadam(1e-3, density=0.1, mask_interval=10**9, inplace_apply=inplace)

    rows = [("optax.adamw", time_step(optax.adamw(1e-3), params, grads))]
    rows.append(("nanoadam", time_step(nano(True), params, grads)))
    rows.append(("nanoadam(inplace_apply=False)", time_step(nano(False), params, grads)))
    cond = jax.lax.cond
    jax.lax.cond = lambda pred, true_fn, false_fn, *ops: false_fn(*ops)
    try:
        rows.append(("nanoadam, refresh cond removed", time_step(nano(True), params, grads)))
        rows.append(
            ("nanoadam(inplace_apply=False), cond removed", time_step(nano(False), params, grads))
        )
    finally:
        jax.lax.cond = cond
    base = rows[0][1]
    machine = common.machine_info()
    lines = [
        f"# Update cost diagnostic ({args.params:g} parameters, d=0.1, no refresh taken)",
        "",
        f"- command: `python benchmarks/diag_update_cost.py --params {args.params:g}`",
        f"- machine: {machine.get('processor', '')}, {machine.get('cpu_count', '')} CPUs; "
        f"load average at the end {common.load_average()}; jax {jax.__version__}",
        "",
        "| step | ms | / adamw |",
        "|---|---|---|",
    ] + [f"| {name} | {ms:.2f} | {ms / base:.2f} |" for name, ms in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
