"""Diagnostic: what the refresh branch costs an ordinary NanoAdam step on this backend.

Times one jitted, donated ``update + apply_updates`` step on the synthetic tree of
:mod:`benchmarks.bench_update` (default 25M parameters; d = 0.1; ``mask_interval`` larger
than the run, so no refresh is taken after step 0), side by side in one process, best of
3 windows of 30 steps:

* ``optax.adamw``;
* ``nanoadam`` (the defaults: chunked selection, ``refresh_policy="keep"``);
* ``nanoadam`` with the refresh conditional removed from the program
  (``nanoadam_jax.refresh.cond`` patched to call its false branch: the selection can then
  never run, so this is a diagnostic, not an optimizer).

The gap between the last two rows is the per-step cost of having the refresh branch in the
program. Each row also gives the compiled program's scratch size (``memory_analysis``) and
the process's minor page faults per step: on XLA:CPU the scratch buffer is allocated for
every call, and a large one (the refresh branch's scratch counts even on steps that skip
it) comes fresh from the kernel, so every page the step touches is a fault. Usage::

    python benchmarks/diag_update_cost.py [--params 25e6] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as `python benchmarks/diag_update_cost.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import optax

import nanoadam_jax as nanoadam
from benchmarks import common

ROWS = ("optax.adamw", "nanoadam", "nanoadam, refresh cond removed")


def time_step(tx, params, grads, steps: int = 30, windows: int = 3) -> dict[str, float]:
    """Best per-step milliseconds over ``windows`` windows of ``steps`` donated steps, the
    page faults per step of that window and the program's scratch bytes."""
    carry = [common.copy_tree(params), tx.init(params)]
    f = jax.jit(common.update_step(tx), donate_argnums=(0, 1)).lower(*carry, grads).compile()

    def step():
        carry[:] = f(*carry, grads)
        return carry

    jax.block_until_ready(step())
    best, faults = min(common.timed_window(step, steps) for _ in range(windows))
    temp = int(f.memory_analysis().temp_size_in_bytes)
    return {"ms": 1e3 * best, "faults": faults, "temp_bytes": temp}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=float, default=25e6, help="parameters (default 25e6)")
    parser.add_argument("--out", default="", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    params = common.synthetic_params(int(args.params))
    key = jax.random.PRNGKey(1)
    grads = jax.tree.map(lambda p: 1e-3 * jax.random.normal(key, p.shape, p.dtype), params)

    def nano():
        return nanoadam.nanoadam(1e-3, density=0.1, mask_interval=10**9)

    results = {
        ROWS[0]: time_step(optax.adamw(1e-3), params, grads),
        ROWS[1]: time_step(nano(), params, grads),
    }
    cond = nanoadam.refresh.cond
    nanoadam.refresh.cond = lambda pred, true_fn, false_fn, operand: false_fn(operand)
    try:
        results[ROWS[2]] = time_step(nano(), params, grads)
    finally:
        nanoadam.refresh.cond = cond
    base = results[ROWS[0]]["ms"]
    machine = common.machine_info()
    command = f"python benchmarks/diag_update_cost.py --params {args.params:g}"
    lines = [
        f"# Update cost diagnostic ({args.params:g} parameters, d=0.1, no refresh taken)",
        "",
        *common.provenance_md(machine, command),
        "",
        "| step | ms | / adamw | page faults / step | scratch (temp) |",
        "|---|---|---|---|---|",
    ] + [
        f"| {name} | {r['ms']:.2f} | {r['ms'] / base:.2f} | {r['faults']:,.0f} | "
        f"{common.fmt_bytes(r['temp_bytes'])} |"
        for name, r in results.items()
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
