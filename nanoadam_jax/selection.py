"""Which entries of a weight tensor are trainable: the selection rule, row by row.

Everything that decides *which* entries NanoAdam updates lives here, as pure algorithms
on rows of keys (how tensors are cut into rows, the chunks, is
:mod:`nanoadam_jax.layout`'s business; this module does not import it):

* :func:`num_selected` turns a density into a count ``k`` (the rounding rule).
* :func:`selection_keys` turns weights into sortable ``uint32`` keys for a
  criterion (smallest ``|w|``, largest ``|w|`` or random).
* :func:`bisect` is the one bisection: every threshold below (and the refresh's search of
  old positions, :func:`nanoadam_jax.refresh.carry_plan`) is found with it.
* :func:`kth_smallest_key` finds each row's ``k``-th smallest key, and
  :func:`bottom_k_mask` picks exactly ``k`` smallest keys per row as a mask.
* :func:`chunk_mask` and :func:`chunk_positions` do the same for rows on the last axis
  (one row per chunk): the optimizer's refresh.
* :func:`select_global_masks` applies one threshold over many leaves (``scope="global"``).

Masks of a whole tensor, cut into chunks, are :func:`nanoadam_jax.layout.select_mask`
(``nanoadam.select_mask``) and :func:`nanoadam_jax.layout.selection_mask`.

The rule, in words: *the trainable set of a chunk is the k entries with the
smallest key; among equal keys the one with the smaller position in the chunk
(row-major order) wins.* The selection uses no gradient.

Numerical conventions (documented and tested):

* Keys are computed from the weights cast to float32 (exact for bf16, fp16 and
  fp32; for float64 weights, values closer than float32 resolution tie and are
  broken by index).
* ``NaN`` weights get the largest possible key: a NaN weight is never "small"
  (nor "large", nor randomly picked) unless more than ``n - k`` entries are NaN,
  in which case NaNs fill the remaining slots in index order. ``+-inf`` is an
  ordinary (huge) magnitude.
* ``-0.0`` and ``+0.0`` have the same magnitude.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanoadam_jax._rows import set_rows
from nanoadam_jax._sharding import explicit_sharding

__all__ = [
    "CRITERIA",
    "METHODS",
    "bisect",
    "bottom_k_mask",
    "chunk_mask",
    "chunk_positions",
    "kth_smallest_key",
    "num_selected",
    "num_selected_static",
    "select_global_masks",
    "selection_keys",
]

#: Accepted values of ``criterion``.
CRITERIA = ("smallest", "largest", "random")
#: Accepted values of :func:`bottom_k_mask`'s ``method`` (how the k smallest keys are found).
METHODS = ("bisection", "sort", "top_k")

_MAX_KEY = jnp.uint32(0xFFFFFFFF)
_INF_BITS = 0x7F800000


def num_selected(n: int, density: jax.typing.ArrayLike) -> jax.Array:
    """Number of selected entries ``k`` out of ``n`` for a density (the rounding rule).

    ``k = clip(round_half_up(density * n), 1, n)`` for ``n > 0`` and ``k = 0`` for an
    empty leaf. Every non-empty leaf therefore trains at least one entry, and a leaf
    smaller than ``1 / density`` trains exactly one. The product is computed in
    float32 (``n`` above ``2**24`` may round ``k`` by a few entries). A traced density
    cannot be checked: values ``<= 0`` give ``k = 1``, values ``>= 1`` give ``k = n``,
    and NaN gives ``k = 0`` (nothing trains).

    Works with a traced ``density`` (for example under ``jax.vmap``).

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> int(nanoadam.num_selected(1000, 0.1)), int(nanoadam.num_selected(3, 0.1))
      (100, 1)

    Args:
      n: number of entries (static).
      density: fraction of entries to select, in ``(0, 1]``.

    Returns:
      An int32 scalar.
    """
    if n == 0:
        return jnp.zeros((), jnp.int32)
    density = jnp.asarray(density, jnp.float32)
    k = jnp.clip(jnp.floor(density * jnp.float32(n) + 0.5), 1, n)
    # A (traced) NaN density selects nothing, explicitly rather than by int conversion.
    return jnp.where(jnp.isnan(density), 0, k).astype(jnp.int32)


def num_selected_static(n: int, density: float) -> int:
    """:func:`num_selected` for a static density, as a Python int (same float32 rule).

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> nanoadam.selection.num_selected_static(1000, 0.1)
      100
    """
    if n == 0:
        return 0
    k = np.floor(np.float32(density) * np.float32(n) + np.float32(0.5))
    return int(min(max(k, 1), n))


def selection_keys(
    x: jax.Array, criterion: str = "smallest", key: jax.Array | None = None
) -> jax.Array:
    """Map weights to ``uint32`` keys whose *smallest* values are the ones to select.

    * ``"smallest"``: the float32 bit pattern of ``|x|`` (monotone in ``|x|``).
    * ``"largest"``: the bit pattern reversed, so large magnitudes get small keys.
    * ``"random"``: uniform random bits from ``key``.

    NaN entries get the largest key for every criterion (see the module docstring).

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> k = nanoadam.selection_keys(jnp.array([0.5, -0.1, 2.0]))
      >>> [int(i) for i in jnp.argsort(k)]
      [1, 0, 2]

    Args:
      x: weights, any float dtype and shape.
      criterion: one of :data:`CRITERIA`.
      key: a PRNG key, required for ``"random"``.

    Returns:
      A uint32 array with the shape of ``x``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    xf = jnp.asarray(x).astype(jnp.float32)
    nan = jnp.isnan(xf)
    if criterion == "random":
        if key is None:
            raise ValueError("criterion='random' needs a PRNG `key`")
        keys = jax.random.bits(key, xf.shape, jnp.uint32)
        # Keep _MAX_KEY for NaN only, so random keys never outrank a NaN.
        keys = jnp.minimum(keys, _MAX_KEY - 1)
    else:
        bits = jax.lax.bitcast_convert_type(jnp.abs(xf), jnp.uint32)
        if criterion == "largest":
            bits = jnp.uint32(_INF_BITS) - jnp.minimum(bits, jnp.uint32(_INF_BITS))
        keys = bits
    return jnp.where(nan, _MAX_KEY, keys)


