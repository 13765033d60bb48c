"""The plan: what NanoAdam will do to each leaf, before any training (or any weights).

:func:`plan` takes parameters (arrays or ``jax.ShapeDtypeStruct``) and the optimizer's
selection arguments and returns (and prints) one row per leaf: its label, the layer axes
and chunking it gets, how many entries it trains per refresh, and what its optimizer
state costs, with totals against ``optax.adamw``'s state. The numbers come from the same
code that builds the state (``jax.eval_shape`` of :func:`~nanoadam_jax.nanoadam`'s
``init``), so they are exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanoadam_jax import labels as labels_lib
from nanoadam_jax import layout
from nanoadam_jax._tree import box_tree
from nanoadam_jax.alias import nanoadam
from nanoadam_jax.config import (
    Density,
    DimensionNumbers,
    SelectionConfig,
    init_layouts,
    selection_args,
)
from nanoadam_jax.selection import num_selected_static

__all__ = ["LeafPlan", "Plan", "plan"]


class LeafPlan(NamedTuple):
    """One leaf of a :class:`Plan`.

    Attributes:
      path: the leaf's key path as a string.
      shape: its shape.
      label: ``"sparse"``, ``"dense"`` or ``"frozen"``.
      layer_axes: axes selected independently (stacked layers); ``()`` if none.
      chunk: entries per chunk (sparse leaves; 0 otherwise).
      chunks: number of chunks (all layers).
      trained: entries updated per step (``k`` per chunk times chunks; all entries of a
        dense leaf; 0 when frozen).
      state_bytes: NanoAdam's optimizer-state bytes for this leaf.
      adamw_bytes: ``optax.adamw``'s state bytes for this leaf.
      mesh_independent: True when the leaf's layout (state shape, selection, updates) is
        the same on one device, on every mesh that splits its first matrix axis evenly
        over up to 16 devices (FSDP) and on the sharding it was given; False when the
        given sharding, or an FSDP one, needs another chunking (a checkpoint then moves
        between such meshes with :func:`~nanoadam_jax.relayout`). True for dense and
        frozen leaves.
    """

    path: str
    shape: tuple[int, ...]
    label: str
    layer_axes: tuple[int, ...]
    chunk: int
    chunks: int
    trained: int
    state_bytes: int
    adamw_bytes: int
    mesh_independent: bool = True


class Plan(NamedTuple):
    """The result of :func:`plan`; ``str(plan)`` is the table.

    Attributes:
      leaves: one :class:`LeafPlan` per parameter leaf.
      state_bytes: NanoAdam's total optimizer-state bytes (incl. the step counters).
      adamw_bytes: ``optax.adamw``'s total state bytes.
      notes: warnings about the model (e.g. no output head recognised).
    """

    leaves: list[LeafPlan]
    state_bytes: int
    adamw_bytes: int
    notes: list[str]

    def __str__(self) -> str:
        head = ("leaf", "shape", "label", "layers", "chunk", "mesh", "trained", "state", "adamw")
        rows = [head]
        for leaf in self.leaves:
            rows.append(
                (
                    leaf.path,
                    "x".join(map(str, leaf.shape)) or "()",
                    leaf.label,
                    ",".join(map(str, leaf.layer_axes)) or "-",
                    f"{leaf.chunk} x{leaf.chunks}" if leaf.chunk else "-",
                    "any" if leaf.mesh_independent else "this",
                    f"{leaf.trained:,}",
                    _bytes(leaf.state_bytes),
                    _bytes(leaf.adamw_bytes),
                )
            )
        total = sum(math.prod(leaf.shape) for leaf in self.leaves)
        trained = sum(leaf.trained for leaf in self.leaves)
        rows.append(
            (
                "total",
                f"{total:,}",
                "",
                "",
                "",
                "",
                f"{trained:,}",
                _bytes(self.state_bytes),
                _bytes(self.adamw_bytes),
            )
        )
        widths = [max(len(r[c]) for r in rows) for c in range(len(head))]
        lines = []
        for n, r in enumerate(rows):
            cells = [r[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(r[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
            if n == 0 or n == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        ratio = self.state_bytes / self.adamw_bytes if self.adamw_bytes else float("nan")
        lines.append(f"optimizer state: {ratio:.3f}x optax.adamw's")
        if not all(leaf.mesh_independent for leaf in self.leaves):
            lines.append(
                "mesh 'this': the leaf's chunking depends on its sharding; a checkpoint "
                "moves to another mesh with nanoadam.relayout"
            )
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _nbytes(tree: Any) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def plan(
    params: Any,
    density: Density = 0.1,
    *,
    scope: str = "chunk",
    chunk_size: int | None = None,
    labels: labels_lib.Labels = None,
    dimension_numbers: DimensionNumbers = None,
    layer_axis_names: Sequence[str] = layout.LAYER_AXIS_NAMES,
    max_density: float | None = None,
    moment_dtype: Any | None = None,
    mu_dtype: Any | None = None,
    bias_correction: bool | str = True,
    show: bool = True,
) -> Plan:
    """What :func:`~nanoadam_jax.nanoadam` will train and store, per leaf, before training.

    Works on ``jax.ShapeDtypeStruct`` trees (plan a 7B model without its weights; give
    the structs a ``sharding`` to see the chunking a mesh gets) and on Flax NNX states
    (``nnx.state(model, nnx.Param)``, whose metadata marks stacked layers).

    Example:
      >>> import jax, jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> params = {"Dense_0": {"kernel": jax.ShapeDtypeStruct((512, 256), jnp.float32)},
      ...           "head": {"kernel": jax.ShapeDtypeStruct((256, 10), jnp.float32)}}
      >>> p = nanoadam.plan(params, density=0.1, show=False)
      >>> [(leaf.path, leaf.label, leaf.trained) for leaf in p.leaves]
      [("['Dense_0']['kernel']", 'sparse', 13104), ("['head']['kernel']", 'dense', 2560)]
      >>> round(p.state_bytes / p.adamw_bytes, 3)  # 12 bytes per selected entry
      0.166
      >>> p.leaves[0].mesh_independent  # the same chunks on every FSDP mesh
      True

    Args:
      params: parameters, or ``jax.ShapeDtypeStruct``s.
      density, scope, chunk_size, labels, dimension_numbers, layer_axis_names,
      max_density, moment_dtype: as in :func:`~nanoadam_jax.sparse_update`.
      mu_dtype, bias_correction: as in :func:`~nanoadam_jax.nanoadam` (the per-entry
        correction stores a 2-byte age per selected entry).
      show: print the table.

    Returns:
      A :class:`Plan` (``str(plan)`` is the printed table).
    """
    selection = selection_args(locals())
    config = SelectionConfig(**selection)
    tx = nanoadam(
        1e-3,
        **selection,
        moment_dtype=moment_dtype,
        mu_dtype=mu_dtype,
        bias_correction=bias_correction,
    )
    full_state = jax.eval_shape(tx.init, params)
    state = full_state[0]
    adamw = jax.eval_shape(optax.adamw(1e-3, mu_dtype=mu_dtype).init, params)
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    flat_labels = treedef.flatten_up_to(labels_lib.label_params(params, labels))
    sdef, boxes = box_tree(params)
    compact = scope != "global"
    selected = (sdef if compact else treedef).flatten_up_to(state.selected)
    layer_axes = config.batch_axes(params, boxes, at_init=True)
    independent = {}
    if compact:
        # eval_shape traces the parameters, which hides their sharding in automatic
        # mode: the layouts (chunking adapted to the shards) come from the leaves as given.
        sparse = [i for i, lab in enumerate(flat_labels) if lab == labels_lib.SPARSE]
        unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
        alone = init_layouts(config, unsharded, sparse)
        for i, lay in init_layouts(config, params, sparse).items():
            selected[i] = jax.ShapeDtypeStruct(lay.state_shape, lay.index_dtype)
            matrix = [s for a, s in enumerate(lay.shape) if a not in lay.batch_axes]
            independent[i] = lay.grid == alone[i].grid and layout.fsdp_invariant(matrix, lay.chunk)
    per_entry = state.sparse_age is not None  # the optimizer stores an age per entry
    rows = []
    for i, ((path, leaf), label) in enumerate(zip(leaves_with_path, flat_labels)):
        shape = tuple(leaf.shape)
        n = math.prod(shape)
        dtype = jnp.dtype(leaf.dtype)
        mu_bytes = jnp.dtype(moment_dtype or mu_dtype or dtype).itemsize
        nu_bytes = jnp.dtype(moment_dtype or dtype).itemsize
        chunk = chunks = 0
        if label == labels_lib.SPARSE:
            sel = selected[i]
            slots = math.prod(sel.shape)
            own = slots * (mu_bytes + nu_bytes + jnp.dtype(sel.dtype).itemsize)
            own += 2 * slots if per_entry else 0  # the uint16 age
            if compact:
                chunks = math.prod(sel.shape[:-1])
                chunk = n // chunks if chunks else 0
                trained = chunks * _k_now(config, chunk, sel.shape[-1])
            else:
                trained = _k_now(config, n, n)
        elif label == labels_lib.DENSE:
            own, trained = n * (mu_bytes + nu_bytes), n
        else:
            own, trained = 0, 0
        adamw_leaf = n * (jnp.dtype(mu_dtype or dtype).itemsize + dtype.itemsize)
        rows.append(
            LeafPlan(
                path=jax.tree_util.keystr(path),
                shape=shape,
                label=label,
                layer_axes=tuple(layer_axes[i]) if label == labels_lib.SPARSE else (),
                chunk=chunk,
                chunks=chunks,
                trained=trained,
                state_bytes=own,
                adamw_bytes=adamw_leaf,
                mesh_independent=independent.get(i, True),
            )
        )
    notes = []
    if any(label == labels_lib.SPARSE for label in flat_labels) and not labels_lib.find_heads(
        params, labels
    ):
        notes.append(
            "no output head recognised by name: every leaf is sparse or a norm. If the model "
            "has a head (e.g. a Linen `Dense_3`, or an embedding tied to the output), label "
            "it 'dense' with `labels=` (see nanoadam_jax.labels)."
        )
    # Total: the step counters etc. from the real state, the leaves from the rows.
    overhead = _nbytes(full_state) - _nbytes(state.selected) - _nbytes(state.sparse_inner_state)
    overhead -= _nbytes(state.sparse_age)
    overhead -= _nbytes(state.dense_inner_state)
    total = overhead + sum(row.state_bytes for row in rows) + _scalar_bytes(state)
    result = Plan(rows, total, _nbytes(adamw), notes)
    if show:
        print(result)
    return result


def _scalar_bytes(state: Any) -> int:
    """Bytes of the scalar (count) arrays inside the inner states."""
    inner = (state.sparse_inner_state, state.dense_inner_state)
    return sum(_nbytes([x]) for x in jax.tree.leaves(inner) if not x.shape)


def _k_now(config: Any, chunk: int, capacity: int) -> int:
    """Entries per chunk at the density given (capped at the capacity)."""
    density = config.density
    if callable(density):
        density = density(0)
    try:
        return min(num_selected_static(chunk, float(density)), capacity)
    except (TypeError, jax.errors.ConcretizationTypeError):  # a traced density
        return capacity
