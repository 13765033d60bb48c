"""Sharded NanoAdam vs sharded AdamW on 8 host devices: state per device and collectives.

Usage (from the repository root or anywhere)::

    python benchmarks/bench_sharding.py                  # every layout and mode
    python benchmarks/bench_sharding.py --layout tp --mode explicit
    python benchmarks/bench_sharding.py --quick          # small model, adamw and nanoadam

The parameters of a small MLP stack (per layer ``width -> 4 width -> width`` and a bias;
a 16-way head) are placed on a ``jax.sharding.Mesh`` of 8 host (CPU) devices in one of
three layouts:

* ``fsdp``: a 1-D ``fsdp`` mesh, every leaf split along its first axis;
* ``tp``: a 1-D ``model`` mesh, Megatron style: the up projection column-parallel
  ``P(None, "model")``, its bias ``P("model")``, the down projection row-parallel
  ``P("model", None)``, the head replicated;
* ``2d``: a ``data x model`` (2 x 4) mesh: tensor parallelism over ``model`` and FSDP over
  ``data`` (``up: P("data", "model")``, ``down: P("model", "data")``, bias ``P("model")``,
  head ``P("data", None)``);

each in both sharding modes: ``auto`` (``AxisType.Auto``: jit's partitioner propagates
the shardings; the step's outputs are pinned to the inputs' shardings) and ``explicit``
(``AxisType.Explicit``: the shardings are part of the array types). Each optimizer's state
is made by ``tx.init`` on the sharded parameters and kept where ``init`` put it. For each
layout, mode and optimizer the script reports

* the optimizer state held per device, and its ratio to AdamW's;
* the collectives of the compiled update (params and state donated), read from the
  optimized HLO: those run on every ordinary step (outside any conditional, or in the
  no-refresh branch of the refresh ``cond``) and those that a refresh step adds (the
  other branch), with their element counts and bytes (a collective inside a loop of
  known trip count is counted that many times);
* the time of an ordinary step and of a refresh step (the same executable, with the
  step counter set to 0 before the step), median over ``--steps`` steps.

Host devices share the machine's cores, so the timings only compare optimizers with one
another on this machine; they do not predict accelerator speed. The collective listing,
on the other hand, is what the same program communicates on any backend.

Writes ``results.json`` (machine, library commit, arguments, every row with its
collectives) and ``results.md`` to ``--out`` (default ``benchmarks/results/sharding``,
with ``--quick`` ``benchmarks/results/quick/sharding``).
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

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as `python benchmarks/bench_sharding.py`: make `benchmarks` importable
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nanoadam_jax as nanoadam  # noqa: E402
from benchmarks import common  # noqa: E402

LAYOUTS = ("fsdp", "tp", "2d")
MODES = ("auto", "explicit")
DEFAULT_OUT = REPO / "benchmarks" / "results" / "sharding"
DEFAULT_QUICK_OUT = REPO / "benchmarks" / "results" / "quick" / "sharding"
QUICK = {"width": 64, "layers": 1, "steps": 2}

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
    """The ``PartitionSpec`` of every leaf in ``layout`` (see the module docstring)."""

    def spec(path, x):
        names = [getattr(p, "key", str(p)) for p in path]
        if layout == "fsdp":
            return P("fsdp", *([None] * (x.ndim - 1)))
        if layout == "tp":
            if "head" in names:
                return P()
            if x.ndim == 1:
                return P("model")
            return P(None, "model") if "up" in names else P("model", None)
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
    if layout == "tp":
        return jax.make_mesh((8,), ("model",), axis_types=(axis_type,))
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type, axis_type))


# --------------------------------------------------------------------------------------
# Optimizers.
# --------------------------------------------------------------------------------------


def optimizers(density: float, quick: bool = False) -> dict:
    """name -> optimizer (``mask_interval`` 100; refreshes are forced, see :func:`refresh`)."""
    lr, m = 1e-4, 100
    txs = {
        "optax.adamw": optax.adamw(lr, weight_decay=0.0),
        "nanoadam": nanoadam.nanoadam(lr, density, m),
    }
    if quick:
        return txs
    txs['nanoadam (scope="leaf")'] = nanoadam.nanoadam(lr, density, m, scope="leaf")
    txs['nanoadam (scope="global")'] = nanoadam.nanoadam(lr, density, m, scope="global")
    txs["mask -> adam -> masked_apply"] = optax.chain(
        nanoadam.magnitude_mask(density, m),
        optax.scale_by_adam(),
        nanoadam.masked_apply(density, m),
        optax.scale_by_learning_rate(lr),
    )
    return txs


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

#: Step counters of the library's states: set to 0, the next update refreshes.
_COUNTERS = {
    nanoadam.SparseUpdateState: "sparse_step",
    nanoadam.MagnitudeMaskState: "mask_step",
    nanoadam.MaskedApplyState: "apply_step",
}


def refresh(state):
    """``state`` with every selection step counter at 0 (the same shardings): the next
    update re-selects (step 0 is a multiple of every ``mask_interval``)."""

    def reset(x):
        for cls, field in _COUNTERS.items():
            if isinstance(x, cls):
                counter = getattr(x, field)
                return x._replace(**{field: counter - counter})
        return x

    return jax.tree.map(reset, state, is_leaf=lambda x: isinstance(x, tuple(_COUNTERS)))


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
    """Initialised state and the compiled, donated step that keeps the state's shardings."""
    state = tx.init(params)

    def step(params, state, t):
        updates, state = tx.update(fake_grads(params, t), state, params)
        return optax.apply_updates(params, updates), state

    if mode == "explicit":
        jitted = jax.jit(step, donate_argnums=(0, 1))  # the types carry the shardings
    else:
        state = pin(state, mesh)
        shardings = jax.tree.map(lambda x: x.sharding, (params, state))
        jitted = jax.jit(step, out_shardings=shardings, donate_argnums=(0, 1))
    return state, jitted.lower(params, state, jnp.int32(0)).compile()