# -- the one bisection --------------------------------------------------------------------------


def bisect(
    enough: Callable[[jax.Array], jax.Array], lo: jax.Array, hi: jax.Array, span: int
) -> jax.Array:
    """Smallest ``t`` in ``[lo, hi]`` with ``enough(t)``, element-wise, by bisection.

    ``enough`` must be monotone (False, then True, as ``t`` grows) and is taken to hold
    at ``hi``. ``span`` is a static bound on ``hi - lo``: the loop runs
    ``max(1, span.bit_length())`` passes (32 over all ``uint32`` keys), which makes the
    answer exact. ``lo`` and ``hi`` may be arrays (one search per element, e.g. per row).
    Each pass is one call of ``enough``: only comparisons and counts, no sort, so it runs
    under ``jit`` and ``vmap`` with traced bounds.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> int(nanoadam.selection.bisect(lambda t: t * t >= 50, jnp.int32(0), jnp.int32(99), 99))
      8

    Args:
      enough: ``t -> bool array`` shaped like ``lo``.
      lo: lower bounds (an integer array).
      hi: upper bounds, same shape and dtype as ``lo``.
      span: static bound on ``hi - lo``.

    Returns:
      An array shaped like ``lo``.
    """

    def body(_, carry):
        lo, hi = carry
        mid = lo + (hi - lo) // 2
        ok = enough(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, _ = jax.lax.fori_loop(0, max(1, int(span).bit_length()), body, (lo, hi))
    return lo


# -- rows on the first axis: (rows, *rest) ------------------------------------------------------


def _rows_like(keys: jax.Array, value: int, dtype: Any) -> jax.Array:
    """A ``(rows,)`` vector sharded like the rows of ``keys`` (under explicit sharding)."""
    sharding = explicit_sharding(keys)
    if sharding is not None:
        spec = jax.sharding.PartitionSpec(sharding.spec[0] if len(sharding.spec) else None)
        sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
    return jnp.full((keys.shape[0],), value, dtype, device=sharding)


def _row_view(v: jax.Array, ndim: int) -> jax.Array:
    """A per-row value ``(rows,)`` broadcastable against ``(rows, *rest)``."""
    return v.reshape(v.shape + (1,) * (ndim - 1))


def _row_sum(x: jax.Array) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), dtype=jnp.int32)


