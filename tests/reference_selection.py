"""The selection rule in plain numpy: the reference the selection, hardening and property
tests check.

Written independently of ``nanoadam_jax`` (a sort instead of a bisection; no library code
is imported), from the documented rule:

* ``k = clip(floor(d * n + 0.5), 1, n)`` in float32 per selection unit (0 for an empty one);
* the ``k`` smallest (or largest) float32 magnitudes, NaN after everything (also after
  ``inf``), ``-0.0 == +0.0``, ties by position inside the unit;
* the units: a leaf's *layer slices* (the axes not declared as selection axes are layer
  axes; every index of them is selected on its own), each flattened row-major and cut into
  equal chunks of :func:`ref_chunk_length` entries (``scope="chunk"``), or one unit per slice
  (``scope="leaf"``), or one unit over all leaves (:func:`ref_global_masks`).
"""

from __future__ import annotations

import math

import numpy as np

#: The library's default target chunk length (``nanoadam_jax.layout.DEFAULT_CHUNK_SIZE``).
DEFAULT_CHUNK_SIZE = 16384


def ref_k(n: int, density: float) -> int:
    """The documented rounding rule, in float32: ``clip(floor(d * n + 0.5), 1, n)``."""
    if n == 0:
        return 0
    k = np.floor(np.float32(density) * np.float32(n) + np.float32(0.5))
    return int(min(max(int(k), 1), n))


def ref_order(flat: np.ndarray, criterion: str = "smallest") -> np.ndarray:
    """Indices in selection order: by float32 magnitude, NaN last, ties by index."""
    mag = np.abs(np.asarray(flat).astype(np.float32).reshape(-1))
    nan = np.isnan(mag)
    mag = np.where(nan, np.float32(0), mag)
    primary = mag if criterion == "smallest" else -mag
    return np.lexsort((np.arange(mag.size), primary, nan))


