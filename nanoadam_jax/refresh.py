"""When the selection is refreshed, and what a refresh does to the inner state.

* :func:`refresh_due` is the rule: at step 0, every ``mask_interval`` steps, and whenever
  the density differs from the density of the current selection.
* :func:`cond` runs a refresh under ``jax.lax.cond``, and stays a real conditional under
  ``jax.vmap``: JAX turns a ``cond`` whose predicate is batched into a ``select`` that
  computes both branches every step. Here the batching rule instead asks whether *any*
  run of the batch is due, refreshes only then (each due run takes its own new
  selection, the others keep theirs), and otherwise runs only the cheap branch. So a
  vmapped grid over densities, seeds or thresholds does no selection work on ordinary
  steps. (Built on ``jax.custom_batching.custom_vmap``.)
* :func:`carry_positions` moves a compact inner state from the old selection to the new
  one (``refresh_policy="keep"``): entries that stay selected keep their values; entries
  that enter start from zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from nanoadam_jax import selection
from nanoadam_jax._rows import take_rows
from nanoadam_jax._sharding import explicit_sharding
from nanoadam_jax.layout import LeafLayout
from nanoadam_jax.selection import bisect

__all__ = [
    "REFRESH_POLICIES",
    "carry_plan",
    "carry_positions",
    "carry_fields",
    "cond",
    "group_leaves",
    "refresh_due",
    "select_leaves",
    "select_positions",
]

#: Accepted values of ``refresh_policy``: what a refresh does to the sparse inner state.
REFRESH_POLICIES = ("keep", "reset")
#: Entries selected at once on one device (a block of chunks of a large leaf).
_SELECTION_BLOCK_ENTRIES = 1 << 20


def refresh_due(
    step: jax.Array, mask_interval: Any, density: jax.Array, current: jax.Array
) -> jax.Array:
    """True when the selection must be recomputed before this step's update.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> due = nanoadam.refresh.refresh_due
      >>> [bool(due(jnp.int32(t), 10, jnp.float32(0.1), jnp.float32(0.1))) for t in (9, 10)]
      [False, True]

    Args:
      step: number of updates done before this one.
      mask_interval: refresh period in steps.
      density: the density wanted now.
      current: the density of the current selection (0 before the first one).

    Returns:
      A bool scalar.
    """
    return (step % mask_interval == 0) | (density != current)


def _expand(pred: jax.Array, x: jax.Array) -> jax.Array:
    return pred.reshape(pred.shape + (1,) * (x.ndim - pred.ndim))


def cond(
    pred: jax.Array,
    true_fn: Callable[[Any], Any],
    false_fn: Callable[[Any], Any],
    operand: Any,
) -> Any:
    """``jax.lax.cond(pred, true_fn, false_fn, operand)`` that stays a conditional under vmap.

    Under ``jax.vmap`` with a batched ``pred`` the result equals the per-run ``cond``
    (each run gets its own branch's output), but the expensive ``true_fn`` runs only at
    steps where at least one run needs it. Both functions must take and return arrays
    only through ``operand`` and their outputs (no closed-over traced values).

    Example:
      >>> import jax, jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> f = lambda p, x: nanoadam.refresh.cond(p, lambda x: x + 1, lambda x: x, x)
      >>> jax.vmap(f)(jnp.array([True, False]), jnp.zeros(2)).tolist()
      [1.0, 0.0]
    """

    @jax.custom_batching.custom_vmap
    def run(pred, operand):
        return jax.lax.cond(pred, true_fn, false_fn, operand)

    @run.def_vmap
    def rule(axis_size, in_batched, pred, operand):
        pred_batched, operand_batched = in_batched
        axes = jax.tree.map(lambda b: 0 if b else None, operand_batched)

        def batched(fn):
            return lambda op: jax.vmap(fn, in_axes=(axes,), axis_size=axis_size)(op)

        on_true, on_false = batched(true_fn), batched(false_fn)
        if not pred_batched:
            out = cond(pred, on_true, on_false, operand)
        else:

            def some_due(op_and_pred):
                op, p = op_and_pred
                t, f = on_true(op), on_false(op)
                return jax.tree.map(lambda a, b: jnp.where(_expand(p, a), a, b), t, f)

            out = cond(
                jnp.any(pred),
                some_due,
                lambda op_and_pred: on_false(op_and_pred[0]),
                (operand, pred),
            )
        return out, jax.tree.map(lambda _: True, out)

    return run(pred, operand)


def carry_plan(old: jax.Array, new: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Where each new selected entry sat in the old selection: ``(slot, found)``.

    Rows are chunks; positions in each row are sorted, padding slots hold ``chunk``. A
    binary search of every new position among the row's old ones
    (:func:`~nanoadam_jax.selection.bisect`: ``log2(capacity)`` row-wise gathers): local
    to each row, so a sharded grid stays sharded, and no chunk-sized scratch memory.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> old, new = jnp.array([[0, 2, 5]]), jnp.array([[2, 3, 5]])
      >>> slot, found = nanoadam.refresh.carry_plan(old, new, 8)
      >>> slot.tolist(), found.tolist()
      ([[1, 2, 2]], [[True, False, True]])
    """
    k = new.shape[-1]
    if k == 0:
        return jnp.zeros(new.shape, jnp.int32), jnp.zeros(new.shape, bool)
    old, new = old.astype(jnp.int32), new.astype(jnp.int32)

    def at_or_after(j):  # old[j] >= new: the first such j is new's place among the old
        return take_rows(old, jnp.minimum(j, k - 1), padded=False) >= new

    lo = bisect(at_or_after, jnp.zeros_like(new), jnp.full_like(new, k), k)
    slot = jnp.minimum(lo, k - 1)
    found = (take_rows(old, slot, padded=False) == new) & (new < chunk)
    return slot, found


def carry_positions(
    values: jax.Array, plan: tuple[jax.Array, jax.Array], fresh: jax.Array | None = None
) -> jax.Array:
    """Values of a compact buffer moved to the new selection (see :func:`carry_plan`): an
    entry in both selections keeps its value; an entry only in the new one gets its
    ``fresh`` value (zero if None).

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> plan = nanoadam.refresh.carry_plan(jnp.array([[0, 2, 5]]), jnp.array([[2, 3, 5]]), 8)
      >>> nanoadam.refresh.carry_positions(jnp.array([[1.0, 2.0, 3.0]]), plan).tolist()
      [[2.0, 0.0, 3.0]]
    """
    slot, found = plan
    if values.shape[-1] == 0:
        return values
    moved = take_rows(values, slot, padded=False)
    return jnp.where(found, moved, jnp.zeros((), values.dtype) if fresh is None else fresh)


def select_positions(
    lay: LeafLayout, view: jax.Array, k: Any, criterion: str, key: jax.Array | None
) -> jax.Array:
    """Selected positions of one leaf (given as ``lay.view(x)``): ``(*grid, capacity)``
    sorted positions of the ``k`` entries chosen by ``criterion`` in every chunk.

    On one device a large leaf is selected a block of chunks at a time
    (``jax.lax.map``), so the refresh's scratch memory is that of one block, not a few
    times the leaf (its keys, masks and running counts). On a mesh the whole chunk grid
    is processed at once, each device on its own chunks. The random criterion draws its
    keys for the whole leaf.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> lay = nanoadam.layout.leaf_layout((2, 4), chunk_size=4, max_density=0.5)
      >>> x = jnp.array([[0.3, -0.1, 2.0, 0.2], [5.0, 0.0, 1.0, -3.0]])
      >>> select_positions(lay, lay.view(x), 2, "smallest", None).tolist()
      [[1, 3], [1, 2]]
    """
    rows = math.prod(lay.grid)
    block = max(1, _SELECTION_BLOCK_ENTRIES // max(1, lay.chunk))
    if jax.device_count() == 1 and key is None and rows > block and lay.capacity:

        def select_rows(r):
            keys = selection.selection_keys(r, criterion, None)
            return selection.chunk_positions(keys, k, lay.capacity)

        flat = view.reshape(rows, lay.chunk)
        out = jax.lax.map(select_rows, flat, batch_size=block)
        return out.reshape(lay.state_shape).astype(lay.index_dtype)
    keys = selection.selection_keys(view, criterion, key)
    return selection.chunk_positions(keys, k, lay.capacity).astype(lay.index_dtype)


# ------------------------------------------------------------------------------------------
# A refresh of many leaves: which share one program, their new selections, the moves.
# ------------------------------------------------------------------------------------------

#: Largest number of parameter entries stacked into one refresh group (the stack is a
#: temporary copy, made only at a refresh).
_GROUP_ENTRIES = 1 << 22
#: Leaves above this many entries are never stacked (their refresh runs on the leaf).
_STACKED_LEAF_ENTRIES = 1 << 20


def group_leaves(views: list[jax.Array], lays: list[LeafLayout]) -> list[list[int]]:
    """Sparse leaves (by ordinal) that can share one refresh program: chunk views of the
    same shape, dtype, capacity and sharding, stacked up to ``_GROUP_ENTRIES`` entries;
    leaves above ``_STACKED_LEAF_ENTRIES`` entries stay alone (no copy).

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> lay = nanoadam.layout.leaf_layout((4, 4), max_density=0.5)
      >>> group_leaves([jnp.zeros((16,))] * 3, [lay] * 3)
      [[0, 1, 2]]
    """
    groups: dict[Any, list[list[int]]] = {}
    for j, (x, lay) in enumerate(zip(views, lays)):
        if x.size > _STACKED_LEAF_ENTRIES:
            groups[(j,)] = [[j]]
            continue
        signature = (x.shape, x.dtype, lay.capacity, lay.index_dtype, explicit_sharding(x))
        bins = groups.setdefault(signature, [[]])
        if bins[-1] and (len(bins[-1]) + 1) * x.size > _GROUP_ENTRIES:
            bins.append([])
        bins[-1].append(j)
    return [members for bins in groups.values() for members in bins]


def select_leaves(
    views: list[jax.Array],
    lays: list[LeafLayout],
    groups: list[list[int]],
    select_one: Callable[[LeafLayout, jax.Array, jax.Array], jax.Array],
) -> list[jax.Array]:
    """New positions of every leaf: ``select_one(lay, view, ordinal)`` group by group.

    A group of same-shaped leaves is stacked (a copy bounded by ``_GROUP_ENTRIES``) and
    selected by one loop over it, so compile time grows with the number of distinct
    shapes rather than leaves. One group runs after the other, so the refresh's scratch
    memory is that of one group: each group's input depends on the previous group's
    result through an exact ``+0.0`` (the selection reads ``|w|``, which ``+0.0`` leaves
    unchanged; XLA does not fold ``x + 0.0`` for floats).
    """
    out: list[Any] = [None] * len(views)
    previous = None
    for members in groups:
        lay = lays[members[0]]
        group = [views[j] for j in members]
        if previous is not None:
            zero = jnp.sum(previous, dtype=jnp.float32) * 0.0
            group = [x + zero.astype(x.dtype) for x in group]
        if len(members) == 1:
            previous = out[members[0]] = select_one(lay, group[0], jnp.int32(members[0]))
            continue
        stacked = jnp.stack(group)
        ordinals = jnp.asarray(members, jnp.int32)

        def body(m, acc, stacked=stacked, ordinals=ordinals, lay=lay):
            return acc.at[m].set(select_one(lay, stacked[m], ordinals[m]))

        acc = jnp.broadcast_to(
            jnp.zeros_like(stacked[..., :1], dtype=lay.index_dtype),
            (*stacked.shape[:-1], lay.capacity),
        )
        previous = acc = jax.lax.fori_loop(0, len(members), body, acc)
        for m, j in enumerate(members):
            out[j] = acc[m]
    return out


def carry_fields(
    old: list[jax.Array],
    new: list[jax.Array],
    chunks: list[int],
    groups: list[list[int]],
    fields: list[list[jax.Array]],
    fresh: list[list[jax.Array]],
) -> list[list[jax.Array]]:
    """``refresh_policy="keep"`` for compact leaves: every per-entry array (a *field*:
    Adam's ``mu``, ``nu``, the age...; one array per sparse leaf, by ordinal) moved from
    the ``old`` positions to the ``new`` ones. Entries in both keep their values; entering
    entries take ``fresh``'s. Each group's plan (:func:`carry_plan`) is made once and
    serves every field, stacked over the group's leaves.
    """
    out: list[list[Any]] = [[None] * len(old) for _ in fields]
    for members in groups:
        if len(members) == 1:
            (j,) = members
            plan = carry_plan(old[j], new[j], chunks[j])
            for f, (values, start) in enumerate(zip(fields, fresh)):
                out[f][j] = carry_positions(values[j], plan, start[j])
            continue
        stack = lambda arrays, members=members: jnp.stack([arrays[j] for j in members])
        plan = carry_plan(stack(old), stack(new), chunks[members[0]])
        for f, (values, start) in enumerate(zip(fields, fresh)):
            moved = carry_positions(stack(values), plan, stack(start))
            for m, j in enumerate(members):
                out[f][j] = moved[m]
    return out