def _row_index(keys: jax.Array) -> jax.Array:
    """Row-major position of each entry inside its row of a ``(rows, *rest)`` array.

    Built from iotas (element-wise): partitioned like ``keys``, never gathered.
    """
    sharding = explicit_sharding(keys)
    idx = jnp.zeros((), jnp.int32)
    stride = 1
    for axis in range(keys.ndim - 1, 0, -1):
        iota = jax.lax.broadcasted_iota(jnp.int32, keys.shape, axis, out_sharding=sharding)
        idx = idx + iota * jnp.int32(stride)
        stride *= keys.shape[axis]
    return jnp.broadcast_to(idx, keys.shape)


def kth_smallest_key(keys: jax.Array, k: jax.Array) -> jax.Array:
    """Smallest ``t`` with ``count(keys[r] <= t) >= k[r]``, per row, by bisection.

    Exact in 32 passes over the data (:func:`bisect`), each pass a comparison and a
    count; works under ``jit`` and ``vmap`` with traced ``k``. For ``k = 0`` it returns 0.
    A row may span several axes (``(rows, *rest)``, no reshape); on a sharded ``keys`` each
    pass costs one all-reduce of ``rows`` counts.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> keys = jnp.array([[5, 1, 9, 1]], jnp.uint32)
      >>> int(nanoadam.kth_smallest_key(keys, jnp.array([3]))[0])
      5

    Args:
      keys: uint32 array of shape ``(rows, cols)`` (or ``(rows, *rest)``).
      k: int32 array of shape ``(rows,)``.

    Returns:
      uint32 thresholds of shape ``(rows,)``.
    """
    lo = _rows_like(keys, 0, jnp.uint32)
    hi = _rows_like(keys, 0xFFFFFFFF, jnp.uint32)
    return bisect(lambda t: _row_sum(keys <= _row_view(t, keys.ndim)) >= k, lo, hi, 0xFFFFFFFF)


def _bottom_k_nd(keys: jax.Array, k: jax.Array) -> jax.Array:
    """Exactly ``k[r]`` smallest keys in each row of ``(rows, *rest)``; ties by index.

    Only comparisons and reductions over the data: on a sharded ``keys`` each pass
    costs one all-reduce of ``rows`` counts. Ties at the threshold are cut by a
    second bisection, on the row-major position, instead of a cumulative sum (a
    cumsum along a sharded axis is all-gathered by XLA, or refused under explicit
    sharding). The second bisection runs only when there are surplus ties.
    """
    size = int(np.prod(keys.shape[1:]))
    t = _row_view(kth_smallest_key(keys, k), keys.ndim)
    below = keys < t
    equal = keys == t
    need = k - _row_sum(below)

    def cut(_):  # smallest j with count(equal & index < j) >= need
        index = _row_index(keys)
        lo = _rows_like(keys, 0, jnp.int32)
        hi = _rows_like(keys, size, jnp.int32)
        j = bisect(
            lambda j: _row_sum(equal & (index < _row_view(j, keys.ndim))) >= need, lo, hi, size
        )
        return equal & (index < _row_view(j, keys.ndim))

    surplus = jnp.any(_row_sum(equal) > need)
    return below | jax.lax.cond(surplus, cut, lambda _: equal, None)


