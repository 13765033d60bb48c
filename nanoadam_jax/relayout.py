"""Moving an optimizer state to parameters laid out for another mesh.

The chunking of a sparse leaf is the same on one device and on every FSDP mesh (see
:mod:`nanoadam_jax.layout`), so a checkpoint restores there as is, with orbax's usual
``jax.eval_shape(tx.init, params)``. A mesh that splits a later axis (tensor-parallel)
needs another chunking, so its state has other shapes: :func:`relayout` converts.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanoadam_jax import selection
from nanoadam_jax._tree import box_tree
from nanoadam_jax.masking import MagnitudeMaskState, MaskedApplyState
from nanoadam_jax.transform import SparseUpdateState

__all__ = ["relayout"]

_STATES = (SparseUpdateState, MagnitudeMaskState, MaskedApplyState)


def _is_state(x: Any) -> bool:
    return isinstance(x, _STATES)


def _place(value: Any, like: Any) -> Any:
    """``value`` with ``like``'s sharding (shapes must agree)."""
    if value is None or like is None:
        return like if value is None else value
    if jnp.shape(value) != jnp.shape(like):
        raise ValueError(
            f"relayout: an array of shape {jnp.shape(value)} in the state has shape "
            f"{jnp.shape(like)} for the new parameters; is the state from the same "
            "optimizer and parameter tree?"
        )
    sharding = getattr(like, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.device_put(jnp.asarray(value, dtype=jnp.result_type(like)), sharding)
    # Like `tx.init`'s unsharded arrays: uncommitted, so jit may place it with the rest.
    return jnp.asarray(np.asarray(jax.device_get(value)), dtype=jnp.result_type(like))


def _moves(
    old_sel: jax.Array, new_sel: jax.Array, size: int, weights: jax.Array | None
) -> tuple[Any, ...]:
    """Where every old selected entry lands in the new chunking.

    Both chunkings cut the same row-major flattening of a layer into consecutive
    chunks, so an entry's flat index is ``row * chunk + position`` in either. Where a new
    chunk receives more old entries than it has slots, those with the smallest ``|w|``
    (``weights``, the leaf flattened; None: the first by position) are kept: they are the
    ones the next refresh re-selects by the default criterion. Returns the new selection
    (sorted positions, the rest padding), the order of the old slots, and the new row and
    slot of each (out of range where dropped).
    """
    rows_old, rows_new = math.prod(old_sel.shape[:-1]), math.prod(new_sel.shape[:-1])
    c_old, c_new = size // max(1, rows_old), size // max(1, rows_new)
    cap_new = new_sel.shape[-1]
    pos = old_sel.reshape(rows_old, -1).astype(jnp.int32)
    flat = jnp.arange(rows_old, dtype=jnp.int32)[:, None] * c_old + pos
    flat = jnp.where(pos < c_old, flat, size).reshape(-1)  # padding: past the end
    if weights is None:
        key = jnp.zeros(flat.shape, jnp.uint32)
    else:
        key = selection.selection_keys(weights[jnp.minimum(flat, size - 1)], "smallest", None)
    row = flat // c_new
    by_key = jnp.lexsort((key, row))  # each new chunk's old entries, smallest |w| first
    row_k = row[by_key]
    rank = jnp.arange(row_k.size, dtype=jnp.int32) - jnp.searchsorted(row_k, row_k)
    kept = jnp.where((flat[by_key] < size) & (rank < cap_new), flat[by_key], size)
    by_pos = jnp.argsort(kept, stable=True)  # the kept ones by position, the rest last
    order = by_key[by_pos]
    flat = kept[by_pos]
    row = jnp.where(flat < size, flat // c_new, rows_new)  # out of range: dropped
    slot = jnp.arange(flat.size, dtype=jnp.int32) - jnp.searchsorted(flat, row * c_new)
    selected = jnp.full((rows_new, cap_new), c_new, jnp.int32)
    selected = selected.at[row, slot].set(flat % c_new, mode="drop")
    return selected.reshape(new_sel.shape).astype(new_sel.dtype), order, row, slot


def _flat_values(x: Any) -> jax.Array | None:
    """A parameter leaf's values, flattened row-major (None for a ``ShapeDtypeStruct``)."""
    if isinstance(x, jax.ShapeDtypeStruct) or not hasattr(x, "reshape"):
        return None
    return jnp.asarray(jax.device_get(x)).reshape(-1)


def _move(values: jax.Array, fresh: jax.Array, moves: tuple[Any, ...]) -> jax.Array:
    """An old per-entry array moved to the new chunking; slots that no old entry fills
    keep ``fresh`` (the new state's initial value)."""
    _, order, row, slot = moves
    flat = values.reshape(-1)[order].astype(fresh.dtype)
    out = fresh.reshape(-1, fresh.shape[-1]).at[row, slot].set(flat, mode="drop")
    return out.reshape(fresh.shape)


def _relayout_sparse(old: SparseUpdateState, new: SparseUpdateState, leaves: list[Any]) -> Any:
    sizes = [math.prod(jnp.shape(x)) for x in leaves]
    old_sel, sel_def = jax.tree.flatten(old.selected)
    new_sel = jax.tree.leaves(new.selected)
    if len(old_sel) != len(new_sel) or len(sizes) != len(new_sel):
        raise ValueError("relayout: the state does not match the new parameters' sparse leaves")
    changed = [o.shape != n.shape for o, n in zip(old_sel, new_sel)]
    if not any(changed) or old_sel[0].dtype == jnp.bool_:
        return jax.tree.map(_place, old, new)
    moves = [
        _moves(o, n, size, _flat_values(x)) if c else None
        for o, n, size, x, c in zip(old_sel, new_sel, sizes, leaves, changed)
    ]
    shapes_old = [o.shape for o in old_sel]

    def is_node(x: Any) -> bool:
        """A subtree holding one array per sparse leaf (optax's per-parameter layout)."""
        return (
            jax.tree.structure(x) == sel_def
            and [jnp.shape(v) for v in jax.tree.leaves(x)] == shapes_old
        )

    def carry_node(o_node: Any, n_node: Any) -> Any:
        if not is_node(o_node):
            return _place(o_node, n_node)
        values = [
            _place(_move(v, f, m), f) if m is not None else _place(v, f)
            for v, f, m in zip(jax.tree.leaves(o_node), jax.tree.leaves(n_node), moves)
        ]
        return jax.tree.unflatten(sel_def, values)

    def carry(old_tree: Any, new_tree: Any) -> Any:
        """Per-entry arrays moved to the new chunks, everything else placed as is."""
        return jax.tree.map(carry_node, old_tree, new_tree, is_leaf=is_node)

    selected = [
        _place(m[0], n) if m is not None else _place(o, n)
        for o, n, m in zip(old_sel, new_sel, moves)
    ]
    return SparseUpdateState(
        sparse_step=_place(old.sparse_step, new.sparse_step),
        # A density no run asks for: the next update refreshes, carrying the moments of
        # the entries that stay selected.
        sparse_density=jnp.zeros_like(new.sparse_density),
        selected=jax.tree.unflatten(sel_def, selected),
        sparse_age=carry(old.sparse_age, new.sparse_age),
        sparse_inner_state=carry(old.sparse_inner_state, new.sparse_inner_state),
        dense_inner_state=jax.tree.map(_place, old.dense_inner_state, new.dense_inner_state),
    )


def _relayout_mask(old: Any, new: Any) -> Any:
    grids_changed = any(
        o.shape != n.shape
        for o, n in zip(jax.tree.leaves(old.chunk_grid), jax.tree.leaves(new.chunk_grid))
    )
    placed = type(new)(*(jax.tree.map(_place, o, n) for o, n in zip(old[:3], new[:3])), new[3])
    if grids_changed:  # refresh at the next update with the new chunking
        placed = placed._replace(**{placed._fields[1]: jnp.zeros_like(new[1])})
    return placed


def relayout(
    tx: optax.GradientTransformation, state: optax.OptState, params: optax.Params
) -> optax.OptState:
    """``state`` (made for the same parameters on another mesh) laid out for ``params``.

    Use it when a checkpoint's optimizer state has other shapes than
    ``tx.init(params)`` on the new mesh: restore the checkpoint with its own shapes
    (e.g. into ``jax.eval_shape(tx.init, params_on_the_old_mesh)``, placed on the new
    devices), then call ``relayout(tx, restored, params)``. It is not needed between
    one device and FSDP meshes, whose layouts agree (restore directly); it is for
    tensor-parallel or other shardings that re-chunk a leaf (:func:`~nanoadam_jax.plan`
    marks them).

    What carries over: every step counter, every dense leaf's state, and the state of
    each sparse leaf whose layout is unchanged, exactly. For a re-chunked leaf, the
    selected entries are translated to the new chunks (an entry keeps its moments and
    age; where a new chunk receives more old entries than it holds, it keeps those with
    the smallest ``|w|``, which are the ones the default criterion re-selects; this
    reads the leaf in row-major order, exact unless layer axes were declared at
    non-leading positions), and the next update re-selects every sparse leaf
    (a refresh: entries that stay selected keep their moments, as at any refresh). All
    arrays take the shardings of ``tx.init(params)``.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> tx = nanoadam.nanoadam(1e-3, density=0.1)
      >>> params = {"w": jnp.ones((64, 512))}
      >>> state = tx.init(params)
      >>> moved = nanoadam.relayout(tx, state, params)  # same layout: a copy
      >>> moved[0].selected["w"].shape == state[0].selected["w"].shape
      True

    Args:
      tx: the optimizer (the same transformation that made ``state``).
      state: the optimizer state to move.
      params: the parameters on the new mesh (arrays or ``jax.ShapeDtypeStruct``s
        with shardings).

    Returns:
      A state with the structure, shapes and shardings of ``tx.init(params)``.
    """
    target = tx.init(params)
    if jax.tree.structure(state, is_leaf=_is_state) != jax.tree.structure(
        target, is_leaf=_is_state
    ):
        raise ValueError(
            "relayout: `state` does not have the structure of `tx.init(params)`; was it "
            "made by the same optimizer for the same parameter tree?"
        )
    box_def, boxes = box_tree(params)

    def sparse_leaves(new: SparseUpdateState) -> list[Any]:
        """The sparse parameter leaves, in the order of ``jax.tree.leaves(new.selected)``."""
        flat = box_def.flatten_up_to(new.selected)
        return [jax.tree.leaves(b)[0] for x, b in zip(flat, boxes) if x is not None]

    def convert(old: Any, new: Any) -> Any:
        if isinstance(new, SparseUpdateState):
            return _relayout_sparse(old, new, sparse_leaves(new))
        if isinstance(new, (MagnitudeMaskState, MaskedApplyState)):
            return _relayout_mask(old, new)
        return _place(old, new)

    return jax.tree.map(convert, state, target, is_leaf=_is_state)
