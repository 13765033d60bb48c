"""Selection variants the benchmarks compare with the library's (not part of the library).

* :func:`chunk_positions_top_k`: :func:`nanoadam_jax.selection.chunk_positions` computed
  with ``jax.lax.top_k`` per row instead of the threshold search (the ``top_k`` method of
  ``bench_selection.py`` and ``bench_chunk.py``; tested equal in ``tests/test_selection.py``
  and ``tests/test_properties.py``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["chunk_positions_top_k"]


def _order_keys(keys: jax.Array) -> jax.Array:
    """int32 keys whose *largest* values are the smallest ``uint32`` keys (for top_k)."""
    signed = jax.lax.bitcast_convert_type(keys ^ jnp.uint32(0x80000000), jnp.int32)
    return ~signed


def chunk_positions_top_k(keys: jax.Array, k: jax.typing.ArrayLike, capacity: int) -> jax.Array:
    """:func:`nanoadam_jax.selection.chunk_positions` with ``jax.lax.top_k`` per row.

    Exact: ``jax.lax.top_k`` returns the lower position first among equal keys.

    Example:
      >>> import jax.numpy as jnp
      >>> from benchmarks._selection_variants import chunk_positions_top_k
      >>> keys = jnp.array([[3, 1, 1, 1, 0], [9, 8, 7, 6, 5]], jnp.uint32)
      >>> chunk_positions_top_k(keys, 3, 3).tolist()
      [[1, 2, 4], [2, 3, 4]]

    Args:
      keys: ``uint32`` keys (see :func:`nanoadam_jax.selection_keys`), shape ``(*grid, C)``.
      k: entries to select per row (int, may be traced; at most ``capacity``).
      capacity: slots per row (static).

    Returns:
      int32 positions of shape ``(*grid, capacity)``.
    """
    c = keys.shape[-1]
    if capacity == 0:
        return jnp.zeros((*keys.shape[:-1], 0), jnp.int32)
    _, pos = jax.lax.top_k(_order_keys(keys), capacity)
    pos = pos.astype(jnp.int32)
    if not (isinstance(k, int) and k >= capacity):
        slot = jax.lax.broadcasted_iota(jnp.int32, pos.shape, pos.ndim - 1)
        pos = jnp.where(slot < jnp.asarray(k, jnp.int32), pos, jnp.int32(c))
    return jnp.sort(pos, axis=-1)
