"""The sparse update: :func:`sparse_update` and its state, :class:`SparseUpdateState`.

:func:`sparse_update` wraps any element-wise optax transformation (``scale_by_adam``,
``scale_by_lion``...) so that it only ever sees, stores state for and updates the
selected entries: one selection per refresh, inner state of ``k`` values per chunk.

Where the parts live: the validated arguments in :mod:`nanoadam_jax.config`, the chunked
state layout in :mod:`nanoadam_jax.layout`, the selection rule in
:mod:`nanoadam_jax.selection`, density schedules in :mod:`nanoadam_jax.schedules`, when a
refresh happens and what it does to the inner state in :mod:`nanoadam_jax.refresh`, which
leaves are sparse in :mod:`nanoadam_jax.labels`, the masking transformations in
:mod:`nanoadam_jax.masking`. This module is the update: gather, inner, scatter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nanoadam_jax import _checks, _rows, layout, refresh, selection
from nanoadam_jax._tree import box_tree, positions, require_params, subtree, zero_update
from nanoadam_jax.config import (
    SCOPES,
    Density,
    DimensionNumbers,
    SelectionConfig,
    init_layouts,
    selection_args,
    stored_layouts,
)
from nanoadam_jax.labels import DENSE, SPARSE, Labels, label_params

__all__ = [
    "AGE_ARG",
    "AGE_MAX",
    "LEAVES_ARG",
    "REFRESH_POLICIES",
    "SCOPES",
    "STEP_ARG",
    "SparseUpdateState",
    "sparse_update",
]

REFRESH_POLICIES = refresh.REFRESH_POLICIES
#: Name of the extra argument with which :func:`sparse_update` passes its step counter
#: (``sparse_step``, never reset by a refresh) to ``inner.update``; transformations that
#: do not know it ignore it (optax's convention for extra arguments).
STEP_ARG = "nanoadam_step"
#: Name of the extra argument with which :func:`sparse_update` (``entry_age=True``) passes
#: each selected entry's age to ``inner.update`` for the sparse leaves: a tree shaped like
#: the inner state's per-parameter arrays, ``uint16``, the number of updates the entry has
#: had since it entered the selection (0 at its first update; saturates at
#: :data:`AGE_MAX`). Not passed for dense leaves, which are always selected (their age is
#: the step count).
AGE_ARG = "nanoadam_age"
#: Largest stored age (``uint16``): past it, ``1 - b2**age`` is 1 in float32 for any
#: ``b2 <= 0.9998`` (and within 2e-3 of 1 for ``b2 = 0.9999``).
AGE_MAX = 0xFFFF
#: Name of the extra argument that tells ``inner.update`` which parameter leaves (their
#: positions in ``jax.tree.leaves(params)``) its tree holds, in order: a tuple of ints.
#: Lets an inner transformation apply a per-leaf choice made on the full parameters (e.g.
#: ``nanoadamw``'s weight-decay ``mask``).
LEAVES_ARG = "nanoadam_leaves"


class SparseUpdateState(NamedTuple):
    """State of :func:`sparse_update`.

    Attributes:
      sparse_step: int32, number of updates done so far (drives ``mask_interval``).
      sparse_density: float32, the density the current selection was made with.
      selected: per sparse leaf (``None`` elsewhere), the current selection. With
        ``scope="chunk"`` or ``"leaf"``: sorted positions inside each chunk, shaped
        ``(*layer_axes, *chunk_grid, capacity)`` (``uint16`` when a chunk has fewer than
        65536 entries, else ``int32``); slots past the current ``k`` hold the chunk
        length. With ``scope="global"``: a bool mask with the leaf's shape.
      sparse_age: with ``entry_age=True``, per sparse leaf the ``uint16`` age of each
        selected entry (updates since it entered the selection, saturating at
        :data:`AGE_MAX`), shaped like ``selected``; None otherwise.
      sparse_inner_state: the inner transformation's state for the sparse leaves, over
        the selected values (arrays shaped like ``selected``) or, for
        ``scope="global"``, over the full leaves.
      dense_inner_state: the inner transformation's state for the dense leaves.
    """

    sparse_step: jax.Array
    sparse_density: jax.Array
    selected: Any
    sparse_age: Any
    sparse_inner_state: optax.OptState
    dense_inner_state: optax.OptState


class _Moments:
    """Storage dtype of the inner state (``moment_dtype``): cast on store, upcast on load."""

    def __init__(self, moment_dtype: Any):
        if moment_dtype is not None:
            moment_dtype = jnp.dtype(moment_dtype)
            if not jnp.issubdtype(moment_dtype, jnp.floating):
                raise ValueError(f"`moment_dtype` must be a floating dtype, got {moment_dtype}")
        self.dtype = moment_dtype

    def _map(self, fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
        def cast(x):
            if jnp.ndim(x) and jnp.issubdtype(x.dtype, jnp.floating):
                return fn(x)
            return x

        return tree if self.dtype is None else jax.tree.map(cast, tree)

    def store(self, tree: Any) -> Any:
        return self._map(lambda x: x.astype(self.dtype), tree)

    def load(self, tree: Any) -> Any:
        return self._map(lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32)), tree)


def _map_inner_state(
    inner: optax.GradientTransformation, fn: Callable[..., Any], state: Any, *trees: Any
) -> Any:
    try:
        return optax.tree_utils.tree_map_params(inner, fn, state, *trees)
    except (TypeError, AttributeError) as e:  # pragma: no cover - depends on the inner
        raise ValueError(
            "refresh_policy='keep' needs an inner transformation whose state can be mapped "
            "with optax.tree_utils.tree_map_params; use refresh_policy='reset'"
        ) from e


def _param_arrays(inner: Any, state: Any, index_tree: Any) -> list[tuple[Any, int]]:
    """``(array, leaf position)`` of every per-parameter array of ``inner``'s state, in
    ``optax.tree_utils.tree_map_params`` order."""
    found: list[tuple[Any, int]] = []

    def collect(value, i):
        found.append((value, i))
        return value

    _map_inner_state(inner, collect, state, index_tree)
    return found


def sparse_update(
    inner: optax.GradientTransformation,
    density: Density = 0.1,
    mask_interval: int = 100,
    *,
    scope: str = "chunk",
    chunk_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    dimension_numbers: DimensionNumbers = None,
    layer_axis_names: Sequence[str] = layout.LAYER_AXIS_NAMES,
    refresh_policy: str = "keep",
    max_density: float | None = None,
    moment_dtype: Any | None = None,
    entry_age: bool = False,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Run ``inner`` on the selected entries of each sparse leaf only.

    **Selection.** Each sparse leaf (see :mod:`nanoadam_jax.labels`) is cut into chunks
    (:mod:`nanoadam_jax.layout`): every layer of a stacked tensor on its own, each layer's
    matrix flattened row-major into equal chunks of at most ``chunk_size`` entries
    (default 16384). In every chunk the ``k = clip(round_half_up(density * C), 1, C)``
    entries with the smallest ``|w|`` are selected, exactly ``k`` with ties broken by
    position; NaN weights are never small. This is what the paper's code does (bottom-k
    per chunk), and it keeps everything local: a chunk never crosses a layer or a shard.
    ``scope="leaf"`` selects per layer of a leaf (exact per-tensor ``k``: the paper's
    text) at the cost of one chunk per layer (``int32`` positions above 65535 entries;
    on a mesh the state is replicated over the sharded axes and each step all-reduces
    ``k`` values). ``scope="global"`` takes one threshold over all sparse leaves and
    stores full-size inner state (research only).

    **Refresh.** The selection is recomputed from the current parameters at step 0,
    every ``mask_interval`` steps and whenever the density (a float or a schedule
    ``step -> density``) differs from the current selection's. The decision is a
    ``jax.lax.cond``: ordinary steps do no selection work, also under ``jax.vmap`` (a
    per-run density change refreshes that run only; see :func:`nanoadam_jax.refresh.cond`).

    **What a refresh does to the inner state** (``refresh_policy``): ``"keep"`` (default)
    keeps the state of entries that stay selected; entries entering the selection start
    from a fresh state (``inner.init``'s values: zero moments for Adam), so with
    ``density=1.0`` this *is* ``inner``, step for step. Under an inner step count shared
    by all entries, a fresh Adam entry's first step would be
    ``(1-b1)/(1-b1^t) / sqrt((1-b2)/(1-b2^t))`` times ``lr`` (about 3 ``lr`` late in
    training): ``entry_age=True`` (what ``nanoadam`` does by default) passes each entry's
    own age so that its correction starts at its entry. ``"reset"`` re-initialises the
    whole sparse inner state (and its count) at every refresh, so every entry's first
    step after a refresh is ``lr * sign(g)``: an effective learning-rate boost (1.7x over
    a 3000-step run in E3-long of ``python -m benchmarks.evidence``, where keep with the
    per-entry age, reset, the global count and gradient-initialised moments were all
    within one standard error).

    **State.** Per sparse leaf: sorted positions (``uint16`` per selected entry) and
    ``inner``'s state over the selected values only, ``(*layer_axes, *chunk_grid,
    capacity)``. ``capacity`` is ``k`` of the largest density the run uses: the density
    itself, a schedule's maximum (its ``max_density`` attribute, or found by evaluating
    it at init, see :func:`nanoadam_jax.schedules.schedule_max`), the value an
    ``optax.inject_hyperparams`` density has at init, or ``max_density``. A density that
    later asks for more (a traced or injected value above it) is capped at the capacity:
    never a silently larger state. A traced density at init (``init`` under ``jax.vmap``
    over densities) needs ``max_density``. On a mesh the state rows are sharded like the
    parameter rows they index (the chunk length is halved until chunks align with the
    shards; a leaf that cannot align raises an error naming it).

    **Layer axes.** Leading axes named in Flax metadata by one of ``layer_axis_names``
    (``nnx.vmap/scan(transform_metadata={nnx.PARTITION_NAME: "layers"})``,
    ``nn.scan(metadata_params={nn.PARTITION_NAME: "layers"})``) are batch axes: each layer
    is selected on its own. Trees without metadata declare them with
    ``dimension_numbers``.

    Example:
      >>> import jax.numpy as jnp, optax, nanoadam_jax as nanoadam
      >>> tx = nanoadam.sparse_update(optax.scale_by_lion(), density=0.5, mask_interval=10)
      >>> params = {"w": jnp.array([0.1, -2.0, 0.3, 4.0])}
      >>> updates, _ = tx.update({"w": jnp.ones(4)}, tx.init(params), params)
      >>> updates["w"].tolist()
      [1.0, 0.0, 1.0, 0.0]

    Args:
      inner: an element-wise ``optax.GradientTransformation``.
      density: fraction of each chunk to update, in ``(0, 1]``; or a schedule
        ``step -> density``. May be traced (``jax.vmap`` over densities).
      mask_interval: recompute the selection every this many steps.
      scope: ``"chunk"`` (default), ``"leaf"`` or ``"global"``, see above.
      chunk_size: target chunk length in entries (None: 16384, see
        :data:`nanoadam_jax.layout.DEFAULT_CHUNK_SIZE`); pass the chunk a mesh run used
        to reproduce it on one device.
      criterion: ``"smallest"`` (the paper), ``"largest"`` or ``"random"`` (ablations).
      labels: which leaves are sparse, dense or frozen; see :mod:`nanoadam_jax.labels`.
      dimension_numbers: per leaf, a :class:`~nanoadam_jax.SelectionDimensionNumbers`
        naming the axes of one weight matrix (the other axes are layer axes, selected
        independently), or None for the default; a single value for every leaf, a tree
        with the parameters' structure, a callable ``params -> tree`` or a callable
        ``(path, leaf) -> value``.
      layer_axis_names: sharding-metadata axis names that mark a layer axis.
      refresh_policy: ``"keep"`` (default) or ``"reset"``, see above.
      max_density: the largest density the run will use, to size the state when the
        density is traced at init (a Python float).
      moment_dtype: if set (e.g. ``jnp.bfloat16``, the paper's memory model), the inner
        state's floating-point arrays are stored in this dtype between steps; the inner
        transformation still computes in (at least) float32.
      entry_age: store each selected entry's age (updates since it entered the
        selection; ``uint16``, 2 bytes per selected entry) and pass it to
        ``inner.update`` as the extra argument :data:`AGE_ARG`, for an inner
        transformation that corrects its statistics per entry (``nanoadam``'s Adam uses
        it for per-entry bias correction). A refresh keeps the age of entries that stay
        and starts entering entries at 0 (``"reset"``: every entry at 0). Inner
        transformations that do not read it are unaffected (optax ignores unknown extra
        arguments), so for e.g. ``optax.scale_by_amsgrad`` entering entries start from
        ``inner.init``'s state under the running count.
      seed: seed of ``criterion="random"``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    config = SelectionConfig(**selection_args(locals()))
    _checks.check_choice("refresh_policy", refresh_policy, REFRESH_POLICIES)
    if not isinstance(inner, optax.GradientTransformation):
        raise ValueError(f"`inner` must be an optax.GradientTransformation, got {inner!r}")
    if not isinstance(entry_age, bool):
        raise ValueError(f"`entry_age` must be True or False, got {entry_age!r}")
    impl = _SparseUpdate(
        config, optax.with_extra_args_support(inner), refresh_policy, moment_dtype, entry_age
    )
    return optax.GradientTransformationExtraArgs(impl.init, impl.update)


class _Leaves:
    """One call's view of the parameters: flat leaves, labels, layouts, tree builders."""

    def __init__(self, config: SelectionConfig, params: Any, compact: bool, stored: Any = None):
        self.leaves, self.treedef = jax.tree.flatten(params)
        self.bdef, self.boxes = box_tree(params)
        self.n = len(self.leaves)
        labels = self.treedef.flatten_up_to(label_params(params, config.labels))
        self.labels = labels
        self.sparse = positions(labels, SPARSE)
        self.dense = positions(labels, DENSE)
        # Compact state lives in a box-free tree; the global scope's mirrors the params.
        self.sdef = self.bdef if compact else self.treedef
        self.compact = compact
        if not compact:
            self.lays = {}
        elif stored is None:
            self.lays = init_layouts(config, params, self.sparse)
        else:
            flat = self.sdef.flatten_up_to(stored)
            self.lays = stored_layouts(config, params, self.sparse, flat)

    def state_tree(self, items: Sequence[tuple[int, Any]]) -> Any:
        return subtree(self.sdef, self.n, items)

    def dense_tree(self, flat: Sequence[Any]) -> Any:
        """The dense leaves of a box-level flat list, ``None`` elsewhere."""
        return subtree(self.bdef, self.n, [(i, flat[i]) for i in self.dense])

    def view(self, i: int, x: jax.Array) -> jax.Array:
        return self.lays[i].view(x) if self.compact else x


