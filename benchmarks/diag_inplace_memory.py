"""Diagnostic: what an in-place scatter-add into donated parameters costs in scratch memory.

A jitted, donated train step of ``N`` dense ``D x D`` layers (forward, backward, then an
update of every layer) compiled three ways, side by side:

* ``dense``: ``p - lr * g`` (what AdamW does to every entry);
* ``scatter-add into zeros, added``: ``p + scatter_add(zeros_like(p), idx, -lr * g[idx])``,
  the form NanoAdam's update takes on one device (XLA fuses it into an in-place
  scatter-add into ``p``);
* ``scatter-add into p``: the in-place scatter-add written directly;
* ``scatter-add into p, no forward/backward``: the same scatter into parameters that nothing
  else reads (a control).

For each: the compiled program's scratch (``memory_analysis().temp_size_in_bytes``) against
the parameters' bytes, and the number of ``copy`` instructions. On XLA:CPU the two scatter
forms copy every parameter (its buffer is read by the forward and backward passes and then
written in place), so the scratch holds about one more copy of the updated parameters:
this is where the compiled peak of a whole NanoAdam train step goes above the state saving
(``benchmarks/bench_memory.py``). Usage::

    python benchmarks/diag_inplace_memory.py [--out benchmarks/results/diag_inplace_memory]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp

from benchmarks import common

MODES = (
    "dense",
    "scatter-add into zeros, added",
    "scatter-add into p",
    "scatter-add into p, no forward/backward",
)
_SCATTER = jax.lax.ScatterDimensionNumbers(
    update_window_dims=(), inserted_window_dims=(0, 1), scatter_dims_to_operand_dims=(0, 1)
)
_GATHER = jax.lax.GatherDimensionNumbers(
    offset_dims=(), collapsed_slice_dims=(0, 1), start_index_map=(0, 1)
)


def step_fn(mode: str):
    def step(params, x, idx):
        if mode.endswith("no forward/backward"):
            vals = jnp.full(idx.shape[1:2], -1e-3) * x[0, 0]
            return [
                jax.lax.scatter_add(p, idx[m], vals, _SCATTER, mode="promise_in_bounds")
                for m, p in enumerate(params)
            ]

        def loss(ps):
            h = x
            for p in ps:
                h = jnp.tanh(h @ p)
            return (h**2).sum()

        grads = jax.grad(loss)(params)
        out = []
        for m, (p, g) in enumerate(zip(params, grads)):
            if mode == "dense":
                out.append(p - 1e-3 * g)
                continue
            vals = -1e-3 * jax.lax.gather(g, idx[m], _GATHER, (1, 1), mode="promise_in_bounds")
            base = jnp.zeros_like(p) if mode.endswith("added") else p  # into p
            u = jax.lax.scatter_add(base, idx[m], vals, _SCATTER, mode="promise_in_bounds")
            out.append(p + u if mode.endswith("added") else u)
        return out

    return step


def measure(n_layers: int, dim: int, density: float = 0.1) -> list[dict[str, Any]]:
    params = [jax.ShapeDtypeStruct((dim, dim), jnp.float32)] * n_layers
    x = jax.ShapeDtypeStruct((64, dim), jnp.float32)
    idx = jax.ShapeDtypeStruct((n_layers, int(dim * dim * density), 2), jnp.int32)
    param_bytes = n_layers * dim * dim * 4
    rows = []
    for mode in MODES:
        compiled = jax.jit(step_fn(mode), donate_argnums=(0,)).lower(params, x, idx).compile()
        temp = int(compiled.memory_analysis().temp_size_in_bytes)
        rows.append(
            {
                "mode": mode,
                "temp_bytes": temp,
                "param_bytes": param_bytes,
                "temp_over_params": temp / param_bytes,
                "copies": compiled.as_text().count(" copy("),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8, help="layers (default 8)")
    parser.add_argument("--dim", type=int, default=1024, help="layer width (default 1024)")
    parser.add_argument(
        "--out",
        default="benchmarks/results/diag_inplace_memory",
        help="write OUT.json and OUT.md (default: benchmarks/results/diag_inplace_memory)",
    )
    args = parser.parse_args(argv)
    rows = measure(args.layers, args.dim)
    machine = common.machine_info()
    command = f"python benchmarks/diag_inplace_memory.py --layers {args.layers} --dim {args.dim}"
    lines = [
        f"# Scratch of an in-place scatter-add into donated parameters ({args.layers} x "
        f"{args.dim}x{args.dim} layers, forward + backward + update)",
        "",
        *common.provenance_md(machine, command),
        "",
        "| update | scratch | scratch / params | copy instructions |",
        "|---|---|---|---|",
    ] + [
        f"| {r['mode']} | {common.fmt_bytes(r['temp_bytes'])} | {r['temp_over_params']:.2f} | "
        f"{r['copies']} |"
        for r in rows
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    payload = {"command": command, "machine": machine, "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