def bottom_k_mask(keys: jax.Array, k: jax.Array, method: str = "bisection") -> jax.Array:
    """Boolean mask of exactly ``k[r]`` smallest keys in each row; ties by index.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> keys = jnp.array([[3, 1, 1, 1, 0]], jnp.uint32)
      >>> nanoadam.bottom_k_mask(keys, jnp.array([3])).astype(int).tolist()
      [[0, 1, 1, 0, 1]]

    Args:
      keys: uint32 array ``(rows, cols)``.
      k: int32 array ``(rows,)`` with ``0 <= k <= cols``.
      method: ``"bisection"`` (default; exact, no sort, traced ``k``), ``"sort"``
        (a stable argsort; traced ``k``) or ``"top_k"`` (``jax.lax.top_k``; needs a
        concrete ``k``, equal on all rows). The three give identical masks; the
        alternatives are cross-checks of the rule (tested equal).

    Returns:
      A bool array shaped like ``keys``.
    """
    if method != "top_k":
        k = jnp.asarray(k, jnp.int32)
    if method == "bisection":
        return _bottom_k_nd(keys, k)
    if method == "sort":
        order = jnp.argsort(keys, axis=1, stable=True)
        ranks = (
            jnp.zeros_like(order)
            .at[jnp.arange(keys.shape[0])[:, None], order]
            .set(jnp.arange(keys.shape[1], dtype=order.dtype)[None, :])
        )
        return ranks < k[:, None]
    if method == "top_k":
        if isinstance(k, jax.core.Tracer):
            raise ValueError("method='top_k' needs a concrete (non-traced) density")
        k_rows = np.broadcast_to(np.asarray(k, np.int32).reshape(-1), (keys.shape[0],))
        kk = int(k_rows.max(initial=0))
        if kk == 0:
            return jnp.zeros(keys.shape, bool)
        # Larger value = smaller key; lax.top_k returns the lower index first on ties.
        # Rows may need different k (a short last block): keep the first k[r] of row r.
        _, idx = jax.lax.top_k(_MAX_KEY - keys, kk)
        keep = np.arange(kk)[None, :] < k_rows[:, None]
        rows = jnp.arange(keys.shape[0])[:, None]
        return jnp.zeros(keys.shape, bool).at[rows, idx].set(jnp.asarray(keep))
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def select_global_masks(
    leaves: Sequence[jax.Array],
    density: jax.typing.ArrayLike,
    *,
    criterion: str = "smallest",
    key: jax.Array | None = None,
) -> list[jax.Array]:
    """Masks for one global selection over several leaves (``scope="global"``).

    ``k = num_selected(total entries, density)`` entries with the smallest keys over
    the concatenation of all leaves (in the given order, each flattened); ties are
    broken by position in that concatenation. Leaves are never concatenated in
    memory: counts are summed over leaves at each bisection pass.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> a, b = jnp.array([0.1, 5.0]), jnp.array([0.2, 0.3, 9.0])
      >>> [m.tolist() for m in nanoadam.select_global_masks([a, b], 0.4)]
      [[True, False], [True, False, False]]

    Args:
      leaves: weight arrays.
      density: fraction in ``(0, 1]`` (may be traced).
      criterion: one of :data:`CRITERIA`.
      key: PRNG key for ``criterion="random"``.

    Returns:
      A list of bool masks, one per leaf.
    """
    total = sum(int(x.size) for x in leaves)
    k = num_selected(total, density)
    keys = []
    for i, x in enumerate(leaves):
        leaf_key = None if key is None else jax.random.fold_in(key, i)
        keys.append(selection_keys(x, criterion, leaf_key))

    def count(pred):
        return sum(
            (jnp.sum(pred(kk, j), dtype=jnp.int32) for j, kk in enumerate(keys)), jnp.int32(0)
        )

    def at_most(mid):
        return count(lambda kk, _: kk <= mid) >= k

    t = bisect(at_most, jnp.uint32(0), _MAX_KEY, 0xFFFFFFFF)
    need = k - count(lambda kk, _: kk < t)
    # Surplus ties at the threshold: keep the first `need` in concatenation order, by a
    # bisection on the global position (leaf offset + row-major index), not a cumsum.
    offsets = np.cumsum([0] + [int(x.size) for x in leaves]).tolist()
    positions = [_row_index(kk[None])[0] + jnp.int32(off) for kk, off in zip(keys, offsets)]

    def cut(_):
        def ties_before(mid):
            return count(lambda kk, j: (kk == t) & (positions[j] < mid)) >= need

        return bisect(ties_before, jnp.int32(0), jnp.int32(total), total)

    surplus = count(lambda kk, _: kk == t) > need
    cut_at = jax.lax.cond(surplus, cut, lambda _: jnp.int32(total), None)
    return [(kk < t) | ((kk == t) & (pos < cut_at)) for kk, pos in zip(keys, positions)]


# -- rows on the last axis: (*grid, C), one row per chunk ---------------------------------------