class _SparseUpdate:
    """:func:`sparse_update`'s ``init`` and ``update``, split into their steps."""

    def __init__(
        self,
        config: SelectionConfig,
        inner: optax.GradientTransformationExtraArgs,
        refresh_policy: str,
        moment_dtype: Any,
        entry_age: bool,
    ):
        self.config = config
        self.inner = inner
        self.policy = refresh_policy
        self.entry_age = entry_age
        self.moments = _Moments(moment_dtype)
        self.compact = config.scope != "global"

    # -- init -------------------------------------------------------------------------

    def init(self, params: Any) -> SparseUpdateState:
        t = _Leaves(self.config, params, self.compact)
        if self.compact:
            sel = [
                (
                    i,
                    layout.state_array(
                        t.lays[i], t.lays[i].chunk, t.lays[i].index_dtype, t.leaves[i]
                    ),
                )
                for i in t.sparse
            ]
            vecs = [
                (i, layout.state_array(t.lays[i], 0, t.leaves[i].dtype, t.leaves[i]))
                for i in t.sparse
            ]
            ages = [
                (i, layout.state_array(t.lays[i], 0, jnp.uint16, t.leaves[i])) for i in t.sparse
            ]
        else:
            self.config.init_max_density()  # validates the density
            sel = [(i, jnp.zeros_like(t.leaves[i], dtype=bool)) for i in t.sparse]
            vecs = [(i, jnp.zeros_like(t.leaves[i])) for i in t.sparse]
            ages = [(i, jnp.zeros_like(t.leaves[i], dtype=jnp.uint16)) for i in t.sparse]
        return SparseUpdateState(
            sparse_step=jnp.zeros([], jnp.int32),
            sparse_density=jnp.zeros([], jnp.float32),
            selected=t.state_tree(sel),
            sparse_age=t.state_tree(ages) if self.entry_age else None,
            sparse_inner_state=self.moments.store(self.inner.init(t.state_tree(vecs))),
            dense_inner_state=self.moments.store(self.inner.init(t.dense_tree(t.boxes))),
        )

    # -- refresh ----------------------------------------------------------------------

    def _select(self, t: _Leaves, xs: list[jax.Array], density: Any, key: Any) -> tuple:
        """New selections of all sparse leaves (positions, or masks for ``"global"``), and
        the refresh groups (see :func:`nanoadam_jax.refresh.group_leaves`)."""
        if not self.compact:
            criterion = self.config.criterion
            return selection.select_global_masks(xs, density, criterion=criterion, key=key), []
        lays = [t.lays[i] for i in t.sparse]
        groups = refresh.group_leaves(xs, lays)

        def select_one(lay, x, ordinal):
            leaf_key = None if key is None else jax.random.fold_in(key, ordinal)
            k = self.config.chunk_k(lay, density)
            return refresh.select_positions(lay, x, k, self.config.criterion, leaf_key)

        return refresh.select_leaves(xs, lays, groups, select_one), groups

    def _carry(
        self,
        t: _Leaves,
        old: list,
        new: list,
        groups: list[list[int]],
        inner_state: Any,
        age: Any,
    ) -> tuple[Any, Any]:
        """``refresh_policy="keep"``: move the inner state (and the ages) to the new
        selection. Entries that stay selected keep their values; entering entries take
        those of a fresh ``inner.init`` (zero for Adam's moments, 1e-6 for Yogi's) and
        age 0.

        The inner state's per-parameter arrays come as *fields* (``mu``, ``nu``...), each
        one array per sparse leaf, in ``optax.tree_utils.tree_map_params`` order.
        """
        index_tree = t.state_tree([(i, i) for i in t.sparse])
        seen = _param_arrays(self.inner, inner_state, index_tree)
        start = _param_arrays(self.inner, self._fresh(t, old, inner_state), index_tree)
        n = len(t.sparse)
        if len(seen) % n or [i for _, i in seen] != t.sparse * (len(seen) // n):
            raise ValueError(  # pragma: no cover - optax states hold whole param trees
                "refresh_policy='keep' needs an inner state whose per-parameter arrays hold "
                "every parameter (optax's convention); use refresh_policy='reset'"
            )
        fields = [[v for v, _ in seen[f : f + n]] for f in range(0, len(seen), n)]
        fresh = [[v for v, _ in start[f : f + n]] for f in range(0, len(start), n)]
        if age is not None:  # the ages move like the moments; entering entries start at 0
            ages = [t.sdef.flatten_up_to(age)[i] for i in t.sparse]
            fields.append(ages)
            fresh.append([jnp.zeros_like(a) for a in ages])
        if self.compact:
            chunks = [t.lays[i].chunk for i in t.sparse]
            moved = refresh.carry_fields(old, new, chunks, groups, fields, fresh)
        else:
            both = [o & nw for o, nw in zip(old, new)]
            moved = [
                [jnp.where(b, v, f) for b, v, f in zip(both, values, start)]
                for values, start in zip(fields, fresh)
            ]
        if age is not None:
            age = t.state_tree(list(zip(t.sparse, moved.pop())))
        results = iter(v for field in moved for v in field)
        inner_state = _map_inner_state(
            self.inner, lambda v, i: next(results), inner_state, index_tree
        )
        return inner_state, age

    def _fresh(self, t: _Leaves, old: list, inner_state: Any) -> Any:
        """A new inner state (in the stored dtypes), laid out like the stored one.

        Built from ``zeros_like`` of the current selection (compact) or of the leaves
        (global), so that under explicit sharding it is sharded like the state.
        """
        zeros = [
            (i, jnp.zeros_like(o if self.compact else t.leaves[i], dtype=t.leaves[i].dtype))
            for i, o in zip(t.sparse, old)
        ]
        fresh = self.moments.store(self.inner.init(t.state_tree(zeros)))
        return jax.tree.map(lambda f, o: f.astype(o.dtype), fresh, inner_state)

    def _refresh(self, t: _Leaves, op: Any) -> tuple[Any, Any, Any]:
        (xs, density, step, seed), (selected, age, inner_state) = op
        old = [t.sdef.flatten_up_to(selected)[i] for i in t.sparse]
        new, groups = self._select(t, xs, density, self.config.key(step, seed))
        new_selected = t.state_tree(list(zip(t.sparse, new)))
        if self.policy == "reset":
            zero_age = None if age is None else jax.tree.map(jnp.zeros_like, age)
            return new_selected, zero_age, self._fresh(t, old, inner_state)
        inner_state, age = self._carry(t, old, new, groups, inner_state, age)
        return new_selected, age, inner_state

    # -- update -----------------------------------------------------------------------

    def _sparse_step(self, t: _Leaves, updates: list, selected: Any, inner_state: Any, kw: dict):
        """Gather -> inner -> scatter for the sparse leaves.

        The update of a compact leaf is a scatter-add into zeros of the leaf's shape. On
        one device it indexes the leaf directly, a form XLA fuses with the
        ``optax.apply_updates`` that follows into an in-place scatter-add into the
        parameters (no parameter-sized update buffer; about twice as fast on CPU). With
        several devices it scatters row by row in the chunk view, which keeps a sharded
        leaf's update local to each shard (the direct form would make XLA all-gather
        the selected values).
        """
        sel = t.sdef.flatten_up_to(selected)
        padded = self.config.padded()
        # One device: index the leaves directly (see above); the coordinates serve the
        # gathers and the scatter. Empty or scalar leaves take the row-wise path.
        direct = {
            i: layout.leaf_coords(t.lays[i], sel[i], padded)
            for i in t.sparse
            if self.compact
            and jax.device_count() == 1
            and t.leaves[i].ndim
            and t.lays[i].size
            and t.lays[i].capacity
        }

        def take(i, x):
            if i in direct:
                return layout.take_coords(t.lays[i], x, direct[i], padded)
            return _rows.take_rows(t.view(i, x), sel[i], padded)

        if self.compact:
            g = [(i, take(i, updates[i])) for i in t.sparse]
            p = [(i, take(i, t.leaves[i])) for i in t.sparse]
        else:
            g = [
                (i, jnp.where(sel[i], updates[i], jnp.zeros((), updates[i].dtype)))
                for i in t.sparse
            ]
            p = [(i, t.leaves[i]) for i in t.sparse]
        u_vecs, inner_state = self.inner.update(
            t.state_tree(g), self.moments.load(inner_state), t.state_tree(p), **kw
        )
        u_flat = t.sdef.flatten_up_to(u_vecs)
        out = {}
        for i in t.sparse:
            u = updates[i]
            if i in direct:
                out[i] = layout.scatter_into_zeros(t.lays[i], u, direct[i], u_flat[i], padded)
            elif self.compact:
                zeros = jnp.zeros_like(t.view(i, u))
                out[i] = t.lays[i].unview(_rows.scatter_add_rows(zeros, sel[i], u_flat[i]), u)
            else:
                out[i] = jnp.where(sel[i], u_flat[i], 0).astype(u.dtype)
        return out, self.moments.store(inner_state)

    def _dense_step(self, t: _Leaves, updates: Any, inner_state: Any, kw: dict):
        """The inner transformation on the dense leaves, with their metadata boxes (so
        their full-size state is laid out like the parameters)."""
        box_updates = t.bdef.flatten_up_to(updates)
        u_dense, inner_state = self.inner.update(
            t.dense_tree(box_updates), self.moments.load(inner_state), t.dense_tree(t.boxes), **kw
        )
        flat = t.bdef.flatten_up_to(u_dense)
        return {i: jax.tree.leaves(flat[i])[0] for i in t.dense}, self.moments.store(inner_state)

    def update(self, updates: Any, state: SparseUpdateState, params: Any = None, **extra_args):
        require_params(params, "sparse_update")
        t = _Leaves(self.config, params, self.compact, stored=state.selected)
        flat_updates = t.treedef.flatten_up_to(updates)
        step = state.sparse_step
        density = self.config.density_fn(step)
        due = refresh.refresh_due(step, self.config.mask_interval, density, state.sparse_density)
        kw = {**extra_args, STEP_ARG: step}
        selected, age = state.selected, state.sparse_age
        sparse_state = state.sparse_inner_state
        out: list[Any] = [zero_update(u) for u in flat_updates]
        if t.sparse:
            xs = [t.view(i, t.leaves[i]) for i in t.sparse]
            selected, age, sparse_state = refresh.cond(
                due,
                lambda op: self._refresh(t, op),
                lambda op: op[1],
                ((xs, density, step, self.config.seed), (selected, age, sparse_state)),
            )
            sparse_kw = {**kw, LEAVES_ARG: tuple(t.sparse)}
            if age is not None:
                sparse_kw[AGE_ARG] = age
            sparse_out, sparse_state = self._sparse_step(
                t, flat_updates, selected, sparse_state, sparse_kw
            )
            for i, u in sparse_out.items():
                out[i] = u
            if age is not None:  # one more update for every selected entry (saturating)
                age = jax.tree.map(lambda a: a + (a < AGE_MAX).astype(a.dtype), age)
        dense_state = state.dense_inner_state
        if t.dense:
            dense_kw = {**kw, LEAVES_ARG: tuple(t.dense)}
            dense_out, dense_state = self._dense_step(t, updates, dense_state, dense_kw)
            for i, u in dense_out.items():
                out[i] = u.astype(flat_updates[i].dtype)
        new_state = SparseUpdateState(
            sparse_step=optax.safe_int32_increment(step),
            sparse_density=density,
            selected=selected,
            sparse_age=age,
            sparse_inner_state=sparse_state,
            dense_inner_state=dense_state,
        )
        return jax.tree_util.tree_unflatten(t.treedef, out), new_state