def ref_chunk_length(shape: tuple[int, ...], target: int = DEFAULT_CHUNK_SIZE) -> int:
    """Entries per chunk of one layer slice of ``shape`` (the documented rule).

    The whole slice if it has at most ``target`` entries. Otherwise the trailing axes that
    fit whole, times the largest divisor of the next axis that keeps the chunk at most
    ``target``. When that axis is the first one, the divisor must also keep every chunk
    inside one shard for every even split of the axis over 1..16 devices (so the chunking
    is the same on every FSDP mesh), unless that makes the chunk shorter than
    ``target // 16``. If the chunk is still shorter than ``target // 16`` the whole axis
    is taken instead (the chunk is then longer than ``target``).
    """
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    if n <= target:
        return n
    inner = 1
    for axis in range(len(shape) - 1, -1, -1):
        size = shape[axis]
        if inner * size <= target:
            inner *= size
            continue
        fits = [f for f in range(1, size + 1) if size % f == 0 and f * inner <= target]
        splits = [d for d in range(1, 17) if size % d == 0]
        robust = [f for f in fits if all((size // d) % f == 0 for d in splits)]
        if axis == 0 and max(robust) * inner >= target // 16:
            return max(robust) * inner
        length = max(fits) * inner
        return size * inner if length < target // 16 else length
    raise AssertionError("unreachable")


def ref_units(n: int, unit: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the consecutive units of ``unit`` entries over ``n`` entries."""
    if n == 0:
        return []
    assert n % unit == 0, (n, unit)
    return [(s, s + unit) for s in range(0, n, unit)]


def _split(shape: tuple[int, ...], layer_axes: tuple[int, ...]):
    ndim = len(shape)
    batch = tuple(sorted(a % ndim for a in layer_axes)) if ndim else ()
    rest = tuple(a for a in range(ndim) if a not in batch)
    return batch, rest


def _unit_length(slice_shape: tuple[int, ...], scope: str, size: int) -> int:
    n = math.prod(slice_shape)
    if scope == "chunk":
        return ref_chunk_length(slice_shape, size)
    if scope == "leaf":
        return n
    raise ValueError(scope)


def ref_mask(
    w,
    density: float,
    scope: str = "chunk",
    size: int = DEFAULT_CHUNK_SIZE,
    criterion: str = "smallest",
    layer_axes: tuple[int, ...] = (),
) -> np.ndarray:
    """Boolean mask of the selected entries of one leaf.

    Args:
      w: the weights.
      density: the density.
      scope: ``"chunk"`` (``size`` is the target chunk length) or ``"leaf"`` (one unit
        per layer slice).
      size: the target chunk length.
      criterion: ``"smallest"`` or ``"largest"``.
      layer_axes: the leaf's layer (batch) axes.
    """
    w = np.asarray(w).astype(np.float32)
    batch, rest = _split(w.shape, layer_axes)
    moved = np.transpose(w, batch + rest)
    slice_shape = tuple(w.shape[a] for a in rest)
    n = math.prod(slice_shape)
    rows = moved.reshape(-1, n) if n else moved.reshape(math.prod(moved.shape[: len(batch)]), 0)
    out = np.zeros(rows.shape, bool)
    if n:
        unit = _unit_length(slice_shape, scope, size)
        for r in range(rows.shape[0]):
            for start, stop in ref_units(n, unit):
                part = rows[r, start:stop]
                out[r, start + ref_order(part, criterion)[: ref_k(unit, density)]] = True
    return np.transpose(out.reshape(moved.shape), np.argsort(batch + rest))


def ref_positions(
    w,
    density: float,
    scope: str = "chunk",
    size: int = DEFAULT_CHUNK_SIZE,
    capacity: int | None = None,
    layer_axes: tuple[int, ...] = (),
) -> np.ndarray:
    """The selected positions inside each chunk, sorted, padded with the chunk length.

    Shaped ``(*layer_shape, chunks, capacity)`` (``capacity`` defaults to ``k``): the
    compact state's ``selected`` array reshaped to one axis of chunks per layer slice.
    """
    w = np.asarray(w)
    batch, rest = _split(w.shape, layer_axes)
    slice_shape = tuple(w.shape[a] for a in rest)
    n = math.prod(slice_shape)
    unit = _unit_length(slice_shape, scope, size) if n else 0
    k = ref_k(unit, density)
    capacity = k if capacity is None else capacity
    mask = ref_mask(w, density, scope, size, layer_axes=layer_axes)
    moved = np.transpose(mask, batch + rest).reshape(-1, n // unit if unit else 0, unit)
    out = np.full((*moved.shape[:2], capacity), unit, np.int64)
    for r in range(moved.shape[0]):
        for c in range(moved.shape[1]):
            pos = np.flatnonzero(moved[r, c])[:capacity]
            out[r, c, : pos.size] = pos
    return out.reshape(*(w.shape[a] for a in batch), -1, capacity)


def ref_global_masks(leaves, density, criterion="smallest") -> list[np.ndarray]:
    """Masks of ``scope="global"``: one selection over all leaves, concatenated in order."""
    flats = [np.asarray(x).astype(np.float32).reshape(-1) for x in leaves]
    cat = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    chosen = np.zeros(cat.size, bool)
    chosen[ref_order(cat, criterion)[: ref_k(cat.size, density)]] = True
    out, start = [], 0
    for x, f in zip(leaves, flats):
        out.append(chosen[start : start + f.size].reshape(np.shape(x)))
        start += f.size
    return out


def ref_chunk_positions(keys: np.ndarray, k: int, capacity: int) -> np.ndarray:
    """``selection.chunk_positions`` on ``uint32`` keys: per row the sorted positions of
    the ``k`` smallest keys (ties by position), padded with the row length."""
    keys = np.asarray(keys)
    c = keys.shape[-1]
    rows = keys.reshape(-1, c)
    out = np.full((rows.shape[0], capacity), c, np.int64)
    for r in range(rows.shape[0]):
        order = np.lexsort((np.arange(c), rows[r]))[: min(k, capacity)]
        out[r, : order.size] = np.sort(order)
    return out.reshape(*keys.shape[:-1], capacity)


def nonzero(u) -> np.ndarray:
    """Where an update is non-zero (any float dtype)."""
    return np.asarray(u).astype(np.float32) != 0