def _row_cumsum(mask: jax.Array) -> jax.Array:
    """Inclusive running count of ``mask`` along the last axis (int32).

    Two levels (within blocks of 64, then over block totals): about twice as fast on
    XLA:CPU as one ``cumsum`` over a 16k-entry row, and still local to each row.
    """
    c = mask.shape[-1]
    block = 64 if c % 64 == 0 and c > 64 else c
    m = mask.astype(jnp.int32).reshape(*mask.shape[:-1], c // block, block)
    inner = jnp.cumsum(m, axis=-1, dtype=jnp.int32)
    total = inner[..., -1]
    offset = jnp.cumsum(total, axis=-1, dtype=jnp.int32) - total
    return (inner + offset[..., None]).reshape(mask.shape)


def chunk_mask(keys: jax.Array, k: jax.typing.ArrayLike) -> jax.Array:
    """Mask of the ``k`` smallest keys in every row (chunk), ties by position.

    A 32-pass bisection (:func:`bisect`) on the key bits finds each row's ``k``-th
    smallest key (exact); surplus ties at it are ranked by position with a running count
    (only when some row has them). Every operation is element-wise or along the last
    axis, so leading axes sharded over devices need no communication.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> keys = jnp.array([[3, 1, 1, 1, 0]], jnp.uint32)
      >>> nanoadam.selection.chunk_mask(keys, 3).astype(int).tolist()
      [[0, 1, 1, 0, 1]]

    Args:
      keys: ``uint32`` keys, shape ``(*grid, C)``.
      k: entries to select per row (int, may be traced).

    Returns:
      A bool array shaped like ``keys``.
    """
    k = jnp.asarray(k, jnp.int32)
    # Built from slices of ``keys`` so that, under explicit sharding, they are sharded
    # like its rows.
    lo = jnp.zeros_like(keys[..., 0])
    hi = jnp.full_like(keys[..., 0], _MAX_KEY)

    def enough(mid):
        return jnp.sum(keys <= mid[..., None], axis=-1, dtype=jnp.int32) >= k

    t = bisect(enough, lo, hi, 0xFFFFFFFF)[..., None]
    at_most = keys <= t
    surplus = jnp.any(jnp.sum(at_most, axis=-1, dtype=jnp.int32) > k)

    def cut_ties(_):
        equal = keys == t
        need = k - jnp.sum(keys < t, axis=-1, dtype=jnp.int32, keepdims=True)
        return (keys < t) | (equal & (_row_cumsum(equal) <= need))

    return jax.lax.cond(surplus, cut_ties, lambda _: at_most, None)


def chunk_positions(keys: jax.Array, k: jax.typing.ArrayLike, capacity: int) -> jax.Array:
    """Sorted positions of the ``k`` smallest keys in every row (chunk), ties by position.

    The per-chunk selection of the compact layout: ``keys`` is ``(*grid, C)``, one row per
    chunk; the result is ``(*grid, capacity)`` int32 positions into each row, ascending,
    with the slots past ``k`` set to ``C`` (padding, used only when a traced ``k`` is
    smaller than ``capacity``).

    How: :func:`chunk_mask` (a 32-pass bisection on the key bits, surplus ties ranked by
    position), then the selected positions are scattered into their slots. Every
    operation is element-wise or along a row, so a grid sharded over devices needs no
    communication. Measured against ``jax.lax.top_k`` per row on a 2-core CPU
    (``python benchmarks/run.py --sections chunk``; the ``top_k`` variant lives in
    ``benchmarks/_selection_variants.py``): several times faster, and XLA's partitioner
    all-gathers a sharded ``top_k`` operand.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> keys = jnp.array([[3, 1, 1, 1, 0], [9, 8, 7, 6, 5]], jnp.uint32)
      >>> nanoadam.selection.chunk_positions(keys, 3, 3).tolist()
      [[1, 2, 4], [2, 3, 4]]

    Args:
      keys: ``uint32`` keys (see :func:`selection_keys`), shape ``(*grid, C)``.
      k: entries to select per row (int, may be traced; at most ``capacity``).
      capacity: slots per row (static).

    Returns:
      int32 positions of shape ``(*grid, capacity)``.
    """
    c = keys.shape[-1]
    lead = keys.shape[:-1]
    if capacity == 0:
        return jnp.zeros((*lead, 0), jnp.int32)
    take = chunk_mask(keys, k)
    slots = jnp.where(take, _row_cumsum(take) - 1, capacity)
    cols = jax.lax.broadcasted_iota(
        jnp.int32, keys.shape, keys.ndim - 1, out_sharding=explicit_sharding(keys)
    )
    base = jnp.full_like(keys[..., :1], c, dtype=jnp.int32)
    base = jnp.broadcast_to(base, (*lead, capacity))
    return set_rows(base, slots, cols)
