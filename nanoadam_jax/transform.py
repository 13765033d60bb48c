"""The NanoAdam transformations and their states.

Three optax ``GradientTransformation`` factories live here:

* :func:`sparse_update` wraps any element-wise optax transformation (``scale_by_adam``,
  ``scale_by_lion``...) so that it only ever sees, stores state for and updates the
  selected entries. It is the efficient form: one selection per refresh, and (with
  the default ``state_layout="compact"``) inner state of size ``k``, not ``n``.
* :func:`magnitude_mask` (alias :func:`mask`) zeroes the gradient outside the
  selection: *gradient masking only*. Chained before ``optax.adam`` it does **not**
  guarantee zero updates outside the mask, because Adam keeps momentum for entries
  that left the selection.
* :func:`masked_apply` zeroes the updates outside the selection: it closes a spelled
  out pipeline ``magnitude_mask -> scale_by_adam -> masked_apply -> lr``. Given the
  same selection arguments, both recompute the same mask at the same steps (the
  rule is deterministic and their step counters advance together, also inside
  ``optax.MultiSteps`` and ``optax.apply_if_finite``).

Refresh rule (all three): the mask is recomputed at step 0, every ``mask_interval``
steps, and at any step where the density (a float or a schedule ``step -> density``)
differs from the density of the current mask. The decision runs under
``jax.lax.cond``: steps without a refresh do no selection work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanoadam_jax import _checks, selection
from nanoadam_jax.labels import DENSE, FROZEN, SPARSE, Labels, label_params

__all__ = [
    "LAYOUTS",
    "REFRESH_POLICIES",
    "MagnitudeMaskState",
    "MaskedApplyState",
    "STEP_ARG",
    "SparseUpdateState",
    "magnitude_mask",
    "mask",
    "masked_apply",
    "sparse_update",
]

#: Accepted values of ``refresh_policy`` (what happens to the inner state at a refresh).
REFRESH_POLICIES = ("reset", "keep")
_INT32_MAX = 2**31 - 1
#: Block length of ``scope="block"`` when ``block_size`` is None.
DEFAULT_BLOCK_SIZE = 4096
#: Accepted values of ``state_layout``.
LAYOUTS = ("compact", "dense")
#: Name of the extra argument with which :func:`sparse_update` passes its step counter
#: (``sparse_step``, never reset by a refresh) to ``inner.update``; transformations that
#: do not know it ignore it (optax's convention for extra arguments).
STEP_ARG = "nanoadam_step"

Density = float | jax.Array | Callable[[jax.Array], jax.Array]


class SparseUpdateState(NamedTuple):
    """State of :func:`sparse_update`.

    Attributes:
      sparse_step: int32, number of updates done so far (drives ``mask_interval``).
      sparse_density: float32, the density the current selection was made with.
      selected: per sparse leaf, the current selection (``None`` elsewhere). With
        ``state_layout="compact"``: sorted int32 column indices of shape
        ``(rows, k_max)`` into the leaf's ``(rows, cols)`` view (one row per leaf,
        or one per block), padded with ``cols`` when fewer than ``k_max`` are live.
        With ``state_layout="dense"``: a bool mask with the leaf's shape.
      sparse_inner_state: the inner transformation's state for the sparse leaves,
        over vectors of the ``rows * k_max`` selected values (compact) or over the
        full leaves (dense).
      dense_inner_state: the inner transformation's state for the dense leaves.
    """

    sparse_step: jax.Array
    sparse_density: jax.Array
    selected: Any
    sparse_inner_state: optax.OptState
    dense_inner_state: optax.OptState


class MagnitudeMaskState(NamedTuple):
    """State of :func:`magnitude_mask`.

    Attributes:
      mask_step: int32 update counter.
      mask_density: float32 density of the current mask.
      mask: per sparse leaf a bool mask (``None`` for dense and frozen leaves).
    """

    mask_step: jax.Array
    mask_density: jax.Array
    mask: Any


class MaskedApplyState(NamedTuple):
    """State of :func:`masked_apply`.

    Attributes:
      apply_step: int32 update counter.
      apply_density: float32 density of the current mask.
      apply_mask: per sparse leaf a bool mask (``None`` for dense and frozen leaves).
    """

    apply_step: jax.Array
    apply_density: jax.Array
    apply_mask: Any


# --------------------------------------------------------------------------------------
# Configuration shared by the three factories.
# --------------------------------------------------------------------------------------


class _Selector:
    """Validated selection arguments and the refresh/selection logic built on them."""

    def __init__(
        self,
        density: Density,
        mask_interval: int,
        scope: str,
        block_size: int | None,
        criterion: str,
        labels: Labels,
        seed: int,
        method: str,
        max_density: float | None,
    ):
        _checks.check_positive_int("mask_interval", mask_interval)
        _checks.check_choice("scope", scope, selection.SCOPES)
        _checks.check_choice("criterion", criterion, selection.CRITERIA)
        _checks.check_choice("selection_method", method, selection.METHODS)
        self.block_size = _checks.check_static_positive_int(
            "block_size",
            DEFAULT_BLOCK_SIZE if block_size is None else block_size,
            "With optax.inject_hyperparams pass static_args=('block_size', 'max_density').",
        )
        if max_density is not None:
            if not _checks.is_concrete(max_density):
                raise ValueError(
                    "`max_density` must be a static number in (0, 1], got a traced value. "
                    "With optax.inject_hyperparams pass static_args=('max_density',)."
                )
            _checks.check_density("max_density", max_density)
            max_density = float(np.asarray(max_density))
        if isinstance(seed, bool) or (
            _checks.is_concrete(seed) and not np.issubdtype(np.asarray(seed).dtype, np.integer)
        ):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")

        static = isinstance(density, (int, float)) and not isinstance(density, bool)
        self.static_density = float(density) if static else None
        if method == "top_k" and not static:
            raise ValueError(
                "`selection_method`='top_k' needs a fixed Python-number `density` (its k must "
                "be static); use 'bisection' or 'sort' with a schedule or a traced density"
            )
        if callable(density):
            self.density_fn = lambda step: jnp.asarray(density(step), jnp.float32)
            static_max = getattr(density, "max_density", None)
            _check_schedule(density)
        else:
            _checks.check_density("density", density)
            if isinstance(density, (int, float)):
                static_max = float(density)
            else:
                # An array (e.g. from optax.inject_hyperparams): its value may change,
                # so the buffers cannot be sized from it.
                static_max = None
            self.density_fn = lambda step: jnp.asarray(density, jnp.float32)
        if max_density is not None:
            if static_max is not None and static_max > max_density:
                raise ValueError(
                    f"`max_density`={max_density} is below the density's largest value {static_max}"
                )
            static_max = max_density
        # None means: size compact buffers for density 1.0 (documented).
        self.max_density = static_max
        self.mask_interval = mask_interval
        self.scope = scope
        self.criterion = criterion
        self.labels = labels
        self.seed = seed
        self.method = method
        # The bounded-memory refresh path of sparse_update (same selection rule).
        self.lean = scope == "leaf" and criterion == "smallest" and method == "bisection"

    # -- refresh decision ---------------------------------------------------------------

    def refresh_decision(self, step: jax.Array, current: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(refresh?, density now)`` for the step about to be taken."""
        density = self.density_fn(step)
        if self.max_density is not None:
            # Compact buffers hold num_selected(n, max_density) entries: never select more.
            density = jnp.minimum(density, jnp.float32(self.max_density))
        refresh = (step % self.mask_interval == 0) | (density != current)
        return refresh, density

    def key(self, step: jax.Array) -> jax.Array | None:
        if self.criterion != "random":
            return None
        return jax.random.fold_in(jax.random.PRNGKey(self.seed), step)

    # -- selection ----------------------------------------------------------------------

    def masks(self, leaves: list[jax.Array], density: jax.Array, step: jax.Array) -> list:
        """Bool masks for the sparse leaves (in order)."""
        key = self.key(step)
        if self.static_density is not None:
            density = self.static_density
        if self.scope == "global":
            return selection.select_global_masks(leaves, density, criterion=self.criterion, key=key)
        return [
            selection.select_mask(
                x,
                density,
                scope=self.scope,
                block_size=self.block_size,
                criterion=self.criterion,
                key=None if key is None else jax.random.fold_in(key, i),
                method=self.method,
            )
            for i, x in enumerate(leaves)
        ]

    def layout(self, n: int) -> tuple[int, int, int]:
        """``(rows, cols, k_max per row)`` of a sparse leaf's compact buffer."""
        rows, cols = selection.block_layout(n, self.scope, self.block_size)
        if n == 0:
            return rows, cols, 0
        d = 1.0 if self.max_density is None else self.max_density
        kmax = selection.num_selected_static(min(n, cols), d)
        return rows, cols, kmax


