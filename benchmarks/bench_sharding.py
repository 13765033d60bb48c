"""Sharded NanoAdam vs sharded AdamW on 8 host devices: step time and collectives.

Usage (from the repository root)::

    python benchmarks/bench_sharding.py                      # FSDP mesh, automatic sharding
    python benchmarks/bench_sharding.py --layout 2d --mode explicit
    python benchmarks/bench_sharding.py --json out.json      # also write the results

The parameters of a small MLP stack are sharded over a ``jax.sharding.Mesh`` of 8 host (CPU)
devices, either FSDP style (every leaf split along its first axis) or over a 2-D
``data x model`` mesh (leaves split along both axes). Each optimizer runs under ``jax.jit``
with its state kept where ``init`` put it. For each one the script reports

* the time of an ordinary update step and of a refresh step (the step that re-selects the
  trainable entries; every ``mask_interval`` steps), median over ``--steps`` steps;
* the optimizer state held per device;
* the collectives of the compiled update, read from the optimized HLO: those run on every
  ordinary step (outside any conditional, or in its no-refresh branch) and those that a
  refresh step adds, with their element counts and bytes (a collective inside a loop of
  known trip count is counted that many times).

Host devices share the machine's cores, so the timings compare optimizers with one another
on this machine; they do not predict accelerator speed. The collective listing, on the other
hand, is what the same program communicates on any backend.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

_DEVICES = "--xla_force_host_platform_device_count=8"
if _DEVICES not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _DEVICES).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nanoadam_jax as nanoadam  # noqa: E402

# --------------------------------------------------------------------------------------
# Model and shardings.
# --------------------------------------------------------------------------------------


def make_params(width: int, layers: int, seed: int = 0) -> dict:
    """An MLP stack ``width -> 4 width -> width`` per layer and a 16-way head (host arrays)."""
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    params = {}
    for i in range(layers):
        params[f"layer_{i}"] = {
            "up": {"kernel": normal(width, 4 * width, scale=width**-0.5)},
            "up_bias": normal(4 * width, scale=0.02),
            "down": {"kernel": normal(4 * width, width, scale=(4 * width) ** -0.5)},
        }
    params["head"] = {"kernel": normal(width, 16, scale=width**-0.5)}
    return params


def specs(params: dict, layout: str) -> dict:
    def spec(path, x):
        names = [getattr(p, "key", str(p)) for p in path]
        if layout == "fsdp":
            return P("fsdp", *([None] * (x.ndim - 1)))
        if "head" in names:
            return P("data", None)
        if x.ndim == 1:
            return P("model")
        # Megatron style: up is column-parallel, down row-parallel; FSDP over "data".
        return P("data", "model") if "up" in names else P("model", "data")

    return jax.tree_util.tree_map_with_path(spec, params)


def make_mesh(layout: str, mode: str) -> jax.sharding.Mesh:
    axis_type = AxisType.Explicit if mode == "explicit" else AxisType.Auto
    if layout == "fsdp":
        return jax.make_mesh((8,), ("fsdp",), axis_types=(axis_type,))
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


# --------------------------------------------------------------------------------------
# Optimizers. Each factory takes the mask interval (ignored by AdamW).
# --------------------------------------------------------------------------------------


def optimizers(args) -> dict:
    lr, d = 1e-4, args.density
    return {
        "optax.adamw": lambda m: optax.adamw(lr, weight_decay=0.0),
        "nanoadam (leaf, compact)": lambda m: nanoadam.nanoadam(lr, d, m),
        "nanoadam (leaf, dense)": lambda m: nanoadam.nanoadam(lr, d, m, state_layout="dense"),
        f"nanoadam (block {args.block_size}, compact)": lambda m: nanoadam.nanoadam(
            lr, d, m, scope="block", block_size=args.block_size
        ),
        "mask -> adam -> masked_apply": lambda m: optax.chain(
            nanoadam.magnitude_mask(d, m),
            optax.scale_by_adam(),
            nanoadam.masked_apply(d, m),
            optax.scale_by_learning_rate(lr),
        ),
    }


# --------------------------------------------------------------------------------------
# Collectives in optimized HLO text.
# --------------------------------------------------------------------------------------

_COLLECTIVES = {
    "all-gather",
    "all-reduce",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
    "collective-broadcast",
    "ragged-all-to-all",
}
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_CALLED = re.compile(
    r"\b(calls|to_apply|condition|body|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def _arrays(type_text: str) -> list[tuple[int, int]]:
    """``(elements, bytes)`` of each array in an HLO type (a tuple lists several)."""
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        n = int(np.prod([int(x) for x in dims.split(",") if x]))
        width = _BYTES.get(dtype, max(1, int(dtype[1:]) // 8) if dtype[1:].isdigit() else 4)
        out.append((n, n * width))
    return out


def parse_hlo(text: str) -> tuple[dict, str]:
    """Computations: name -> {"collectives", "calls": [(name, trips)], "branches"}."""
    comps: dict = {}
    entry = ""
    current = None
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line)
            if m and " = " not in line:
                current = m.group(2)
                comps[current] = {"collectives": [], "calls": [], "branches": []}
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        base = op.removesuffix("-start")
        node = comps[current]
        if base in _COLLECTIVES and not op.endswith("-done"):
            operands = _arrays(rest.split("),")[0]) if base == "reduce-scatter" else []
            sizes = _arrays(result) + operands
            node["collectives"].append(
                {
                    "op": base,
                    "type": re.sub(r"\{[\d,]*\}", "", result),
                    "elements": max((n for n, _ in sizes), default=1),
                    "bytes": sum(b for _, b in _arrays(result)),
                }
            )
        branches = _BRANCHES.search(rest)
        if op == "conditional":
            if branches:
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")]
            else:  # true_computation=..., false_computation=...: the false branch first
                called = dict((kind, name) for kind, name in _CALLED.findall(rest))
                names = [called["false_computation"], called["true_computation"]]
            node["branches"].append(names)
            continue
        trips = _TRIPS.search(rest)
        for kind, name in _CALLED.findall(rest):
            n = int(trips.group(1)) if (op == "while" and kind == "body" and trips) else 1
            node["calls"].append((name, n))
    return comps, entry


def classify(text: str) -> dict:
    """Collectives run on every step and those run only at a refresh, with their counts.

    Branch 0 of a conditional (``lax.cond``'s false branch: no refresh) runs on every
    ordinary step, so its collectives count as per-step. The other branch (the refresh,
    which also does that step's update) counts as per-refresh whatever it moves beyond
    branch 0. Inside a refresh branch every nested collective counts.
    """
    comps, entry = parse_hlo(text)
    info = {}

    def walk(name, times, seen):
        """(per-step Counter, extra-per-refresh Counter) of computation ``name``."""
        step, refresh = Counter(), Counter()
        if name not in comps or name in seen:
            return step, refresh
        seen = seen | {name}
        node = comps[name]
        for c in node["collectives"]:
            key = (c["op"], c["type"])
            step[key] += times
            info[key] = c
        for callee, n in node["calls"]:
            s, r = walk(callee, times * n, seen)
            step, refresh = step + s, refresh + r
        for branches in node["branches"]:
            s0, r0 = walk(branches[0], times, seen)
            step, refresh = step + s0, refresh + r0
            for other in branches[1:]:
                s, r = walk(other, times, seen)
                refresh = refresh + ((s + r) - s0)
        return step, refresh

    found = dict(zip(("step", "refresh"), walk(entry, 1, frozenset())))
    return {
        where: [
            dict(info[key], count=count) for key, count in sorted(found[where].items(), key=str)
        ]
        for where in found
    }


# --------------------------------------------------------------------------------------
# Measurement.
# --------------------------------------------------------------------------------------


def fake_grads(params, t):
    return jax.tree.map(lambda p: jnp.cos(3.0 * p + t.astype(p.dtype)) * 1e-2, params)


def state_bytes_per_device(state) -> int:
    total = 0
    for leaf in jax.tree.leaves(state):
        shards = getattr(leaf, "addressable_shards", None)
        if shards:
            total += shards[0].data.nbytes
    return total


def pin(tree, mesh):
    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(put, tree)


def build(tx, params, mesh, mode):
    """Initialised state and a jitted step that keeps the state's shardings."""
    state = tx.init(params)

    def step(params, state, t):
        updates, state = tx.update(fake_grads(params, t), state, params)
        return optax.apply_updates(params, updates), state

    if mode == "explicit":
        return state, jax.jit(step)  # the types carry the shardings
    state = pin(state, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, (params, state))
    return state, jax.jit(step, out_shardings=shardings)


def timed(step, params, state, first: int, steps: int):
    """Median seconds of ``steps`` calls, after one warm-up call (compilation)."""
    params, state = step(params, state, jnp.int32(first))
    jax.block_until_ready(params)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        params, state = step(params, state, jnp.int32(first + 1 + i))
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), params, state


def measure(name, make_tx, params_host, layout, mode, steps):
    mesh = make_mesh(layout, mode)
    row = {"optimizer": name}
    try:
        with jax.set_mesh(mesh):
            shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs(params_host, layout))
            params = jax.device_put(params_host, shard)
            # Ordinary steps: the selection is made at step 0 and not again.
            state, step = build(make_tx(10**9), params, mesh, mode)
            text = step.lower(params, state, jnp.int32(0)).compile().as_text()
            row["update_s"], _, state = timed(step, params, state, 0, steps)
            row["state_bytes_per_device"] = state_bytes_per_device(state)
            row["collectives"] = classify(text)
            if name != "optax.adamw":
                # Refresh steps: re-select on every step.
                state, step = build(make_tx(1), params, mesh, mode)
                row["refresh_s"], _, _ = timed(step, params, state, 0, steps)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


