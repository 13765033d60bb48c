"""The whole NanoAdam algorithm in plain numpy: the reference ``test_reference.py`` checks.

Written from the specification, independently of ``nanoadam_jax`` (no library code is
imported; ``jax.tree_util`` only flattens the parameter trees):

* **Labels.** A leaf whose key path has a component naming a head or a normalisation
  layer (a word ``head``, ``classifier``, ``norm``, ``ln``...: ``lm_head``, ``LayerNorm_0``,
  ``ln_f``) is *dense*: the inner rule runs on all of it with its own state. A non-float leaf is
  *frozen* (update exactly zero). Every other float leaf is *sparse*.
* **Slices.** A sparse leaf may declare the axes of ONE weight matrix (``axes``); every
  other axis is a stacked (batch/layer) axis and each slice (batch indices fixed) is
  selected on its own. Without a declaration the whole leaf is one slice.
* **Chunks** (``scope="chunk"``): a slice of ``n`` entries is cut, row-major, into chunks
  of ``C`` consecutive entries, ``C`` from :func:`chunk_length`. ``scope="leaf"``: one
  chunk per slice. ``scope="global"``: one selection over all sparse entries, leaf after
  leaf in flattening order.
* **Selection.** ``k = clip(floor(d * C + 0.5), 1, C)`` in float32 per chunk; the ``k``
  entries with the smallest ``|w|`` (float32; NaN above ``+inf``; ``-0.0 == +0.0``); ties
  go to the smaller flat index.
* **Refresh.** At step ``t`` (updates done before this one) the selection is recomputed
  from the current parameters when ``t % mask_interval == 0`` or the density at ``t``
  differs from the current selection's density. ``refresh_policy="keep"`` keeps the
  per-entry state of entries that stay selected, zeroes it for entries that enter, and
  never resets the inner count; ``"reset"`` re-initialises the sparse state and its count.
* **Update.** The inner rule (Adam, AdamW, SGD with momentum) runs on the selected entries
  of sparse leaves and on dense leaves; every other entry's update is exactly ``0.0``.

The inner arithmetic runs in float64 (the library's float32 agrees to about 1e-6).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

# The selection rule itself (rounding of k, chunk length, order) is the one written out in
# reference_selection.py, the selection tests' reference: one plain-numpy copy of it.
from reference_selection import ref_chunk_length as chunk_length
from reference_selection import ref_k as num_selected
from reference_selection import ref_order

SPARSE, DENSE, FROZEN = "sparse", "dense", "frozen"

#: Last words of a path component that make a leaf dense (an output head).
HEAD_WORDS = frozenset({"head", "classifier", "logits"})
#: Words of a path component that make a leaf dense (a normalisation layer).
NORM_WORDS = frozenset({"norm", "layernorm", "rmsnorm", "batchnorm", "ln"})
_WORD = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")


# ------------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------------


def path_components(path: tuple[Any, ...]) -> list[str]:
    """The components of a ``jax.tree_util`` key path as strings."""
    names = []
    for entry in path:
        if isinstance(entry, jax.tree_util.DictKey):
            names.append(str(entry.key))
        elif isinstance(entry, jax.tree_util.GetAttrKey):
            names.append(str(entry.name))
        elif isinstance(entry, jax.tree_util.SequenceKey):
            names.append(str(entry.idx))
        else:
            names.append(str(entry))
    return names


def component_words(name: str) -> list[str]:
    """Lower-case words of a path component: split on ``_``, ``-``, camelCase and digits
    (``LayerNorm_0`` -> ``layer norm 0``, ``lm_head`` -> ``lm head``, ``ln_f`` -> ``ln f``)."""
    return [w.lower() for w in _WORD.findall(name)]


def leaf_label(path: tuple[Any, ...], leaf: Any) -> str:
    """``"sparse"``, ``"dense"`` or ``"frozen"`` for one leaf (the default labelling).

    A component whose last word names a head, or with a word naming a norm, makes the
    leaf dense. This is the spec's rule on plain names (``w``, ``kernel``, ``head``,
    ``norm``, ``LayerNorm_0``); the library's full naming rule (real architectures'
    names) is tested in ``test_labels.py``.
    """
    if not np.issubdtype(np.asarray(leaf).dtype, np.floating) and not _is_low_float(leaf):
        return FROZEN
    for name in path_components(path):
        words = component_words(name)
        if (words and words[-1] in HEAD_WORDS) or NORM_WORDS.intersection(words):
            return DENSE
    return SPARSE


def _is_low_float(leaf: Any) -> bool:
    """bfloat16 is not a numpy floating subtype; treat it as float."""
    return "bfloat16" in str(np.asarray(leaf).dtype)


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def select_units(flat: np.ndarray, unit: int, density: float) -> np.ndarray:
    """Boolean mask over ``flat``, cut into consecutive units of ``unit`` entries."""
    out = np.zeros(flat.size, bool)
    if flat.size == 0:
        return out
    assert flat.size % unit == 0, (flat.size, unit)
    for start in range(0, flat.size, unit):
        part = flat[start : start + unit]
        out[start + ref_order(part)[: num_selected(unit, density)]] = True
    return out


def slice_axes(ndim: int, axes: tuple[int, ...] | None) -> tuple[int, ...]:
    """The selection axes of a leaf (all axes without a declaration), in axis order."""
    if axes is None:
        return tuple(range(ndim))
    return tuple(sorted(a % ndim for a in axes))


def select_leaf(
    w: np.ndarray,
    density: float,
    scope: str,
    chunk_size: int,
    axes: tuple[int, ...] | None = None,
) -> np.ndarray:
    """Boolean mask of one sparse leaf (scopes ``"chunk"`` and ``"leaf"``)."""
    w = np.asarray(w)
    sel = slice_axes(w.ndim, axes)
    batch = tuple(a for a in range(w.ndim) if a not in sel)
    # Batch axes first, selection axes after (each in their original order).
    moved = np.transpose(w, batch + sel) if w.ndim else w.reshape(())
    slice_shape = tuple(w.shape[a] for a in sel)
    n = int(np.prod(slice_shape, dtype=np.int64))
    n_slices = int(np.prod([w.shape[a] for a in batch], dtype=np.int64))
    unit = n if scope == "leaf" else chunk_length(slice_shape, chunk_size)
    rows = moved.reshape(n_slices, n)
    mask = np.stack([select_units(r, unit, density) for r in rows]) if n_slices else rows
    mask = mask.reshape(moved.shape)
    return np.transpose(mask, np.argsort(batch + sel)) if w.ndim else mask.reshape(())


def select_global(leaves: list[np.ndarray], density: float) -> list[np.ndarray]:
    """Masks of ``scope="global"``: one selection over all leaves, concatenated in order."""
    flats = [np.asarray(x).astype(np.float32).reshape(-1) for x in leaves]
    cat = np.concatenate(flats) if flats else np.zeros(0, np.float32)
    chosen = np.zeros(cat.size, bool)
    if cat.size:
        chosen[ref_order(cat)[: num_selected(cat.size, density)]] = True
    masks, start = [], 0
    for x, f in zip(leaves, flats):
        masks.append(chosen[start : start + f.size].reshape(np.shape(x)))
        start += f.size
    return masks


# ------------------------------------------------------------------------------------------------
# Element-wise inner rules (per-entry state as float64 arrays, one shared count)
# ------------------------------------------------------------------------------------------------


def _value(x: float | Callable[[int], Any], t: int) -> float:
    return float(np.asarray(x(t))) if callable(x) else float(x)


@dataclasses.dataclass
class Adam:
    """Adam (optionally AdamW): ``-lr * (m_hat / (sqrt(v_hat) + eps) + wd * w)``."""

    learning_rate: float | Callable[[int], Any] = 1e-3
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    bias_correction: bool | str = True  # True: per entry (see entry_age); "global"

    def init(self, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {"mu": np.zeros(shape), "nu": np.zeros(shape)}

    def apply(self, g, state, w, count: int, t: int):
        """Update of the entries ``g`` (``count`` already incremented, ``t`` the step)."""
        mu = self.b1 * state["mu"] + (1 - self.b1) * g
        nu = self.b2 * state["nu"] + (1 - self.b2) * g * g
        if self.bias_correction:
            m_hat = mu / (1 - self.b1**count)
            v_hat = nu / (1 - self.b2**count)
        else:
            m_hat, v_hat = mu, nu
        direction = m_hat / (np.sqrt(v_hat) + self.eps)
        if self.weight_decay:
            direction = direction + self.weight_decay * w
        return -_value(self.learning_rate, t) * direction, {"mu": mu, "nu": nu}


@dataclasses.dataclass
class SgdMomentum:
    """``optax.sgd(lr, momentum, nesterov)``: ``tr = g + m * tr``; ``-lr * tr`` (Nesterov:
    ``-lr * (g + m * tr)``)."""

    learning_rate: float | Callable[[int], Any] = 1e-2
    momentum: float = 0.9
    nesterov: bool = False

    def init(self, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
        return {"trace": np.zeros(shape)}

    def apply(self, g, state, w, count: int, t: int):
        del w, count
        trace = g + self.momentum * state["trace"]
        step = g + self.momentum * trace if self.nesterov else trace
        return -_value(self.learning_rate, t) * step, {"trace": trace}


# ------------------------------------------------------------------------------------------------
# The optimizer
# ------------------------------------------------------------------------------------------------


class NanoAdamReference:
    """Stateful numpy reference: ``init(params)``, then ``update(grads, params) -> updates``.

    Args:
      inner: an element-wise rule (:class:`Adam`, :class:`SgdMomentum`).
      density: a float or a schedule ``t -> density`` (evaluated in float32).
      mask_interval: refresh every this many steps.
      scope: ``"chunk"``, ``"leaf"`` or ``"global"``.
      chunk_size: the chunk target (``scope="chunk"``).
      refresh_policy: ``"keep"`` or ``"reset"``.
      axes: ``{keystr(path): axes}`` for leaves with declared selection axes.
      capacity: the largest density the buffers hold (larger densities are capped);
        None: no cap.
      entry_age: the inner rule's count for a sparse entry is its own age plus one (the
        updates it has had since it entered the selection, saturating at 65535), not the
        running count (``nanoadam``'s default per-entry bias correction). None: True for
        :class:`Adam` with ``bias_correction=True``, else False (``"global"``: the
        running count).
    """

    def __init__(
        self,
        inner: Any,
        density: float | Callable[[int], Any],
        mask_interval: int,
        *,
        scope: str = "chunk",
        chunk_size: int,
        refresh_policy: str = "keep",
        axes: dict[str, tuple[int, ...]] | None = None,
        capacity: float | None = None,
        entry_age: bool | None = None,
    ):
        assert scope in ("chunk", "leaf", "global")
        assert refresh_policy in ("keep", "reset")
        self.inner = inner
        self.density = density
        self.mask_interval = mask_interval
        self.scope = scope
        self.chunk_size = chunk_size
        self.refresh_policy = refresh_policy
        self.axes = dict(axes or {})
        self.capacity = capacity
        if entry_age is None:  # nanoadam's default: Adam corrected per entry
            entry_age = isinstance(inner, Adam) and inner.bias_correction is True
        self.entry_age = entry_age

    # -- state ------------------------------------------------------------------------------

    def init(self, params: Any) -> None:
        leaves_with_path, self.treedef = jax.tree_util.tree_flatten_with_path(params)
        self.paths = [jax.tree_util.keystr(p) for p, _ in leaves_with_path]
        self.labels = [leaf_label(p, x) for p, x in leaves_with_path]
        shapes = [np.shape(x) for _, x in leaves_with_path]
        self.state = [
            self.inner.init(s) if lab != FROZEN else None for s, lab in zip(shapes, self.labels)
        ]
        self.selected = [
            np.zeros(s, bool) if lab == SPARSE else None for s, lab in zip(shapes, self.labels)
        ]
        self.age = [
            np.zeros(s, np.int64) if lab == SPARSE else None for s, lab in zip(shapes, self.labels)
        ]
        self.t = 0
        self.current_density = np.float32(0.0)
        self.sparse_count = 0
        self.dense_count = 0
        self.refresh_steps: list[int] = []

    def density_at(self, t: int) -> np.float32:
        d = np.float32(_value(self.density, t))
        if self.capacity is not None:
            d = min(d, np.float32(self.capacity))
        return np.float32(d)

    def masks(self, leaves: list[np.ndarray], density: np.float32) -> list[np.ndarray | None]:
        """The selection for every leaf (None for dense and frozen leaves)."""
        sparse = [i for i, lab in enumerate(self.labels) if lab == SPARSE]
        out: list[np.ndarray | None] = [None] * len(leaves)
        if self.scope == "global":
            for i, m in zip(sparse, select_global([leaves[i] for i in sparse], density)):
                out[i] = m
            return out
        for i in sparse:
            axes = self.axes.get(self.paths[i])
            out[i] = select_leaf(leaves[i], density, self.scope, self.chunk_size, axes)
        return out

    # -- one step ---------------------------------------------------------------------------

    def update(self, grads: Any, params: Any) -> Any:
        g_leaves = self.treedef.flatten_up_to(grads)
        w_leaves = [np.asarray(x) for x in self.treedef.flatten_up_to(params)]
        t = self.t
        density = self.density_at(t)
        if t % self.mask_interval == 0 or density != self.current_density:
            self.refresh_steps.append(t)
            new = self.masks(w_leaves, density)
            for i, lab in enumerate(self.labels):
                if lab != SPARSE:
                    continue
                if self.refresh_policy == "reset":
                    self.state[i] = self.inner.init(np.shape(w_leaves[i]))
                    self.age[i] = np.zeros_like(self.age[i])
                else:
                    stay = self.selected[i] & new[i]
                    self.state[i] = {k: np.where(stay, v, 0.0) for k, v in self.state[i].items()}
                    self.age[i] = np.where(stay, self.age[i], 0)
                self.selected[i] = new[i]
            if self.refresh_policy == "reset":
                self.sparse_count = 0
            self.current_density = density
        self.sparse_count += 1
        self.dense_count += 1

        out = []
        for i, (g, w, lab) in enumerate(zip(g_leaves, w_leaves, self.labels)):
            g_dtype = np.asarray(g).dtype
            g64 = np.asarray(g).astype(np.float64)
            w64 = w.astype(np.float64) if lab != FROZEN else None
            if lab == FROZEN:
                out.append(np.zeros(np.shape(g), g_dtype))
            elif lab == DENSE:
                u, self.state[i] = self.inner.apply(g64, self.state[i], w64, self.dense_count, t)
                out.append(u)
            else:
                sel = self.selected[i]
                sub = {k: v[sel] for k, v in self.state[i].items()}
                count = self.age[i][sel] + 1 if self.entry_age else self.sparse_count
                u_sel, sub = self.inner.apply(g64[sel], sub, w64[sel], count, t)
                self.age[i][sel] = np.minimum(self.age[i][sel] + 1, 65535)
                u = np.zeros(np.shape(w), np.float64)
                u[sel] = u_sel
                for k, v in sub.items():
                    self.state[i][k][sel] = v
                out.append(u)
        self.t += 1
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def selection(self) -> Any:
        """The current selection as a tree (None for dense and frozen leaves)."""
        return jax.tree_util.tree_unflatten(self.treedef, self.selected)

    def moving_entries(self) -> int:
        """How many entries the next step may move (selected sparse + all dense entries)."""
        total = 0
        for sel, lab, st in zip(self.selected, self.labels, self.state):
            if lab == SPARSE:
                total += int(sel.sum())
            elif lab == DENSE:
                total += int(next(iter(st.values())).size)
        return total