def _check_schedule(schedule: Callable[[Any], Any]) -> None:
    """Evaluate a density schedule eagerly at a few steps and check its range."""
    for step in (0, 1, 10, 100, 1_000, 10_000, 100_000, 1_000_000):
        try:
            value = schedule(jnp.asarray(step, jnp.int32))
            arr = np.asarray(value)
        except Exception:
            return
        if arr.shape != () or not 0.0 < float(arr) <= 1.0:
            raise ValueError(
                f"the `density` schedule must return a scalar in (0, 1]; at step {step} it "
                f"returned {value!r}"
            )
        static_max = getattr(schedule, "max_density", None)
        if static_max is not None and float(arr) > np.float32(static_max):
            raise ValueError(
                f"the `density` schedule returned {float(arr)} at step {step}, above its "
                f"`max_density` attribute {static_max} (which sizes the compact buffers)"
            )


def _split(tree: Any, labels: Any, label: str) -> list[tuple[int, Any]]:
    """``[(position, leaf)]`` of the leaves with a given label (flat order)."""
    leaves = jax.tree.leaves(tree)
    flat_labels = jax.tree.leaves(labels)
    return [(i, x) for i, (x, lab) in enumerate(zip(leaves, flat_labels)) if lab == label]


def _subtree(treedef: Any, n_leaves: int, items: list[tuple[int, Any]]) -> Any:
    """A tree with the given leaves at their positions and ``None`` elsewhere."""
    leaves: list[Any] = [None] * n_leaves
    for i, x in items:
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _is_box(x: Any) -> bool:
    """A metadata box around one array (``flax.nnx.Variable``, ``flax.linen.Partitioned``)."""
    return (hasattr(x, "get_metadata") and hasattr(x, "get_value")) or hasattr(x, "unbox")


def _plain_treedef(params: Any) -> Any:
    """``params``' structure with metadata boxes as leaves: for state that is not
    param-shaped (compact buffers), so it does not inherit e.g. a box's sharding names."""
    boxed = jax.tree.structure(params, is_leaf=_is_box)
    if boxed.num_leaves != jax.tree.structure(params).num_leaves:
        return jax.tree.structure(params)  # a box with several arrays: keep it
    return boxed


