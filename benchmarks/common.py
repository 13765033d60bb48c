"""Helpers shared by the benchmark sections: machine info, timing, trees, byte counts."""

from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nanoadam_jax as nanoadam

# Provenance (the checkout's commit, the CPU model): one copy, shared with the examples'
# results files (``examples`` is a namespace package from the repository root).
from examples.common.results import cpu_model, git_revision

#: Width of the synthetic 2-D leaves (columns).
LEAF_COLS = 1024
#: Entries per synthetic leaf (about the size of a 1024x1024 weight matrix).
LEAF_ENTRIES = 2**20
#: The repository checkout the benchmarks live in.
REPO = Path(__file__).resolve().parents[1]


def machine_info() -> dict[str, Any]:
    """Where and with what the benchmarks ran: machine, jax devices, versions, library commit."""
    import flax

    devices = jax.devices()
    try:
        cpus_available = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus_available = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": cpus_available,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "devices": [str(d) for d in devices],
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "optax": optax.__version__,
        "flax": flax.__version__,
        "nanoadam_jax": nanoadam.__version__,
        "git": git_revision(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average": load_average(),
    }


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other tenants of a shared machine skew timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # pragma: no cover - not on Unix
        return None


def _jaxlib_version() -> str:
    import jaxlib

    return getattr(jaxlib, "__version__", "unknown")


# --------------------------------------------------------------------------------------
# Trees and bytes
# --------------------------------------------------------------------------------------


