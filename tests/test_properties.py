"""Property tests (hypothesis) of the selection rule and of ``sparse_update``'s invariants.

Budget: ``NANOADAM_HYPOTHESIS_PROFILE=ci`` (the default: derandomised, no deadline, no example
database, 15-60 examples per property, the fewest where every example compiles a
transformation) or ``=long`` (300-1000 random examples per property). The
``slow``-marked test (``pytest -m slow``) adds a long run of the selection rule.

The reference (reference_selection.py) is a numpy sort written from the documented rule:
per chunk of ``C`` entries of each layer matrix (``scope="chunk"``, chunks from
``layout.chunk_length``), per layer matrix (``"leaf"``) or over the concatenation of all
sparse leaves (``"global"``), the ``k = clip(floor(f32(d) * f32(C) + 0.5), 1, C)`` entries
with the smallest float32 ``|w|``, NaN after everything else, ties broken by position.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_selection import (
    nonzero,
    ref_chunk_length,
    ref_chunk_positions,
    ref_global_masks,
    ref_k,
    ref_mask,
    ref_positions,
)

import nanoadam_jax as na
from nanoadam_jax import layout, refresh, selection

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._selection_variants import chunk_positions_top_k  # noqa: E402

PROFILE = os.environ.get("NANOADAM_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"NANOADAM_HYPOTHESIS_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
# Registered under our own names and applied per test: loading a profile globally would
# change the settings of every other hypothesis test in the session.
settings.register_profile(
    "nanoadam-ci",
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_QUIET,
    print_blob=True,
)
settings.register_profile(
    "nanoadam-long",
    max_examples=400,
    deadline=None,
    suppress_health_check=_QUIET,
    print_blob=True,
)


def budget(ci: int, long: int | None = None) -> settings:
    """Settings of one test: ``ci`` examples by default, ``long`` under the long profile."""
    base = settings.get_profile(f"nanoadam-{PROFILE}")
    return settings(base, max_examples=ci if PROFILE == "ci" else (long or base.max_examples))


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------

FLOAT_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

densities = st.one_of(
    st.floats(1e-3, 1.0, allow_nan=False, exclude_min=False),
    st.sampled_from([1e-3, 0.01, 0.1, 0.25, 0.5, 1.0 / 3.0, 0.999, 1.0]),
)
shapes = st.lists(st.integers(0, 7), min_size=0, max_size=3).map(tuple)


@st.composite
def weights(draw, shape=None, dtype_name=None):
    """Weights with heavy ties, signed zeros, subnormals, infinities and NaN."""
    shape = draw(shapes) if shape is None else shape
    dtype_name = draw(st.sampled_from(sorted(FLOAT_DTYPES))) if dtype_name is None else dtype_name
    dtype = FLOAT_DTYPES[dtype_name]
    n = int(np.prod(shape)) if shape else 1
    kind = draw(st.sampled_from(["normal", "ties", "special"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "normal":
        values = rng.normal(size=n) * 10.0 ** rng.integers(-3, 3)
    else:
        tiny = float(jnp.finfo(dtype).smallest_subnormal)
        pool = [0.0, -0.0, 0.5, -0.5, 1.0]
        if kind == "special":
            pool += [tiny, -tiny, np.inf, -np.inf, np.nan, 2.0]
        values = rng.choice(np.array(pool), size=n)
    return jnp.asarray(values.reshape(shape), dtype)


# ------------------------------------------------------------------------------------------------
# The rounding rule
# ------------------------------------------------------------------------------------------------


@budget(ci=40, long=1000)
@given(n=st.integers(0, 10**7), density=densities)
def test_num_selected_follows_the_rounding_rule(n, density):
    assert int(na.num_selected(n, density)) == ref_k(n, density)
    assert selection.num_selected_static(n, density) == ref_k(n, density)


@budget(ci=60, long=1000)
@given(
    shape=st.lists(st.integers(1, 300), min_size=1, max_size=3).map(tuple),
    target=st.one_of(st.integers(1, 2000), st.just(layout.DEFAULT_CHUNK_SIZE)),
)
def test_chunk_length_follows_the_rule(shape, target):
    c = layout.chunk_length(shape, target)
    assert c == ref_chunk_length(shape, target)
    assert int(np.prod(shape)) % c == 0


# ------------------------------------------------------------------------------------------------
# Selection functions
# ------------------------------------------------------------------------------------------------


@st.composite
def layer_axes_of(draw, ndim):
    """A subset of a leaf's axes to treat as layer axes (none for scalars)."""
    return tuple(a for a in range(ndim) if draw(st.booleans())) if ndim else ()


