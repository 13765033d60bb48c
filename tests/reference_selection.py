"""The selection rule in plain numpy: the reference the hardening and property tests check.

Written independently of ``nanoadam_jax.selection`` (a sort instead of a bisection), from
the rule the README documents: ``k = clip(floor(d * n + 0.5), 1, n)`` in float32, the ``k``
smallest (or largest) float32 magnitudes, NaN never selected first, ties by flat index,
per leaf, per block of ``block_size`` flattened entries, or over all leaves at once.
"""

from __future__ import annotations

import numpy as np


def ref_k(n: int, density: float) -> int:
    """The documented rounding rule, in float32: ``clip(floor(d * n + 0.5), 1, n)``."""
    if n == 0:
        return 0
    k = np.floor(np.float32(density) * np.float32(n) + np.float32(0.5))
    return int(min(max(int(k), 1), n))


def ref_order(flat: np.ndarray, criterion: str = "smallest") -> np.ndarray:
    """Indices in selection order: by float32 magnitude, NaN last, ties by index."""
    mag = np.abs(np.asarray(flat, np.float32))
    nan = np.isnan(mag)
    mag = np.where(nan, np.float32(0), mag)
    primary = mag if criterion == "smallest" else -mag
    return np.lexsort((np.arange(flat.size), primary, nan))


def ref_blocks(n: int, scope: str, block_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each selection unit: the whole leaf, or its blocks."""
    size = block_size if (scope == "block" and n > block_size) else max(n, 1)
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def ref_mask(w, density, scope="leaf", block_size=4096, criterion="smallest") -> np.ndarray:
    """Boolean mask of the selected entries of one leaf."""
    flat = np.asarray(w).astype(np.float32).reshape(-1)
    out = np.zeros(flat.size, bool)
    for start, stop in ref_blocks(flat.size, scope, block_size):
        chunk = flat[start:stop]
        out[start + ref_order(chunk, criterion)[: ref_k(chunk.size, density)]] = True
    return out.reshape(np.shape(w))


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


def nonzero(u) -> np.ndarray:
    """Where an update is non-zero (any float dtype)."""
    return np.asarray(u).astype(np.float32) != 0
