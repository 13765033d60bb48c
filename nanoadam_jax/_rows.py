"""Row-wise gathers and scatters: the one place their dimension numbers are written.

An array ``(*batch, n)`` is a stack of rows; an index array ``(*batch, m)`` names ``m``
positions in each row. Every leading axis is a batch axis of the gather/scatter, so a
grid of rows sharded along its leading axes stays sharded (no collective). Padding
positions (``>= n``) read zero and are dropped on write when ``padded`` is set.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["mode", "scatter_add_rows", "set_rows", "take_rows"]


def mode(padded: bool, in_bounds: Any = jax.lax.GatherScatterMode.CLIP) -> Any:
    """The gather/scatter mode: drop (or read zero at) padding positions when ``padded``,
    else ``in_bounds`` (every index valid)."""
    return jax.lax.GatherScatterMode.FILL_OR_DROP if padded else in_bounds


def _dnums(nb: int, scatter: bool) -> Any:
    batch = tuple(range(nb))
    if scatter:
        return jax.lax.ScatterDimensionNumbers(
            update_window_dims=(),
            inserted_window_dims=(nb,),
            scatter_dims_to_operand_dims=(nb,),
            operand_batching_dims=batch,
            scatter_indices_batching_dims=batch,
        )
    return jax.lax.GatherDimensionNumbers(
        offset_dims=(),
        collapsed_slice_dims=(nb,),
        start_index_map=(nb,),
        operand_batching_dims=batch,
        start_indices_batching_dims=batch,
    )


def take_rows(view: jax.Array, pos: jax.Array, padded: bool) -> jax.Array:
    """``view[..., pos]`` row by row; padding positions read zero.

    Example:
      >>> import jax.numpy as jnp
      >>> take_rows(jnp.array([[1.0, 2.0, 3.0]]), jnp.array([[2, 0]]), False).tolist()
      [[3.0, 1.0]]
    """
    return jax.lax.gather(
        view,
        pos.astype(jnp.int32)[..., None],
        _dnums(view.ndim - 1, scatter=False),
        slice_sizes=(1,) * view.ndim,
        indices_are_sorted=True,
        mode=mode(padded),
        fill_value=0,
    )


def scatter_add_rows(base: jax.Array, pos: jax.Array, values: jax.Array) -> jax.Array:
    """``base`` with ``values`` added at ``pos`` row by row (sorted, unique positions);
    padding positions are dropped.

    A scatter-*add* into zeros: when the result is added to the parameters in the same
    jitted step (``optax.apply_updates``), XLA turns both into one in-place scatter-add
    into the parameters (no parameter-sized update buffer).

    Example:
      >>> import jax.numpy as jnp
      >>> scatter_add_rows(jnp.zeros((1, 3)), jnp.array([[0, 3]]), jnp.ones((1, 2))).tolist()
      [[1.0, 0.0, 0.0]]
    """
    return jax.lax.scatter_add(
        base,
        pos.astype(jnp.int32)[..., None],
        values.astype(base.dtype),
        _dnums(base.ndim - 1, scatter=True),
        indices_are_sorted=True,
        unique_indices=True,
        mode=mode(True),
    )


def set_rows(base: jax.Array, pos: jax.Array, values: jax.Array) -> jax.Array:
    """``base[..., pos] = values`` row by row (sorted, unique positions); positions past
    the end of the rows are dropped.

    Example:
      >>> import jax.numpy as jnp
      >>> set_rows(jnp.zeros((1, 3)), jnp.array([[1, 5]]), jnp.ones((1, 2))).tolist()
      [[0.0, 1.0, 0.0]]
    """
    return jax.lax.scatter(
        base,
        pos[..., None],
        values,
        _dnums(base.ndim - 1, scatter=True),
        indices_are_sorted=True,
        unique_indices=True,
        mode=mode(True),
    )
