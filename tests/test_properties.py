"""Property tests (hypothesis) of the selection rule and of ``sparse_update``'s invariants.

Budget: ``NANOADAM_HYPOTHESIS_PROFILE=ci`` (the default: derandomised, no deadline, no example
database, 15-40 examples per property, the fewest where every example compiles a
transformation) or ``=long`` (300-1000 random examples per property). The
``slow``-marked test (``pytest -m slow``) adds a long run of the selection rule.

The reference is a numpy sort written from the documented rule: per leaf (or per block of
``block_size`` flattened entries, or over the concatenation of all sparse leaves), the
``k = clip(floor(f32(d) * f32(n) + 0.5), 1, n)`` entries with the smallest float32 ``|w|``,
NaN after everything else, ties broken by flat index.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_selection import nonzero, ref_blocks, ref_global_masks, ref_k, ref_mask

import nanoadam_jax as na
from nanoadam_jax import selection

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
@given(
    n=st.integers(0, 10**7),
    density=densities,
    block_size=st.integers(1, 5000),
    blocks=st.integers(1, 40),
)
def test_num_selected_and_rows_selected_follow_the_rounding_rule(n, density, block_size, blocks):
    assert int(na.num_selected(n, density)) == ref_k(n, density)
    n = min(n, blocks * block_size)  # keep the per-block arrays small
    if n == 0:
        return
    leaf = np.asarray(selection.rows_selected(n, density, "leaf", block_size))
    assert leaf.tolist() == [ref_k(n, density)]
    blocks = np.asarray(selection.rows_selected(n, density, "block", block_size))
    want = [ref_k(stop - start, density) for start, stop in ref_blocks(n, "block", block_size)]
    assert blocks.tolist() == want
    assert selection.block_layout(n, "block", block_size)[0] == len(want)


# ------------------------------------------------------------------------------------------------
# Selection functions
# ------------------------------------------------------------------------------------------------


@budget(ci=25)
@given(
    w=weights(),
    density=densities,
    scope=st.sampled_from(["leaf", "block"]),
    block_size=st.integers(1, 16),
    criterion=st.sampled_from(["smallest", "largest", "random"]),
    method=st.sampled_from(["bisection", "sort", "top_k"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_select_mask_selects_exactly_k_per_leaf_or_block(
    w, density, scope, block_size, criterion, method, seed
):
    n = w.size
    if method == "top_k":
        # top_k needs a concrete k, equal on all rows (see test_hardening for the short-block
        # case): run it eagerly on layouts whose blocks all have the same length.
        if scope == "block" and n > block_size and n % block_size:
            scope = "leaf"
        run = na.select_mask
    else:
        run = jax.jit(
            na.select_mask, static_argnames=("scope", "block_size", "criterion", "method")
        )
    key = jax.random.PRNGKey(seed)
    kw = dict(scope=scope, block_size=block_size, criterion=criterion, key=key, method=method)
    mask = np.asarray(run(w, density, **kw))
    assert mask.shape == w.shape and mask.dtype == bool
    flat, mflat = np.asarray(w).astype(np.float32).reshape(-1), mask.reshape(-1)
    for start, stop in ref_blocks(n, scope, block_size):
        k = ref_k(stop - start, density)
        assert mflat[start:stop].sum() == k
        nan = np.isnan(flat[start:stop])
        if k <= (~nan).sum():
            assert not mflat[start:stop][nan].any()  # a NaN weight is never selected ...
        else:
            assert mflat[start:stop][~nan].all()  # ... unless there are too few others
    if criterion == "random":
        np.testing.assert_array_equal(run(w, density, **kw), mask)  # deterministic given key
    else:
        np.testing.assert_array_equal(mask, ref_mask(w, density, scope, block_size, criterion))


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


# ------------------------------------------------------------------------------------------------
# sparse_update: the transformation's invariants over random pytrees
# ------------------------------------------------------------------------------------------------


@st.composite
def param_trees(draw):
    """A nested dict of 1-3 leaves (float or int) and a label tree for it; the first leaf is a
    sparse float leaf."""
    n = draw(st.integers(1, 3))
    params, labels = {"block": {}}, {"block": {}}
    for i in range(n):
        if i and draw(st.integers(0, 4)) == 0:
            shape = draw(shapes)
            leaf = jnp.arange(int(np.prod(shape)), dtype=jnp.int32).reshape(shape)
            label = "sparse"  # non-float leaves are frozen whatever their label
        else:
            leaf = draw(weights())
            label = "sparse" if i == 0 else draw(st.sampled_from(["sparse", "dense", "frozen"]))
        where = params["block"] if i % 2 else params
        (labels["block"] if i % 2 else labels)[f"leaf_{i}"] = label
        where[f"leaf_{i}"] = leaf
    if not params["block"]:
        del params["block"], labels["block"]
    return params, labels


def assert_layouts_agree(compact, dense):
    """Same zeros, and the same values up to one float32 rounding of the inner transformation
    (XLA fuses the gathered and the full-size Adam differently, e.g. FMA contraction)."""
    chex.assert_trees_all_equal_dtypes(compact, dense)
    for a, b in zip(jax.tree.leaves(compact), jax.tree.leaves(dense)):
        np.testing.assert_array_equal(nonzero(a), nonzero(b))
        eps = float(jnp.finfo(a.dtype).eps) if jnp.issubdtype(a.dtype, jnp.floating) else 0.0
        np.testing.assert_allclose(
            np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32), rtol=2 * eps
        )


def effective_labels(params, labels):
    return jax.tree.map(
        lambda p, lab: lab if jnp.issubdtype(p.dtype, jnp.floating) else "frozen", params, labels
    )


def ones_like_grads(params):
    return jax.tree.map(
        lambda p: jnp.ones_like(p) if jnp.issubdtype(p.dtype, jnp.floating) else jnp.zeros_like(p),
        params,
    )


schedules = st.tuples(densities, densities, st.integers(1, 4), st.integers(1, 3)).map(
    lambda a: na.linear_density_decay(*a)
)


@budget(ci=16, long=300)
@given(
    tree=param_trees(),
    density=st.one_of(densities, schedules),
    mask_interval=st.integers(1, 3),
    scope=st.sampled_from(["leaf", "block", "global"]),
    block_size=st.integers(1, 12),
    policy=st.sampled_from(["reset", "keep"]),
    steps=st.integers(1, 5),
)
def test_sparse_update_invariants(tree, density, mask_interval, scope, block_size, policy, steps):
    """Exactly the reference entries move (re-selected at step 0, every ``mask_interval``
    steps and when a density schedule changes its value); the update is zero elsewhere; the
    update tree has the parameters' structure, shapes and dtypes; the compact layout (buffers
    sized by the density or the schedule's ``max_density``) agrees with the dense one."""
    params, labels = tree
    schedule = density if callable(density) else (lambda t: density)
    layouts = ["dense"] if scope == "global" else ["compact", "dense"]
    txs = {
        layout: na.sparse_update(
            optax.scale_by_adam(),
            density,
            mask_interval,
            scope=scope,
            block_size=block_size,
            labels=labels,
            refresh_policy=policy,
            state_layout=layout,
        )
        for layout in layouts
    }
    updates = {layout: jax.jit(tx.update) for layout, tx in txs.items()}
    states = {layout: tx.init(params) for layout, tx in txs.items()}
    flat_labels = jax.tree.leaves(effective_labels(params, labels))
    grads = ones_like_grads(params)
    current, expected = None, None
    for t in range(steps):
        d = float(np.float32(schedule(t)))
        if t % mask_interval == 0 or d != current:
            sparse = [x for x, lab in zip(jax.tree.leaves(params), flat_labels) if lab == "sparse"]
            if scope == "global":
                expected = ref_global_masks(sparse, d)
            else:
                expected = [ref_mask(x, d, scope, block_size) for x in sparse]
            current = d
        outs = {}
        for layout in layouts:
            outs[layout], states[layout] = updates[layout](grads, states[layout], params)
        for layout, u in outs.items():
            chex.assert_trees_all_equal_structs(u, params)
            chex.assert_trees_all_equal_shapes_and_dtypes(u, params)
            it = iter(expected)
            for x, lab in zip(jax.tree.leaves(u), flat_labels):
                if lab == "sparse":
                    np.testing.assert_array_equal(nonzero(x), next(it), err_msg=f"{layout} t={t}")
                elif lab == "dense":
                    assert nonzero(x).all()
                else:
                    assert not nonzero(x).any()
        if len(layouts) == 2:
            assert_layouts_agree(outs["compact"], outs["dense"])
        params = jax.tree.map(lambda p, u: (p - 0.05 * u).astype(p.dtype), params, outs[layouts[0]])
    assert int(states[layouts[0]].sparse_step) == steps


@pytest.mark.slow
@budget(ci=300, long=2000)
@given(
    w=weights(),
    density=densities,
    scope=st.sampled_from(["leaf", "block"]),
    block_size=st.integers(1, 16),
)
def test_select_mask_long_run(w, density, scope, block_size):
    """Opt-in (``-m slow``): many more examples of the selection rule (bisection only)."""
    select = jax.jit(na.select_mask, static_argnames=("scope", "block_size"))
    mask = select(w, density, scope=scope, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(mask), ref_mask(w, density, scope, block_size))