@budget(ci=25)
@given(
    data=st.data(),
    w=weights(),
    density=densities,
    scope=st.sampled_from(["chunk", "leaf"]),
    chunk_size=st.integers(1, 16),
    criterion=st.sampled_from(["smallest", "largest", "random"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_select_mask_selects_exactly_k_per_chunk(
    data, w, density, scope, chunk_size, criterion, seed
):
    axes = data.draw(layer_axes_of(w.ndim))
    size = chunk_size if scope == "chunk" else None
    run = jax.jit(
        na.select_mask, static_argnames=("scope", "chunk_size", "layer_axes", "criterion")
    )
    kw = dict(scope=scope, chunk_size=size, layer_axes=axes, criterion=criterion)
    key = jax.random.PRNGKey(seed)
    mask = np.asarray(run(w, density, key=key, **kw))
    assert mask.shape == w.shape and mask.dtype == bool
    if criterion == "random":
        np.testing.assert_array_equal(run(w, density, key=key, **kw), mask)  # given the key
        # Exactly k per chunk, and NaN only when a chunk has too few other entries.
        lay = layout.leaf_layout(w.shape, batch_axes=axes, scope=scope, chunk_size=size)
        if w.size:
            rows = np.asarray(lay.view(jnp.asarray(mask))).reshape(-1, lay.chunk)
            nan = np.asarray(lay.view(jnp.isnan(w.astype(jnp.float32)))).reshape(-1, lay.chunk)
            k = ref_k(lay.chunk, density)
            assert (rows.sum(axis=1) == k).all()
            for r, n in zip(rows, nan):
                assert (not r[n].any()) if k <= (~n).sum() else r[~n].all()
    else:
        want = ref_mask(w, density, scope, chunk_size or 1, criterion, layer_axes=axes)
        np.testing.assert_array_equal(mask, want)


@budget(ci=15)
@given(
    leaves=st.lists(weights(), min_size=1, max_size=4),
    density=densities,
    criterion=st.sampled_from(["smallest", "largest"]),
)
def test_global_selection_matches_the_concatenated_reference(leaves, density, criterion):
    masks = jax.jit(lambda xs, d: na.select_global_masks(xs, d, criterion=criterion))(
        leaves, density
    )
    want = ref_global_masks(leaves, density, criterion)
    for got, ref in zip(masks, want):
        np.testing.assert_array_equal(np.asarray(got), ref)
    total = sum(x.size for x in leaves)
    assert sum(int(np.sum(m)) for m in masks) == ref_k(total, density)


_chunk_positions = jax.jit(selection.chunk_positions, static_argnums=2)
_chunk_positions_top_k = jax.jit(chunk_positions_top_k, static_argnums=2)


@budget(ci=40, long=1000)
@given(
    seed=st.integers(0, 2**32 - 1),
    values=st.sampled_from([1, 2, 5, 2**32 - 1]),
    k=st.integers(0, 12),
)
def test_chunk_positions_match_the_sorted_reference(seed, values, k):
    # Fixed shapes (one compile), random keys with many or few ties, a traced k up to the
    # capacity of 12 slots per chunk of 40.
    keys = np.random.default_rng(seed).integers(0, values, size=(3, 2, 40), dtype=np.uint64)
    keys = jnp.asarray(keys.astype(np.uint32))
    want = ref_chunk_positions(np.asarray(keys), k, 12)
    np.testing.assert_array_equal(_chunk_positions(keys, k, 12), want)
    np.testing.assert_array_equal(_chunk_positions_top_k(keys, k, 12), want)


def _ref_carry(old, new, values, fresh):
    """Per row: the value an entry had in the old selection, else its fresh value."""
    out = np.array(fresh, copy=True)
    for r in range(old.shape[0]):
        slot_of = {int(p): j for j, p in enumerate(old[r])}
        for j, p in enumerate(new[r]):
            if int(p) in slot_of and int(p) != 20:  # 20: padding (the chunk length)
                out[r, j] = values[r, slot_of[int(p)]]
    return out


_carry = jax.jit(
    lambda old, new, values, fresh: refresh.carry_positions(
        values, refresh.carry_plan(old, new, 20), fresh
    )
)


@budget(ci=30, long=600)
@given(seed=st.integers(0, 2**32 - 1), k_old=st.integers(0, 6), k_new=st.integers(0, 6))
def test_keep_carry_over_moves_values_of_entries_that_stay(seed, k_old, k_new):
    # Rows are chunks of 20 entries with 6 slots: sorted positions, padded with 20.
    rng = np.random.default_rng(seed)

    def positions(k):
        rows = [np.sort(rng.choice(20, size=k, replace=False)) for _ in range(4)]
        return np.stack([np.concatenate([r, np.full(6 - k, 20)]) for r in rows]).astype(np.uint16)

    old, new = positions(k_old), positions(k_new)
    values = rng.normal(size=(4, 6)).astype(np.float32)
    fresh = np.full((4, 6), 1e-6, np.float32)  # e.g. Yogi's initial value
    got = np.asarray(_carry(old, new, values, fresh))
    np.testing.assert_array_equal(got[:, :k_new], _ref_carry(old, new, values, fresh)[:, :k_new])


# ------------------------------------------------------------------------------------------------
# sparse_update: the transformation's invariants over random pytrees
# ------------------------------------------------------------------------------------------------


@st.composite
def param_trees(draw):
    """A nested dict of 1-3 leaves (float or int), a label tree and a layer-axes tree for it;
    the first leaf is a sparse float leaf."""
    n = draw(st.integers(1, 3))
    params, labels, axes = {"block": {}}, {"block": {}}, {"block": {}}
    for i in range(n):
        if i and draw(st.integers(0, 4)) == 0:
            shape = draw(shapes)
            leaf = jnp.arange(int(np.prod(shape)), dtype=jnp.int32).reshape(shape)
            label = "sparse"  # non-float leaves are frozen whatever their label
        else:
            leaf = draw(weights())
            label = "sparse" if i == 0 else draw(st.sampled_from(["sparse", "dense", "frozen"]))
        # Some leaves declare layer axes (any subset that leaves a selection axis).
        layer = draw(layer_axes_of(leaf.ndim)) if leaf.ndim > 1 else ()
        layer = layer if len(layer) < leaf.ndim else layer[1:]
        name = f"leaf_{i}"
        (params["block"] if i % 2 else params)[name] = leaf
        (labels["block"] if i % 2 else labels)[name] = label
        (axes["block"] if i % 2 else axes)[name] = layer
    if not params["block"]:
        del params["block"], labels["block"], axes["block"]
    return params, labels, axes


def effective_labels(params, labels):
    return jax.tree.map(
        lambda p, lab: lab if jnp.issubdtype(p.dtype, jnp.floating) else "frozen", params, labels
    )


def ones_like_grads(params):
    return jax.tree.map(
        lambda p: jnp.ones_like(p) if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros_like(p),
        params,
    )


def dimension_numbers(params, axes):
    """The layer axes as SelectionDimensionNumbers (the other axes), None for no layer axis."""

    def one(p, layer):
        if not layer:
            return None
        return na.SelectionDimensionNumbers(axes=tuple(a for a in range(p.ndim) if a not in layer))

    return jax.tree.map(one, params, axes, is_leaf=lambda x: isinstance(x, tuple))


schedules = st.tuples(densities, densities, st.integers(1, 4), st.integers(1, 3)).map(
    lambda a: na.linear_density_decay(*a)
)


@budget(ci=16, long=300)
@given(
    tree=param_trees(),
    density=st.one_of(densities, schedules),
    mask_interval=st.integers(1, 3),
    scope=st.sampled_from(["chunk", "leaf", "global"]),
    chunk_size=st.integers(1, 12),
    policy=st.sampled_from(["reset", "keep"]),
    steps=st.integers(1, 5),
)
def test_sparse_update_invariants(tree, density, mask_interval, scope, chunk_size, policy, steps):
    """Exactly the reference entries move (re-selected at step 0, every ``mask_interval``
    steps and when a density schedule changes its value); the update is zero elsewhere; the
    update tree has the parameters' structure, shapes and dtypes; the compact state holds the
    reference positions of every chunk, sorted, padded with the chunk length up to the
    capacity (``k`` of the density or of the schedule's ``max_density``)."""
    params, labels, axes = tree
    schedule = density if callable(density) else (lambda t: density)
    size = chunk_size if scope == "chunk" else None
    tx = na.sparse_update(
        optax.scale_by_adam(),
        density,
        mask_interval,
        scope=scope,
        chunk_size=size,
        labels=labels,
        dimension_numbers=dimension_numbers(params, axes) if scope != "global" else None,
        refresh_policy=policy,
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    flat_labels = jax.tree.leaves(effective_labels(params, labels))
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
    sparse_axes = [a for a, lab in zip(flat_axes, flat_labels) if lab == "sparse"]
    max_density = getattr(density, "max_density", density)
    grads = ones_like_grads(params)
    current, expected, at_refresh = None, None, None
    for t in range(steps):
        d = float(np.float32(schedule(t)))
        if t % mask_interval == 0 or d != current:
            sparse = [x for x, lab in zip(jax.tree.leaves(params), flat_labels) if lab == "sparse"]
            at_refresh = sparse
            if scope == "global":
                expected = ref_global_masks(sparse, d)
            else:
                expected = [
                    ref_mask(x, d, scope, chunk_size, layer_axes=a)
                    for x, a in zip(sparse, sparse_axes)
                ]
            current = d
        u, state = update(grads, state, params)
        chex.assert_trees_all_equal_structs(u, params)
        chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
        it = iter(expected)
        for x, lab in zip(jax.tree.leaves(u), flat_labels):
            if lab == "sparse":
                np.testing.assert_array_equal(nonzero(x), next(it), err_msg=f"t={t}")
            elif lab == "dense":
                assert nonzero(x).all()
            else:
                assert not nonzero(x).any()
        if scope != "global":
            sel = [s for s in jax.tree.leaves(state.selected) if s is not None]
            for x, a, s in zip(at_refresh, sparse_axes, sel):
                if not x.size:
                    continue
                cap = s.shape[-1]
                want = ref_positions(x, current, scope, chunk_size, cap, layer_axes=a)
                np.testing.assert_array_equal(np.asarray(s).reshape(want.shape), want)
                chunk = x.size // want[..., 0].size
                assert cap == ref_k(chunk, max_density), (cap, chunk)
        params = jax.tree.map(lambda p, u: (p - 0.05 * u).astype(p.dtype), params, u)
    assert int(state.sparse_step) == steps


@pytest.mark.slow
@budget(ci=300, long=2000)
@given(
    data=st.data(),
    w=weights(),
    density=densities,
    scope=st.sampled_from(["chunk", "leaf"]),
    chunk_size=st.integers(1, 16),
)
def test_select_mask_long_run(data, w, density, scope, chunk_size):
    """Opt-in (``-m slow``): many more examples of the selection rule."""
    axes = data.draw(layer_axes_of(w.ndim))
    select = jax.jit(na.select_mask, static_argnames=("scope", "chunk_size", "layer_axes"))
    size = chunk_size if scope == "chunk" else None
    mask = select(w, density, scope=scope, chunk_size=size, layer_axes=axes)
    want = ref_mask(w, density, scope, chunk_size, layer_axes=axes)
    np.testing.assert_array_equal(np.asarray(mask), want)