def timed(step, params, state, steps: int, force: bool):
    """Median seconds of ``steps`` calls (each a refresh if ``force``), after step 0."""
    params, state = step(params, state, jnp.int32(0))
    jax.block_until_ready(params)
    times = []
    for i in range(steps):
        if force:
            state = jax.block_until_ready(refresh(state))
        t0 = time.perf_counter()
        params, state = step(params, state, jnp.int32(1 + i))
        jax.block_until_ready((params, state))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), params, state


def measure(name, tx, params_host, layout, mode, steps):
    mesh = make_mesh(layout, mode)
    row = {"layout": layout, "mode": mode, "optimizer": name}
    nano = name != "optax.adamw"
    try:
        with jax.set_mesh(mesh):
            shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs(params_host, layout))
            params = jax.device_put(params_host, shard)
            state, step = build(tx, params, mesh, mode)
            row["state_bytes_per_device"] = state_bytes_per_device(state)
            row["collectives"] = classify(step.as_text())
            row["step_s"], params, state = timed(step, params, state, steps, force=False)
            if nano:
                row["refresh_s"], _, _ = timed(step, params, state, steps, force=True)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
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


def total_count(collectives: list[dict]) -> int:
    return sum(c["count"] for c in collectives)


def add_ratios(rows: list[dict]) -> None:
    """``state_ratio_vs_adamw`` per row: state per device over AdamW's (same layout, mode)."""
    base = {
        (r["layout"], r["mode"]): r.get("state_bytes_per_device")
        for r in rows
        if r["optimizer"] == "optax.adamw"
    }
    for r in rows:
        b = base.get((r["layout"], r["mode"]))
        n = r.get("state_bytes_per_device")
        r["state_ratio_vs_adamw"] = n / b if b and n is not None else None