def _leaf_sharding(p: Any) -> Any:
    """A parameter's NamedSharding when it is known here, else None.

    Known for concrete arrays, for ``jax.ShapeDtypeStruct(..., sharding=...)`` and, while
    tracing, under explicit sharding (``jax.typeof(p).sharding``).
    """
    sharding = getattr(p, "sharding", None) if not isinstance(p, jax.core.Tracer) else None
    if sharding is None and isinstance(p, jax.core.Tracer):
        sharding = selection._out_sharding(p)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _zero_update(u: Any) -> Any:
    if u is None or getattr(u, "dtype", None) == jax.dtypes.float0:
        return u
    return jnp.zeros_like(u)


def _require_params(params: Any, name: str) -> None:
    if params is None:
        raise ValueError(
            f"{name} selects entries by the magnitude of the parameters: call "
            "`update(updates, state, params)` with the current parameters"
        )


# --------------------------------------------------------------------------------------
# magnitude_mask / masked_apply: full-size bool masks.
# --------------------------------------------------------------------------------------


def _mask_init(selector: _Selector, params: Any) -> tuple[jax.Array, jax.Array, Any]:
    labels = label_params(params, selector.labels)
    masks = jax.tree.map(
        lambda p, lab: jnp.zeros_like(p, dtype=bool) if lab == SPARSE else None, params, labels
    )
    return jnp.zeros([], jnp.int32), jnp.zeros([], jnp.float32), masks


def _mask_update(
    selector: _Selector,
    updates: Any,
    step: jax.Array,
    density_now: jax.Array,
    masks: Any,
    params: Any,
) -> tuple[Any, jax.Array, Any]:
    """Refresh the masks if due, and apply them (and the labels) to ``updates``."""
    labels = label_params(params, selector.labels)
    leaves, treedef = jax.tree.flatten(params)
    sparse = _split(params, labels, SPARSE)
    refresh, density = selector.refresh_decision(step, density_now)

    def do_refresh(_):
        new = selector.masks([x for _, x in sparse], density, step)
        return _subtree(treedef, len(leaves), list(zip([i for i, _ in sparse], new)))

    masks = jax.lax.cond(refresh, do_refresh, lambda m: m, masks)
    flat_masks = treedef.flatten_up_to(masks)
    flat_labels = treedef.flatten_up_to(labels)
    flat_updates = treedef.flatten_up_to(updates)
    out = []
    for u, m, lab in zip(flat_updates, flat_masks, flat_labels):
        if lab == SPARSE:
            out.append(jnp.where(m, u, jnp.zeros_like(u)))
        elif lab == DENSE:
            out.append(u)
        else:
            out.append(_zero_update(u))
    return jax.tree_util.tree_unflatten(treedef, out), density, masks


