"""Gradient and update masking: :func:`magnitude_mask` (alias :func:`mask`) and
:func:`masked_apply`, with full-size bool masks (research pipelines; the memory-saving
optimizer is :func:`~nanoadam_jax.sparse_update`).

* :func:`magnitude_mask` zeroes the gradient outside the selection: *gradient masking
  only*. Chained before ``optax.adam`` it does **not** guarantee zero updates outside the
  mask, because Adam keeps momentum for entries that left the selection.
* :func:`masked_apply` zeroes the updates outside the selection: it closes a spelled-out
  pipeline ``magnitude_mask -> scale_by_adam -> masked_apply -> lr``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanoadam_jax import layout, refresh, selection
from nanoadam_jax._tree import box_tree, positions, require_params, subtree, zero_update
from nanoadam_jax.config import (
    Density,
    DimensionNumbers,
    SelectionConfig,
    init_layouts,
    selection_args,
    stored_layouts,
)
from nanoadam_jax.labels import DENSE, SPARSE, Labels, label_params

__all__ = ["MagnitudeMaskState", "MaskedApplyState", "magnitude_mask", "mask", "masked_apply"]


class MagnitudeMaskState(NamedTuple):
    """State of :func:`magnitude_mask`.

    Attributes:
      mask_step: int32 update counter.
      mask_density: float32 density of the current mask.
      mask: per sparse leaf a bool mask with the leaf's shape (``None`` elsewhere).
      chunk_grid: per sparse leaf an empty ``(*layer_axes, *chunk_grid, 0)`` array whose
        shape records the chunking chosen at ``init`` (``None`` elsewhere).
    """

    mask_step: jax.Array
    mask_density: jax.Array
    mask: Any
    chunk_grid: Any


class MaskedApplyState(NamedTuple):
    """State of :func:`masked_apply`.

    Attributes:
      apply_step: int32 update counter.
      apply_density: float32 density of the current mask.
      apply_mask: per sparse leaf a bool mask (``None`` for dense and frozen leaves).
      chunk_grid: as in :class:`MagnitudeMaskState`.
    """

    apply_step: jax.Array
    apply_density: jax.Array
    apply_mask: Any
    chunk_grid: Any


def _mask_init(config: SelectionConfig, params: Any) -> tuple[Any, ...]:
    leaves, treedef = jax.tree.flatten(params)
    labels = treedef.flatten_up_to(label_params(params, config.labels))
    sparse = positions(labels, SPARSE)
    masks = [(i, jnp.zeros_like(leaves[i], dtype=bool)) for i in sparse]
    grids = []
    config.init_max_density()  # validates the density (a schedule's range) for every scope
    if config.scope != "global":
        lays = init_layouts(config, params, sparse)
        grids = [(i, jnp.zeros((*lays[i].grid, 0), jnp.int32)) for i in sparse]
    sdef, _ = box_tree(params)
    return (
        jnp.zeros([], jnp.int32),
        jnp.zeros([], jnp.float32),
        subtree(treedef, len(leaves), masks),
        subtree(sdef, len(leaves), grids),
    )


def _mask_update(config: SelectionConfig, updates: Any, state: tuple[Any, ...], params: Any):
    """Refresh the masks if due, and apply them (and the labels) to ``updates``."""
    step, current, masks, grids = state
    leaves, treedef = jax.tree.flatten(params)
    labels = treedef.flatten_up_to(label_params(params, config.labels))
    sparse = positions(labels, SPARSE)
    sdef, _ = box_tree(params)
    density = config.density_fn(step)
    due = refresh.refresh_due(step, config.mask_interval, density, current)
    if config.scope != "global":
        lays = stored_layouts(config, params, sparse, sdef.flatten_up_to(grids))

    def select(op):
        xs, density, step, seed = op
        key = config.key(step, seed)
        if config.scope == "global":
            return selection.select_global_masks(xs, density, criterion=config.criterion, key=key)
        out = []
        for j, (i, x) in enumerate(zip(sparse, xs)):
            leaf_key = None if key is None else jax.random.fold_in(key, j)
            out.append(layout.selection_mask(lays[i], x, density, config.criterion, leaf_key))
        return out

    old = treedef.flatten_up_to(masks)
    new = refresh.cond(
        due,
        lambda op: select(op[0]),
        lambda op: op[1],
        (([leaves[i] for i in sparse], density, step, config.seed), [old[i] for i in sparse]),
    )
    flat_masks = list(old)
    for i, m in zip(sparse, new):
        flat_masks[i] = m
    flat_updates = treedef.flatten_up_to(updates)
    out = []
    for i, (u, lab) in enumerate(zip(flat_updates, labels)):
        if lab == SPARSE:
            out.append(jnp.where(flat_masks[i], u, jnp.zeros_like(u)))
        elif lab == DENSE:
            out.append(u)
        else:
            out.append(zero_update(u))
    new_masks = jax.tree_util.tree_unflatten(treedef, flat_masks)
    return (
        jax.tree_util.tree_unflatten(treedef, out),
        (optax.safe_int32_increment(step), density, new_masks, grids),
    )


def _masking(state_cls: type, name: str, config: SelectionConfig) -> Any:
    """The one factory behind :func:`magnitude_mask` and :func:`masked_apply`: both keep a
    full-size mask per sparse leaf, refresh it on the same schedule, and zero what they
    are given outside it; they differ only in their state's name and where they sit in a
    chain (before or after the inner optimizer)."""

    def init_fn(params):
        return state_cls(*_mask_init(config, params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        require_params(params, name)
        out, new = _mask_update(config, updates, tuple(state), params)
        return out, state_cls(*new)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def magnitude_mask(
    density: Density = 0.1,
    mask_interval: int = 100,
    *,
    scope: str = "chunk",
    chunk_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    dimension_numbers: DimensionNumbers = None,
    layer_axis_names: Sequence[str] = layout.LAYER_AXIS_NAMES,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Keep the gradient only at the selected (by default: smallest-magnitude) entries.

    This is *gradient masking only*: in ``optax.chain(nanoadam.mask(...), optax.adam(lr))``
    Adam still moves entries that left the selection, with their stale momentum. Close
    the pipeline with :func:`masked_apply` (same arguments) to get exact zeros outside
    the mask, or use :func:`sparse_update` / :func:`~nanoadam_jax.nanoadam`, which also
    store moments only for the selected entries. Given the same selection arguments it
    selects the same entries as :func:`sparse_update`, at the same steps.

    Dense leaves (see :mod:`nanoadam_jax.labels`) pass through unchanged; frozen
    leaves get zero updates.

    Example:
      >>> import jax.numpy as jnp, optax, nanoadam_jax as nanoadam
      >>> params = {"w": jnp.array([0.1, -2.0, 0.3, 4.0])}
      >>> tx = optax.chain(nanoadam.mask(density=0.5, mask_interval=10), optax.sgd(1.0))
      >>> state = tx.init(params)
      >>> updates, state = tx.update({"w": jnp.ones(4)}, state, params)
      >>> updates["w"].tolist()
      [-1.0, -0.0, -1.0, -0.0]

    Args:
      density: fraction of each chunk to select, in ``(0, 1]``, or a schedule
        ``step -> density`` (see :mod:`nanoadam_jax.schedules`). May be traced.
      mask_interval: refresh the mask every this many steps (positive int).
      scope: ``"chunk"``, ``"leaf"`` or ``"global"``; see :func:`sparse_update`.
      chunk_size: target chunk length; see :func:`sparse_update`.
      criterion: ``"smallest"`` ``|w|`` (the paper), ``"largest"`` or ``"random"``
        (seeded by ``seed``, new at each refresh) for ablations.
      labels: which leaves are sparse, dense or frozen; see :mod:`nanoadam_jax.labels`.
      dimension_numbers: layer axes; see :func:`sparse_update`.
      layer_axis_names: metadata names of layer axes; see :func:`sparse_update`.
      seed: seed of ``criterion="random"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    config = SelectionConfig(**selection_args(locals()))
    return _masking(MagnitudeMaskState, "magnitude_mask", config)


#: Alias of :func:`magnitude_mask`, as users write it in ``optax.chain``.
mask = magnitude_mask


def masked_apply(
    density: Density = 0.1,
    mask_interval: int = 100,
    *,
    scope: str = "chunk",
    chunk_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    dimension_numbers: DimensionNumbers = None,
    layer_axis_names: Sequence[str] = layout.LAYER_AXIS_NAMES,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Zero the updates outside the selection: closes a spelled-out NanoAdam pipeline.

    Give it the same selection arguments as the :func:`magnitude_mask` before it; it
    then recomputes the same mask at the same steps, so the pipeline

    ``optax.chain(magnitude_mask(...), optax.scale_by_adam(), masked_apply(...),
    optax.scale_by_learning_rate(lr))``

    moves exactly the selected entries, with stale momentum of deselected entries
    cut off. (It keeps full-size Adam moments: prefer :func:`~nanoadam_jax.nanoadam`
    for the memory saving.)

    Example:
      >>> import jax.numpy as jnp, optax, nanoadam_jax as nanoadam
      >>> kw = dict(density=0.5, mask_interval=10)
      >>> tx = optax.chain(nanoadam.magnitude_mask(**kw), optax.scale_by_adam(),
      ...                  nanoadam.masked_apply(**kw), optax.scale_by_learning_rate(0.1))
      >>> params = {"w": jnp.array([0.1, -2.0, 0.3, 4.0])}
      >>> updates, _ = tx.update({"w": jnp.ones(4)}, tx.init(params), params)
      >>> [round(u, 3) + 0.0 for u in updates["w"].tolist()]
      [-0.1, 0.0, -0.1, 0.0]

    Args: the same as :func:`magnitude_mask`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    config = SelectionConfig(**selection_args(locals()))
    return _masking(MaskedApplyState, "masked_apply", config)