def markdown(results: dict) -> str:
    m, a = results["machine"], results["args"]
    commit = str(m["git"].get("commit"))[:12]
    lines = [
        f"# Sharded NanoAdam vs AdamW ({'quick' if a['quick'] else 'full'} mode)",
        "",
        f"- command: `{results['command']}`",
        f"- date: {m['date']}; library commit {commit}"
        + (" (library modified)" if m["git"].get("library_dirty") else ""),
        f"- machine: {m['processor']}, {m['cpus_available']} CPUs available; "
        f"{m['device_count']} host devices; jax {m['jax']}, optax {m['optax']}; load average "
        f"{m['load_average']} at the start, {results['load_average_end']} at the end",
        f"- model: MLP stack, width {a['width']}, {a['layers']} layer(s), "
        f"{results['n_params']:,} parameters; density {a['density']}; timings: median of "
        f"{a['steps']} steps",
        "",
        "| layout | mode | optimizer | state / device | state / adamw | ordinary ms | "
        "refresh ms | collectives / ordinary step | collectives / refresh (added) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        head = f"| {r['layout']} | {r['mode']} | {r['optimizer']} | "
        if "error" in r:
            lines.append(head + f"failed: {r['error']} | | | | | |")
            continue
        step_c, refresh_c = r["collectives"]["step"], r["collectives"]["refresh"]
        refresh_ms = f"{1e3 * r['refresh_s']:.2f}" if "refresh_s" in r else "-"
        lines.append(
            head + f"{common.fmt_bytes(r['state_bytes_per_device'])} | "
            f"{common.fmt(r['state_ratio_vs_adamw'])} | {1e3 * r['step_s']:.2f} | {refresh_ms} | "
            f"{total_count(step_c)} ({total_bytes(step_c):,} B) | "
            f"{total_count(refresh_c)} ({total_bytes(refresh_c):,} B) |"
        )
    lines += ["", "Collectives (per ordinary step: every step; per refresh: in addition):", ""]
    for r in results["rows"]:
        if "error" in r:
            continue
        lines.append(f"* {r['layout']}, {r['mode']}, {r['optimizer']}")
        lines.append(f"  * per ordinary step: {describe(r['collectives']['step'])}")
        lines.append(f"  * per refresh: {describe(r['collectives']['refresh'])}")
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=(*LAYOUTS, "all"), default="all")
    parser.add_argument("--mode", choices=(*MODES, "all"), default="all")
    parser.add_argument("--width", type=int, default=None, help="MLP width (default 256)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default 2)")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 10)")
    parser.add_argument("--only", default="", help="comma-separated substrings of names")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a small model ({QUICK}), adamw and nanoadam only",
    )
    parser.add_argument("--out", default=None, help="results folder (see the module docstring)")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else {"width": 256, "layers": 2, "steps": 10}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = str(DEFAULT_QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if jax.device_count() < 8:
        raise SystemExit(f"needs 8 devices, found {jax.device_count()}: set XLA_FLAGS={_DEVICES}")
    machine = common.machine_info()
    params = make_params(args.width, args.layers)
    layouts = LAYOUTS if args.layout == "all" else (args.layout,)
    modes = MODES if args.mode == "all" else (args.mode,)
    rows = []
    t0 = time.perf_counter()
    for layout in layouts:
        for mode in modes:
            for name, tx in optimizers(args.density, args.quick).items():
                if args.only and not any(s in name for s in args.only.split(",")):
                    continue
                rows.append(measure(name, tx, params, layout, mode, args.steps))
                status = "failed" if "error" in rows[-1] else "ok"
                print(f"  {layout} {mode} {name}: {status}", file=sys.stderr, flush=True)
    add_ratios(rows)
    command = " ".join(
        ["python benchmarks/bench_sharding.py", *(sys.argv[1:] if argv is None else argv)]
    )
    results = {
        "suite": "nanoadam-jax sharding benchmark",
        "command": command,
        "machine": machine,
        "load_average_end": common.load_average(),
        "wall_s": time.perf_counter() - t0,
        "args": vars(args),
        "n_params": int(sum(x.size for x in jax.tree.leaves(params))),
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    text = markdown(results)
    (out / "results.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