# --------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------


def describe(collectives: list[dict]) -> str:
    if not collectives:
        return "none"
    parts = []
    for c in collectives:
        times = f"{c['count']}x " if c["count"] > 1 else ""
        parts.append(f"{times}{c['op']} {c['type']} ({c['elements']} el, {c['bytes']} B)")
    return "; ".join(parts)


def total_bytes(collectives: list[dict]) -> int:
    return sum(c["bytes"] * c["count"] for c in collectives)


def report(rows: list[dict], args, n_params: int) -> None:
    print(
        f"\nlayout={args.layout} mode={args.mode} devices={jax.device_count()} "
        f"params={n_params:,} density={args.density} jax={jax.__version__}"
    )
    header = (
        f"{'optimizer':34s} {'update ms':>10s} {'refresh ms':>11s} {'state/dev KiB':>14s} "
        f"{'comm/update B':>14s} {'comm/refresh B':>15s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['optimizer']:34s} failed: {r['error']}")
            continue
        step_c, refresh_c = r["collectives"]["step"], r["collectives"]["refresh"]
        refresh = f"{r['refresh_s'] * 1e3:11.2f}" if "refresh_s" in r else f"{'-':>11s}"
        print(
            f"{r['optimizer']:34s} {r['update_s'] * 1e3:10.2f} {refresh} "
            f"{r['state_bytes_per_device'] / 1024:14.1f} {total_bytes(step_c):14d} "
            f"{total_bytes(step_c) + total_bytes(refresh_c):15d}"
        )
    print("\nCollectives (per update step: every step; per refresh step: in addition)")
    for r in rows:
        if "error" in r:
            continue
        print(f"* {r['optimizer']}")
        print(f"    per update step : {describe(r['collectives']['step'])}")
        if r["optimizer"] != "optax.adamw":
            print(f"    per refresh step: {describe(r['collectives']['refresh'])}")


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=("fsdp", "2d"), default="fsdp")
    parser.add_argument("--mode", choices=("auto", "explicit"), default="auto")
    parser.add_argument("--width", type=int, default=256, help="MLP width (4x inside)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--block-size", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--only", default="", help="comma-separated substrings of names")
    parser.add_argument("--json", default="", help="write the results to this file")
    args = parser.parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}: set XLA_FLAGS={_DEVICES}")

    params = make_params(args.width, args.layers)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    rows = []
    for name, make_tx in optimizers(args).items():
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        rows.append(measure(name, make_tx, params, args.layout, args.mode, args.steps))
        print(f"  measured {name}", file=sys.stderr, flush=True)
    report(rows, args, n_params)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        Path(args.json).write_text(json.dumps({"args": meta, "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