def magnitude_mask(
    density: Density = 0.1,
    mask_interval: int = 100,
    *,
    scope: str = "leaf",
    block_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    seed: int = 0,
    selection_method: str = "bisection",
) -> optax.GradientTransformationExtraArgs:
    """Keep the gradient only at the selected (by default: smallest-magnitude) entries.

    This is *gradient masking only*: in ``optax.chain(nanoadam.mask(...), optax.adam(lr))``
    Adam still moves entries that left the selection, with their stale momentum. Close
    the pipeline with :func:`masked_apply` (same arguments) to get exact zeros outside
    the mask, or use :func:`sparse_update` / :func:`~nanoadam_jax.nanoadam`, which also
    store moments only for the selected entries.

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
      density: fraction of each sparse leaf to select, in ``(0, 1]``, or a schedule
        ``step -> density`` (see :mod:`nanoadam_jax.schedules`). May be traced.
      mask_interval: refresh the mask every this many steps (positive int).
      scope: ``"leaf"`` (the paper), ``"block"`` (exactly ``k`` per ``block_size``
        flattened entries) or ``"global"`` (one threshold over all sparse leaves).
      block_size: block length for ``scope="block"`` (None: 4096).
      criterion: ``"smallest"`` ``|w|`` (the paper), ``"largest"`` or ``"random"``
        (seeded by ``seed``, new at each refresh) for ablations.
      labels: which leaves are sparse, dense or frozen; see :mod:`nanoadam_jax.labels`.
      seed: seed of ``criterion="random"``.
      selection_method: ``"bisection"`` (default), ``"sort"`` or ``"top_k"``; all exact.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    selector = _Selector(
        density, mask_interval, scope, block_size, criterion, labels, seed, selection_method, None
    )

    def init_fn(params):
        return MagnitudeMaskState(*_mask_init(selector, params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _require_params(params, "magnitude_mask")
        out, density, masks = _mask_update(
            selector, updates, state.mask_step, state.mask_density, state.mask, params
        )
        step = optax.safe_int32_increment(state.mask_step)
        return out, MagnitudeMaskState(step, density, masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


#: Alias of :func:`magnitude_mask`, as users write it in ``optax.chain``.
mask = magnitude_mask


def masked_apply(
    density: Density = 0.1,
    mask_interval: int = 100,
    *,
    scope: str = "leaf",
    block_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    seed: int = 0,
    selection_method: str = "bisection",
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
    selector = _Selector(
        density, mask_interval, scope, block_size, criterion, labels, seed, selection_method, None
    )

    def init_fn(params):
        return MaskedApplyState(*_mask_init(selector, params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        _require_params(params, "masked_apply")
        out, density, masks = _mask_update(
            selector, updates, state.apply_step, state.apply_density, state.apply_mask, params
        )
        step = optax.safe_int32_increment(state.apply_step)
        return out, MaskedApplyState(step, density, masks)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --------------------------------------------------------------------------------------
# sparse_update: the inner transformation sees only the selected entries.
# --------------------------------------------------------------------------------------


def _late_zeros(shape: tuple[int, ...], values: jax.Array) -> jax.Array:
    """Zeros that XLA cannot materialise before ``values`` exist.

    ``jnp.zeros`` buffers of all leaves are otherwise CSE'd into one broadcast whose
    per-leaf copies (the scatter operands) are scheduled at the start of the step and stay
    live through the whole forward/backward pass (+1x the sparse parameters in temp
    memory). The scalar is always +0.0, but derived from the values; XLA does not fold
    ``x * 0`` for floats. (``optimization_barrier`` does not help: XLA:CPU expands it.)
    """
    if values.size == 0:
        return jnp.zeros(shape, values.dtype)
    v0 = values.reshape(-1)[0]
    zero = jnp.abs(jnp.where(jnp.isfinite(v0), v0, jnp.zeros((), v0.dtype)) * 0)
    return jnp.broadcast_to(zero, shape)


def _gather_flat(flat: jax.Array, idx: jax.Array, in_bounds: bool) -> jax.Array:
    """``flat[idx]`` for sorted, non-negative ``idx``; out-of-range slots give ``0``.

    ``jax.lax.gather`` directly: ``jnp.take`` would first wrap negative indices (a
    k-sized select pass per leaf and step, and an index buffer that XLA schedules early).
    ``in_bounds`` (every slot a real position) clamps instead of masking. Indices are
    int32 for the gather (XLA's SPMD partitioner refuses uint16 gather indices).
    """
    dnums = jax.lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=(0,), start_index_map=(0,)
    )
    mode = jax.lax.GatherScatterMode.CLIP if in_bounds else jax.lax.GatherScatterMode.FILL_OR_DROP
    return jax.lax.gather(
        flat,
        idx.astype(jnp.int32)[:, None],
        dnums,
        slice_sizes=(1,),
        indices_are_sorted=True,
        mode=mode,
        fill_value=0,
    )


class _CompactLeaf:
    """Gather/scatter between a leaf and its ``(rows, k_max)`` compact buffer.

    If the leaf is sharded along its first axis only and every shard holds whole
    blocks (``scope="block"`` with ``block_size`` dividing the per-shard size), the
    buffers are sharded along rows in the same way, and gather, inner update, scatter
    and the per-row selection are local to each device (no collective).
    """

    def __init__(
        self, p: Any, selector: _Selector, unique: bool, narrow: bool, inplace: bool = False
    ):
        self.shape = tuple(p.shape)
        self.inplace = inplace
        self.n = int(np.prod(self.shape)) if self.shape else 1
        self.rows, self.cols, self.kmax = selector.layout(self.n)
        self.unique = unique
        # Column indices run up to ``cols`` (the padding sentinel).
        self.index_dtype = jnp.uint16 if narrow and self.cols <= 0xFFFF else jnp.int32
        self.row_spec = None  # mesh axes of the rows, when the buffers are row-sharded
        self.mesh = None
        sharding = _leaf_sharding(p)
        explicit = sharding is not None and any(
            t == jax.sharding.AxisType.Explicit for t in getattr(sharding.mesh, "axis_types", ())
        )
        # Under explicit sharding the bookkeeping runs in ``auto_axes`` with these outputs.
        self.explicit = sharding if explicit else None
        if sharding is None or self.rows == 1 or not self.shape:
            return
        spec = tuple(sharding.spec) + (None,) * (len(self.shape) - len(sharding.spec))
        names = spec[0] if isinstance(spec[0], tuple) else (spec[0],)
        names = tuple(a for a in names if a is not None)
        shards = int(np.prod([sharding.mesh.shape[a] for a in names])) if names else 1
        aligned = self.n % self.cols == 0 and self.rows % shards == 0
        if names and aligned and all(a is None for a in spec[1:]):
            self.row_spec, self.mesh = spec[0], sharding.mesh

    def _full(self, shape: tuple[int, ...], value: Any, dtype: Any) -> jax.Array:
        if self.row_spec is None:
            return jnp.full(shape, value, dtype)
        spec = jax.sharding.PartitionSpec(self.row_spec, *([None] * (len(shape) - 1)))
        return jnp.full(shape, value, dtype, device=jax.sharding.NamedSharding(self.mesh, spec))

    def _auto(self, fn: Any, out_dims: int, *args: Any) -> Any:
        """``fn(*args)``; under explicit sharding inside ``auto_axes`` (XLA partitions it),
        returning a buffer sharded along rows (``out_dims`` axes) or like the leaf (0)."""
        if self.explicit is None:
            return fn(*args)
        if out_dims == 0:
            spec = self.explicit.spec
        else:
            spec = jax.sharding.PartitionSpec(self.row_spec, *([None] * (out_dims - 1)))
        out = jax.sharding.NamedSharding(self.explicit.mesh, spec)
        return jax.sharding.auto_axes(fn, out_sharding=out)(*args)

    def zeros(self, dtype: Any) -> jax.Array:
        """Zero inner-state vector, sharded like the rows."""
        return self._full((self.size,), 0, dtype)

    def _rows(self, x: jax.Array, fill: Any) -> jax.Array:
        flat = x.reshape(-1)
        if self.n == self.rows * self.cols:
            return flat.reshape(self.rows, self.cols)  # no padding: a free view when aligned
        return selection._as_rows(flat, self.cols, fill)

    def check(self, path: str) -> None:
        if self.cols > _INT32_MAX:
            raise ValueError(
                f"the leaf at {path} has {self.n} entries, more than int32 indices can address "
                "with scope='leaf'; use scope='block' (block-local indices) for leaves above "
                "2**31 - 1 entries"
            )

    @property
    def size(self) -> int:
        return self.rows * self.kmax

    def empty_indices(self) -> jax.Array:
        return self._full((self.rows, self.kmax), self.cols, self.index_dtype)

    def indices_from_mask(self, mask: jax.Array) -> jax.Array:
        def row(m):
            return jnp.nonzero(m, size=self.kmax, fill_value=self.cols)[0]

        def fn(mask):
            if self.rows == 1:
                return row(mask.reshape(-1)).astype(self.index_dtype)[None]
            return jax.vmap(row)(self._rows(mask, jnp.bool_(False))).astype(self.index_dtype)

        return self._auto(fn, 2, mask)

    def gather(self, x: jax.Array, idx: jax.Array) -> jax.Array:
        def fn(x, idx):
            if self.rows == 1:
                # A fixed density: every slot holds a real position after the first
                # refresh (step 0), so the gather clamps instead of masking each entry.
                return _gather_flat(x.reshape(-1), idx[0], self.unique and self.n > 0)
            # Per row (block); short blocks have padding slots, so this one masks them.
            x2 = self._rows(x, jnp.zeros((), x.dtype))
            return jax.vmap(lambda r, i: _gather_flat(r, i, False))(x2, idx).reshape(-1)

        return self._auto(fn, 1, x, idx)

    def scatter(self, values: jax.Array, idx: jax.Array, dtype: Any) -> jax.Array:
        def fn(values, idx):
            values = values.astype(dtype)
            if self.rows == 1:
                if not self.inplace:
                    # A separate update buffer (zeros that XLA cannot hoist, see
                    # ``_late_zeros``); ``apply_updates`` then adds it element-wise.
                    out = (
                        _late_zeros((self.n,), values)
                        .at[idx[0]]
                        .set(
                            values, mode="drop", indices_are_sorted=True, unique_indices=self.unique
                        )
                    )
                    return out.reshape(self.shape)
                flat = idx[0].astype(jnp.int32)  # unravelled below: signed arithmetic
                # An add into constant zeros of the leaf's own shape, with N-d indices (no
                # reshape after it): XLA rewrites ``params + scatter_add(0, i, u)`` into an
                # in-place ``scatter_add(params, i, u)`` when the update is applied in the
                # same program, so no full-size update buffer is written or read.
                # Padding slots hold the out-of-range sentinel ``n``: unravelled, their
                # first coordinate is out of range and ``mode="drop"`` skips them.
                if len(self.shape) < 2 or self.n == 0:  # scalars, vectors, empty leaves
                    nd, out_shape = (flat,), (self.n,)
                else:
                    nd, out_shape = jnp.unravel_index(flat, self.shape), self.shape
                out = (
                    jnp.zeros(out_shape, dtype)
                    .at[nd]
                    .add(values, mode="drop", indices_are_sorted=True, unique_indices=self.unique)
                )
                return out.reshape(self.shape)

            def row(v, i):  # a batched (per-row) scatter: partitions along rows
                return (
                    _late_zeros((self.cols,), v)
                    .at[i]
                    .set(v, mode="drop", indices_are_sorted=True, unique_indices=self.unique)
                )

            out = jax.vmap(row)(values.reshape(self.rows, self.kmax), idx).reshape(-1)
            return (out if out.shape[0] == self.n else out[: self.n]).reshape(self.shape)

        return self._auto(fn, 0, values, idx)

    def carry_over(self, values: jax.Array, old: jax.Array, new: jax.Array) -> jax.Array:
        """Moments of entries selected before and after a refresh, zeros for new ones.

        Both index sets are sorted, so each new index is located in the old ones by a
        sorted search (``searchsorted``), k log k work at a refresh only.
        """

        def row(v, o, w):
            pos = jnp.minimum(jnp.searchsorted(o, w), self.kmax - 1)
            found = (o[pos] == w) & (w < self.cols)
            return jnp.where(found, v[pos], jnp.zeros((), v.dtype))

        def fn(values, old, new):
            v2 = values.reshape(self.rows, self.kmax)
            return jax.vmap(row)(v2, old, new).reshape(values.shape)

        return self._auto(fn, 1, values, old, new)


def sparse_update(
    inner: optax.GradientTransformation,
    density: Density = 0.1,
    mask_interval: int = 100,
    *,
    scope: str = "leaf",
    block_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    refresh_policy: str = "reset",
    state_layout: str = "compact",
    max_density: float | None = None,
    moment_dtype: Any | None = None,
    narrow_indices: bool = True,
    seed: int = 0,
    selection_method: str = "bisection",
    inplace_apply: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Make an element-wise optax transformation update only the selected entries.

    For every sparse leaf the selected entries' gradients (and parameters) are
    gathered into a vector, ``inner`` runs on those vectors, and its updates are
    scattered back into a full-size update that is exactly ``0.0`` everywhere else,
    on every step (also right after a refresh, and for any weight decay inside
    ``inner``). Dense leaves go through their own copy of ``inner`` unmasked; frozen
    leaves get zero updates.

    ``inner`` must be element-wise (each output entry depends only on the same entry
    of its inputs, like ``scale_by_adam``, ``scale_by_lion``, ``add_decayed_weights``);
    put tree-wide operations such as ``clip_by_global_norm`` *before* this
    transformation in an ``optax.chain``.

    **Moments at a refresh** (``refresh_policy``; the paper does not say):

    * ``"reset"`` (default): the inner state of the sparse leaves is re-initialised
      at every refresh, including Adam's step count, so every selected entry starts
      like a fresh Adam and its first step is ``lr * sign(g)`` (no outsized step).
    * ``"keep"``: entries that stay selected keep their moments, entries that enter
      start from zero, and the inner step count keeps running. With Adam's global
      bias correction an entering entry's first step at global step ``t`` is
      ``(1 - b1) / (1 - b1**t) / sqrt((1 - b2) / (1 - b2**t))`` times the learning
      rate: below 1 early on, 2.5x at ``t = 1000``, up to 3.2x with the default
      betas. It converges more precisely late in training, because a refresh does
      not restart Adam (see the README's evidence).

    **State layouts** (``state_layout``):

    * ``"compact"`` (default): the inner state holds ``k_max`` values per sparse leaf
      (per block with ``scope="block"``) plus the sorted selected positions, where
      ``k_max`` is the count at the largest density reachable: the density itself
      when it is a Python number, the schedule's ``max_density`` attribute (set by
      :func:`~nanoadam_jax.linear_density_decay`), or ``max_density``. When none is
      known (a traced or injected density without ``max_density``) the buffers are
      sized for density 1.0: correct, but without the memory saving.
    * ``"dense"``: full-size inner state and bool masks (for research that needs
      full-size moments; also the only layout for ``scope="global"``).

    Both layouts produce the same updates (equal up to float rounding: XLA may
    vectorise the same element-wise arithmetic differently for different lengths).

    **Defaults, and the measurement behind each** (``python benchmarks/evidence.py`` on
    the MNIST CNN / rotated MNIST and ``--task text`` on MiniLM / Rotten Tomatoes, 3 seeds,
    each setting at its best learning rate; full tables in ``benchmarks/results/evidence*/
    summary.md`` and the README's "Results" section):

    * ``refresh_policy="reset"``: E3 found no consistent difference between ``"reset"``
      and ``"keep"`` (vision: all within 2 standard errors at ``mask_interval`` 5, 20,
      100; text: the sign flips with the interval); ``"reset"`` keeps every entry's first
      step at ``lr * sign(g)`` (no bias-correction overshoot for entries that enter late,
      see above), so it is the default.
    * Bias correction on (``nanoadam(bias_correction=True)``): E3 measured no clear
      difference at either task's default settings (-0.6 / +0.3 points); turning it off
      acts like a larger early learning rate (the best rate drops 3x on vision).
    * ``mask_interval=100``: E3 vision, the best of 5 / 20 / 100 (94.0 / 94.7 / 95.8%).
    * ``density=0.1`` (in :func:`~nanoadam_jax.nanoadam`): E1/E4, 3.7 points above
      ``0.01`` on vision at each one's best rate, at 0.15x AdamW's optimizer state.
    * Rounding ``k = clip(round_half_up(d * n), 1, n)`` (:func:`num_selected`): E5's
      rounding tables; every sparse leaf keeps at least one trainable entry.
    * ``inplace_apply=True`` in :func:`~nanoadam_jax.nanoadam` / ``nanoadamw``: the
      benchmarks (``python benchmarks/run.py``) measure the same compiled peak memory of a
      whole transformer train step as ``False`` and a faster bare update (README
      "Benchmarks"); here in ``sparse_update`` it stays ``False`` (see the argument).
    * ``scope="leaf"`` and ``criterion="smallest"`` follow the paper (E2 measured
      ``"largest"`` ahead on the CNN and no significant order on text; the criterion
      is kept as the paper's method).

    **Traced densities** (``jax.vmap``, ``optax.inject_hyperparams``) cannot be
    checked at construction: the count follows :func:`~nanoadam_jax.num_selected`
    (``<= 0`` trains one entry per leaf, ``>= 1`` all, NaN none), and with
    ``max_density`` set a larger density is capped at ``max_density``, because the
    compact buffers cannot hold more (both layouts cap the same way). Schedules are
    probed eagerly at steps 0, 1, 10, ..., 10**6 at construction.

    **Under** ``jax.vmap`` **with a per-run density** the refresh predicate is batched, and
    JAX turns a ``lax.cond`` with a batched predicate into a ``select`` of both branches:
    the selection then runs at every step (same results, slower steps; 1.5x per run-step
    in ``benchmarks/evidence.py``'s vmapped grids). Vmap over something else (seeds,
    learning rates) with a shared Python-float density keeps the ``cond``.

    Example:
      >>> import jax.numpy as jnp, optax, nanoadam_jax as nanoadam
      >>> tx = nanoadam.sparse_update(optax.scale_by_lion(), density=0.5, mask_interval=10)
      >>> params = {"w": jnp.array([0.1, -2.0, 0.3, 4.0])}
      >>> updates, _ = tx.update({"w": jnp.ones(4)}, tx.init(params), params)
      >>> updates["w"].tolist()
      [1.0, 0.0, 1.0, 0.0]

    Args:
      inner: an element-wise ``optax.GradientTransformation``.
      density: fraction of each sparse leaf (or block, or of all sparse leaves for
        ``scope="global"``) to update, in ``(0, 1]``; or a schedule
        ``step -> density``. May be traced (``jax.vmap`` over densities).
      mask_interval: recompute the selection every this many steps.
      scope: ``"leaf"``, ``"block"`` or ``"global"`` (see :func:`magnitude_mask`).
      block_size: block length for ``scope="block"`` (None: 4096).
      criterion: ``"smallest"``, ``"largest"`` or ``"random"``.
      labels: which leaves are sparse, dense or frozen; see :mod:`nanoadam_jax.labels`.
      refresh_policy: ``"reset"`` or ``"keep"``, see above.
      state_layout: ``"compact"`` or ``"dense"``, see above.
      max_density: the largest density the run will use, to size compact buffers
        when ``density`` is traced or injected (must be a static number).
      moment_dtype: if set (e.g. ``jnp.bfloat16``, the paper's memory model), the
        inner state's floating-point arrays are stored in this dtype between steps;
        the inner transformation still computes in (at least) float32.
      narrow_indices: store compact positions as ``uint16`` when they fit (leaves or
        blocks of at most 65535 entries; e.g. ``scope="block"``, ``block_size=4096``),
        else ``int32``. Leaves of ``2**31`` entries or more need ``scope="block"``.
      seed: seed of ``criterion="random"``.
      selection_method: ``"bisection"`` (default), ``"sort"`` or ``"top_k"``.
      inplace_apply: how a compact sparse leaf's update is built (``scope="leaf"``;
        the updates are the same either way). ``False`` (the default here): scattered
        into a separate zero buffer, which ``optax.apply_updates`` adds element-wise.
        ``True`` (the default of :func:`~nanoadam_jax.nanoadam` and
        :func:`~nanoadam_jax.nanoadamw`): a scatter-*add* into constant zeros, which XLA
        rewrites, together with ``apply_updates`` in the same jitted program, into an
        in-place scatter-add into the parameters (no full-size update buffer). This
        only pays off when nothing is chained after this transformation (the learning
        rate applied inside ``inner``, as ``nanoadam`` does); with a transformation
        chained after it, both forms cost about the same. Measured on a 2-core CPU
        (``python benchmarks/run.py``, README "Benchmarks"): a bare ``nanoadam`` update
        on 25M parameters runs about 2x faster with ``True``, and a whole transformer
        train step has the same compiled peak memory either way.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    if not isinstance(inplace_apply, bool):
        raise ValueError(f"`inplace_apply` must be True or False, got {inplace_apply!r}")
    selector = _Selector(
        density,
        mask_interval,
        scope,
        block_size,
        criterion,
        labels,
        seed,
        selection_method,
        max_density,
    )
    _checks.check_choice("refresh_policy", refresh_policy, REFRESH_POLICIES)
    _checks.check_choice("state_layout", state_layout, LAYOUTS)
    if state_layout == "compact" and scope == "global":
        raise ValueError(
            "scope='global' needs state_layout='dense' (a global threshold gives each "
            "leaf a different, unbounded share of k)"
        )
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"`inner` must be an optax.GradientTransformation, got {inner!r}")
    inner = optax.with_extra_args_support(inner)
    compact = state_layout == "compact"
    if moment_dtype is not None:
        moment_dtype = jnp.dtype(moment_dtype)
        if not jnp.issubdtype(moment_dtype, jnp.floating):
            raise ValueError(f"`moment_dtype` must be a floating dtype, got {moment_dtype}")

    def store(inner_state):
        """Cast the inner state's float arrays to ``moment_dtype`` for storage."""
        if moment_dtype is None:
            return inner_state
        return jax.tree.map(
            lambda x: (
                x.astype(moment_dtype)
                if jnp.ndim(x) and jnp.issubdtype(x.dtype, jnp.floating)
                else x
            ),
            inner_state,
        )

    def load(inner_state):
        """Upcast stored low-precision moments to float32 for the inner update."""
        if moment_dtype is None:
            return inner_state
        return jax.tree.map(
            lambda x: (
                x.astype(jnp.promote_types(x.dtype, jnp.float32))
                if jnp.ndim(x) and jnp.issubdtype(x.dtype, jnp.floating)
                else x
            ),
            inner_state,
        )

    # Without padding slots (fixed density) the scatter indices are unique.
    unique = isinstance(density, (int, float)) and max_density is None

    def leaf_plans(params):
        return [
            _CompactLeaf(p, selector, unique, narrow_indices, inplace_apply)
            for p in jax.tree.leaves(params)
        ]

    def init_fn(params):
        labels_tree = label_params(params, selector.labels)
        leaves, treedef = jax.tree.flatten(params)
        plans = leaf_plans(params)
        sparse = _split(params, labels_tree, SPARSE)
        dense = _split(params, labels_tree, DENSE)
        if compact:
            paths = [
                jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)
            ]
            for i, _ in sparse:
                plans[i].check(paths[i])
            sel = [(i, plans[i].empty_indices()) for i, _ in sparse]
            vecs = [(i, plans[i].zeros(p.dtype)) for i, p in sparse]
            state_def = _plain_treedef(params)
        else:
            sel = [(i, jnp.zeros_like(p, dtype=bool)) for i, p in sparse]
            vecs = [(i, jnp.zeros_like(p)) for i, p in sparse]
            state_def = treedef
        n = len(leaves)
        return SparseUpdateState(
            sparse_step=jnp.zeros([], jnp.int32),
            sparse_density=jnp.zeros([], jnp.float32),
            selected=_subtree(state_def, n, sel),
            sparse_inner_state=store(inner.init(_subtree(state_def, n, vecs))),
            dense_inner_state=store(inner.init(_subtree(treedef, n, dense))),
        )

    def update_fn(updates, state, params=None, **extra_args):
        _require_params(params, "sparse_update")
        labels_tree = label_params(params, selector.labels)
        leaves, treedef = jax.tree.flatten(params)
        # Compact state lives in a box-free tree (see init_fn); dense state mirrors params.
        sdef = _plain_treedef(params) if compact else treedef
        n = len(leaves)
        plans = leaf_plans(params)
        sparse = _split(params, labels_tree, SPARSE)
        sparse_pos = [i for i, _ in sparse]
        flat_updates = treedef.flatten_up_to(updates)
        flat_sel = sdef.flatten_up_to(state.selected)
        step = state.sparse_step
        refresh, density = selector.refresh_decision(step, state.sparse_density)
        # The step counter (never reset) is offered to ``inner`` as an extra argument,
        # so a stateless learning-rate schedule inside ``inner`` survives a "reset".
        step_arg = {STEP_ARG: step}

        def vec_tree(items):
            return _subtree(sdef, n, items)

        def do_refresh(operand):
            old_sel, inner_state = operand
            if compact and selector.lean:
                # One leaf after the other (each leaf waits for the previous leaf's
                # indices), each with bounded scratch: the refresh needs the scratch of
                # one chunk, not n-sized keys, masks and cumsums of every leaf at once.
                new, prev = [], None
                for i, x in sparse:
                    if prev is not None:
                        x, _ = jax.lax.optimization_barrier((x, prev))
                    k = selection.num_selected(plans[i].n, density)

                    def lean(x, k, plan=plans[i]):
                        idx = selection.leaf_bottom_k_indices(x, k, plan.kmax, plan.cols)
                        return idx.astype(plan.index_dtype)[None]

                    # Under explicit sharding the flattening runs in auto_axes (as gather).
                    prev = plans[i]._auto(lean, 2, x, k)
                    new.append(prev)
            else:
                masks = selector.masks([x for _, x in sparse], density, step)
                if compact:
                    new = [plans[i].indices_from_mask(m) for i, m in zip(sparse_pos, masks)]
                else:
                    new = masks
            new_sel = vec_tree(list(zip(sparse_pos, new)))
            if refresh_policy == "reset":
                zeros = [
                    (i, plans[i].zeros(x.dtype) if compact else jnp.zeros_like(x))
                    for i, x in sparse
                ]
                fresh = inner.init(vec_tree(zeros))
                # Keep the running state's dtypes (optax may have promoted them, e.g. bf16
                # params with f32 gradients): both lax.cond branches must agree.
                inner_state = jax.tree.map(lambda f, o: f.astype(o.dtype), fresh, inner_state)
            else:
                inner_state = _carry_over(old_sel, new_sel, inner_state)
            return new_sel, inner_state

        def _carry_over(old_sel, new_sel, inner_state):
            old_flat = sdef.flatten_up_to(old_sel)
            new_flat = sdef.flatten_up_to(new_sel)

            def move(value, i):
                if compact:
                    return plans[i].carry_over(value, old_flat[i], new_flat[i])
                keep = old_flat[i] & new_flat[i]
                return jnp.where(keep, value, jnp.zeros((), value.dtype))

            positions = vec_tree([(i, i) for i in sparse_pos])
            try:
                return optax.tree_utils.tree_map_params(inner, move, inner_state, positions)
            except Exception as e:  # pragma: no cover - depends on the inner transformation
                raise ValueError(
                    "refresh_policy='keep' needs an inner transformation whose state can be "
                    "mapped with optax.tree_utils.tree_map_params; use refresh_policy='reset'"
                ) from e

        def sparse_inner(selected, inner_state):
            """Sparse leaves: gather -> inner (compact) or mask -> inner (dense layout)."""
            flat_sel = sdef.flatten_up_to(selected)
            if compact:
                g_vecs = [(i, plans[i].gather(flat_updates[i], flat_sel[i])) for i in sparse_pos]
                p_vecs = [(i, plans[i].gather(x, flat_sel[i])) for i, x in sparse]
            else:
                zero = jnp.zeros((), jnp.float32)
                g_vecs = [
                    (i, jnp.where(flat_sel[i], flat_updates[i], zero.astype(flat_updates[i].dtype)))
                    for i in sparse_pos
                ]
                p_vecs = sparse
            u_vecs, inner_state = inner.update(
                vec_tree(g_vecs), inner_state, vec_tree(p_vecs), **extra_args, **step_arg
            )
            return selected, store(inner_state), u_vecs

        # The inner update runs inside both branches, so that the new state is the
        # conditional's own output: XLA then writes it into the donated state buffers
        # instead of keeping a state-sized copy of the refreshed state in temp memory.
        # Stored (e.g. bf16) moments enter the conditional as they are and are upcast
        # inside it, where the cast fuses into the inner update (no float32 copy of the
        # whole sparse state is materialised as an operand).
        selected, sparse_inner_state, u_vecs = jax.lax.cond(
            refresh,
            lambda op: sparse_inner(*do_refresh((op[0], load(op[1])))),
            lambda op: sparse_inner(op[0], load(op[1])),
            (state.selected, state.sparse_inner_state),
        )
        flat_sel = sdef.flatten_up_to(selected)
        flat_u_vecs = sdef.flatten_up_to(u_vecs)

        dense = _split(params, labels_tree, DENSE)
        dense_pos = [i for i, _ in dense]
        u_dense, dense_inner_state = inner.update(
            _subtree(treedef, n, [(i, flat_updates[i]) for i in dense_pos]),
            load(state.dense_inner_state),
            _subtree(treedef, n, dense),
            **extra_args,
            **step_arg,
        )
        flat_u_dense = treedef.flatten_up_to(u_dense)

        out = []
        flat_labels = treedef.flatten_up_to(labels_tree)
        for i, (u, lab) in enumerate(zip(flat_updates, flat_labels)):
            if lab == SPARSE:
                if compact:
                    out.append(plans[i].scatter(flat_u_vecs[i], flat_sel[i], u.dtype))
                else:
                    out.append(jnp.where(flat_sel[i], flat_u_vecs[i], 0).astype(u.dtype))
            elif lab == DENSE:
                out.append(flat_u_dense[i].astype(u.dtype))
            else:
                assert lab == FROZEN
                out.append(_zero_update(u))

        new_state = SparseUpdateState(
            sparse_step=optax.safe_int32_increment(step),
            sparse_density=density,
            selected=selected,
            sparse_inner_state=sparse_inner_state,
            dense_inner_state=store(dense_inner_state),
        )
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