def synthetic_shapes(n_params: int) -> list[tuple[int, int]]:
    """Shapes of a synthetic tree of 2-D leaves with about ``n_params`` entries in total.

    ``max(4, round(n_params / 2**20))`` leaves of ``(rows, 1024)``: leaves of about 1M
    entries, like the weight matrices of a BERT-base/large layer, and at least 4 leaves.
    """
    n_leaves = max(4, round(n_params / LEAF_ENTRIES))
    rows = max(1, n_params // (n_leaves * LEAF_COLS))
    return [(rows, LEAF_COLS)] * n_leaves


def synthetic_params(n_params: int, seed: int = 0, scale: float = 0.02) -> dict[str, Any]:
    """``{"layer_000": {"kernel": w}, ...}`` with Gaussian weights (all leaves sparse)."""
    key = jax.random.PRNGKey(seed)
    return {
        f"layer_{i:03d}": {"kernel": scale * jax.random.normal(jax.random.fold_in(key, i), s)}
        for i, s in enumerate(synthetic_shapes(n_params))
    }


def num_params(tree: Any) -> int:
    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def tree_nbytes(tree: Any) -> int:
    """Sum of ``nbytes`` of the array leaves (works on arrays and ``ShapeDtypeStruct``)."""
    total = 0
    for x in jax.tree.leaves(tree):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            total += math.prod(x.shape) * np.dtype(x.dtype).itemsize
    return int(total)


def copy_tree(tree: Any) -> Any:
    """A fresh device copy (so that donating it leaves the original intact)."""
    return jax.tree.map(jnp.copy, tree)


def shapes_of(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` of every array leaf (to lower a function without data)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def hlo_instructions(compiled: Any) -> int:
    """Instructions of a compiled executable's optimized HLO, every computation counted.

    Counts the ``name = op(...)`` lines of ``compiled.as_text()`` (fused computations and
    conditional branches included): a rough size of the program XLA built.
    """
    count = 0
    for line in compiled.as_text().splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("ROOT ", "%")) and " = " in stripped:
            count += 1
    return count


def minor_faults() -> int:
    """Minor page faults of this process so far (``getrusage``).

    On XLA:CPU a program's scratch buffer is allocated for every call; above the
    allocator's reuse threshold (tens of MiB) it comes fresh from the kernel and every
    page the call touches is a page fault. Faults per step make that cost visible.
    """
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def provenance_md(machine: dict[str, Any], command: str) -> list[str]:
    """The markdown bullets a diagnostic's results start with: command, date and library
    commit (``library modified`` when ``nanoadam_jax/`` had uncommitted changes), machine."""
    commit = str(machine["git"].get("commit"))[:12]
    dirty = ", library modified" if machine["git"].get("library_dirty") else ""
    return [
        f"- command: `{command}`",
        f"- date: {machine['date']}; commit {commit}{dirty}",
        f"- machine: {machine['processor']}, {machine['cpus_available']} CPUs available; "
        f"load average at the end {load_average()}; jax {machine['jax']}",
    ]


# --------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def time_call(fn: Callable[[], Any]) -> float:
    """Wall time of ``fn()`` in seconds, blocking on its result."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def timed_window(step: Callable[[], Any], steps: int) -> tuple[float, float]:
    """Seconds and minor page faults per call over ``steps`` back-to-back ``step()`` calls.

    ``step`` returns what it computed; the last result is blocked on before the clock stops
    (earlier calls are dispatched asynchronously, as a training loop does).
    """
    f0 = minor_faults()
    t0 = time.perf_counter()
    out = None
    for _ in range(steps):
        out = step()
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - t0) / steps
    return seconds, (minor_faults() - f0) / steps


def interleaved(
    runners: dict[str, Callable[[], float]], rounds: int, rotate: bool = True
) -> dict[str, list[float]]:
    """Call every runner once per round, in turns, and collect what each returns.

    The order is rotated from round to round so that no runner always follows the same
    neighbour (caches, turbo clocks, other tenants of a shared machine).
    """
    names = list(runners)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)] if rotate else names
        for n in order:
            out[n].append(float(runners[n]()))
    return out


def ratio(a: float, b: float) -> float | None:
    return None if not b else float(a / b)


# --------------------------------------------------------------------------------------
# Jitted training steps
# --------------------------------------------------------------------------------------


def lower_and_compile(fn: Callable[..., Any], *args: Any, donate: tuple[int, ...] = (0, 1)):
    """``jax.jit(fn, donate_argnums=donate).lower(*args).compile()``, timed.

    Returns ``(compiled, lower_s, compile_s)``: tracing and lowering to StableHLO, then
    XLA's compilation, in seconds.
    """
    t0 = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    return compiled, t1 - t0, time.perf_counter() - t1


def update_step(tx: optax.GradientTransformation) -> Callable[..., Any]:
    """``(params, opt_state, grads) -> (params, opt_state)``: one optimizer update."""

    def step(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    return step


def force_refresh(opt_state: Any) -> Any:
    """The same state with every NanoAdam step counter set to 0: the next update refreshes.

    Step 0 is a multiple of every ``mask_interval``, so the next call of the same
    compiled update recomputes the selection (the density is unchanged).
    """

    def reset(x):
        if isinstance(x, nanoadam.SparseUpdateState):
            return x._replace(sparse_step=jnp.zeros_like(x.sparse_step))
        return x

    return jax.tree.map(
        reset, opt_state, is_leaf=lambda x: isinstance(x, nanoadam.SparseUpdateState)
    )


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``columns = [(key, header), ...]``."""
    if not rows:
        return "_(no rows)_\n"
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for row in rows:
        cells = []
        for key, _ in columns:
            v = row.get(key)
            cells.append(fmt_bytes(v) if key.endswith("bytes") else fmt(v))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body]) + "\n"


def state_floor(density: float, moment_bytes: int = 8, index_bytes: int = 2) -> float:
    """NanoAdam's smallest state over AdamW's for one sparse leaf: per selected entry, the
    two moments and one stored position, over AdamW's two float32 moments per entry.

    The default layout (chunks of at most 16384 entries) stores ``uint16`` positions and
    float32 moments: ``1.25 * density``; bfloat16 moments (``moment_dtype``) give
    ``0.75 * density``; a chunk above 65535 entries (``scope="leaf"`` on a large leaf)
    stores ``int32`` positions: ``1.5 * density``.
    """
    return (moment_bytes + index_bytes) / 8 * density


# --------------------------------------------------------------------------------------
# The ordinary step alone (no refresh branch)
# --------------------------------------------------------------------------------------


class ordinary_step_only:
    """While active, NanoAdam traces only the false branch of its refresh ``cond``.

    ``nanoadam_jax.refresh.cond(pred, refresh, keep, operand)`` is replaced by
    ``keep(operand)``, so that a function traced inside the block compiles to the program
    of an ordinary step (no selection, no refresh scratch): XLA's ``cost_analysis()`` of
    a conditional takes the largest branch, so the ordinary step's own cost is only
    readable from such a program. ``with ordinary_step_only() as calls`` gives a one-item
    list counting the replaced calls (0 means the library no longer refreshes through
    ``refresh.cond`` and the measurement would include the refresh: check it).
    Benchmarks and tests only: the traced program never refreshes its selection.
    """

    def __enter__(self) -> list[int]:
        from nanoadam_jax import refresh

        self._module = refresh
        self._original = refresh.cond
        self.calls = [0]

        def keep_only(pred, true_fn, false_fn, operand):
            self.calls[0] += 1
            return false_fn(operand)

        refresh.cond = keep_only
        return self.calls

    def __exit__(self, *exc: Any) -> None:
        self._module.cond = self._original
