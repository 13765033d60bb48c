"""Hardening: bad input, traced arguments, numerical edge cases, donation and determinism.

Every transformation is jitted once per configuration (XLA CPU compiles dominate the run
time); selections are checked against a small numpy reference written from the documented
rule: the ``k = clip(round_half_up(d * n), 1, n)`` entries with the smallest float32 ``|w|``,
NaN after everything else, ties broken by flat index.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_selection import nonzero, ref_global_masks, ref_k, ref_mask

import nanoadam_jax as na

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------
# Small helpers (the numpy reference selection is in reference_selection.py)
# ------------------------------------------------------------------------------------------------


def quadratic_grads(params, target):
    return jax.tree.map(lambda p, t: (p - t).astype(p.dtype), params, target)


def train(tx, params, target, steps, donate=False):
    """``steps`` jitted steps of ``tx`` on ``0.5 * |p - target|^2``; returns (params, state)."""

    def step(p, s):
        u, s = tx.update(quadratic_grads(p, target), s, p)
        return optax.apply_updates(p, u), s

    fn = jax.jit(step, donate_argnums=(0, 1) if donate else ())
    state = tx.init(params)
    for _ in range(steps):
        params, state = fn(params, state)
    return params, state


def random_params(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "dense_0": {
            "kernel": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(10,)), jnp.float32),
        },
        "head": {"kernel": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32)},
    }


FACTORIES = {
    "nanoadam": lambda **kw: na.nanoadam(1e-3, **kw),
    "nanoadamw": lambda **kw: na.nanoadamw(1e-3, **kw),
    "sparse_update": lambda **kw: na.sparse_update(optax.scale_by_adam(), **kw),
    "magnitude_mask": lambda **kw: na.magnitude_mask(**kw),
    "masked_apply": lambda **kw: na.masked_apply(**kw),
}
SPARSE_FACTORIES = {k: FACTORIES[k] for k in ("nanoadam", "nanoadamw", "sparse_update")}

# ------------------------------------------------------------------------------------------------
# Bad input: a clear error at construction, naming the argument and what is allowed
# ------------------------------------------------------------------------------------------------

BAD_COMMON = [
    # (keyword, value, regex the message must match)
    ("density", 0.0, r"`density` must be in \(0, 1\]"),
    ("density", -0.1, r"`density` must be in \(0, 1\]"),
    ("density", 1.5, r"`density` must be in \(0, 1\]"),
    ("density", float("nan"), r"`density` must be in \(0, 1\]"),
    ("density", float("inf"), r"`density` must be in \(0, 1\]"),
    ("density", True, r"`density` must be a number in \(0, 1\]"),
    ("density", "0.1", r"`density` must be a scalar number in \(0, 1\]"),
    ("density", np.array([0.1, 0.2]), r"`density` must be a scalar number in \(0, 1\]"),
    ("density", jnp.asarray(0.0), r"`density` must be in \(0, 1\]"),
    ("mask_interval", 0, r"`mask_interval` must be a positive integer"),
    ("mask_interval", -5, r"`mask_interval` must be a positive integer"),
    ("mask_interval", 2.0, r"`mask_interval` must be a positive integer"),
    ("mask_interval", 2.5, r"`mask_interval` must be a positive integer"),
    ("mask_interval", True, r"`mask_interval` must be a positive integer"),
    ("mask_interval", None, r"`mask_interval` must be a positive integer"),
    ("block_size", 0, r"`block_size` must be a positive integer"),
    ("block_size", -1, r"`block_size` must be a positive integer"),
    ("block_size", 64.0, r"`block_size` must be a positive integer"),
    ("scope", "layer", r"`scope` must be one of \('leaf', 'block', 'global'\)"),
    ("scope", None, r"`scope` must be one of"),
    ("criterion", "magnitude", r"`criterion` must be one of \('smallest', 'largest', 'random'\)"),
    ("selection_method", "heap", r"`selection_method` must be one of \('bisection', 'sort'"),
    ("seed", 1.5, r"`seed` must be an integer"),
    ("seed", True, r"`seed` must be an integer"),
]


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize(("name", "value", "match"), BAD_COMMON, ids=lambda v: repr(v)[:20])
def test_bad_selection_arguments_fail_at_construction(factory, name, value, match):
    with pytest.raises(ValueError, match=match):
        FACTORIES[factory](**{name: value})


BAD_SPARSE = [
    ("refresh_policy", "zero", r"`refresh_policy` must be one of \('reset', 'keep'\)"),
    ("state_layout", "sparse", r"`state_layout` must be one of \('compact', 'dense'\)"),
    ("max_density", 0.0, r"`max_density` must be in \(0, 1\]"),
    ("max_density", 1.5, r"`max_density` must be in \(0, 1\]"),
    ("max_density", 0.05, r"`max_density`=0.05 is below the density's largest value 0.1"),
    ("scope", "global", r"scope='global' needs state_layout='dense'"),
]


@pytest.mark.parametrize("factory", sorted(SPARSE_FACTORIES))
@pytest.mark.parametrize(("name", "value", "match"), BAD_SPARSE, ids=lambda v: repr(v)[:20])
def test_bad_sparse_update_arguments_fail_at_construction(factory, name, value, match):
    with pytest.raises(ValueError, match=match):
        SPARSE_FACTORIES[factory](density=0.1, **{name: value})


def test_other_bad_arguments():
    with pytest.raises(ValueError, match=r"`weight_decay` must be a non-negative float"):
        na.nanoadamw(1e-3, weight_decay=-0.1)
    with pytest.raises(ValueError, match=r"`inner` must be an optax.GradientTransformation"):
        na.sparse_update(lambda g: g)
    # A dense-compatible scope works with the dense layout.
    na.sparse_update(optax.scale_by_adam(), scope="global", state_layout="dense")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(init_density=0.0, end_density=0.1, decay_steps=10), r"`init_density`"),
        (dict(init_density=0.1, end_density=1.01, decay_steps=10), r"`end_density`"),
        (dict(init_density=0.1, end_density=0.05, decay_steps=0), r"`decay_steps` must be a pos"),
        (dict(init_density=0.1, end_density=0.05, decay_steps=9.5), r"`decay_steps`"),
        (
            dict(init_density=0.1, end_density=0.05, decay_steps=10, density_interval=0),
            r"`density_interval` must be a positive integer",
        ),
        (
            dict(init_density=0.1, end_density=0.05, decay_steps=10, density_interval=2.0),
            r"`density_interval` must be a positive integer",
        ),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        na.linear_density_decay(**kwargs)


def test_bad_constant_density():
    with pytest.raises(ValueError, match=r"`density` must be in \(0, 1\]"):
        na.constant_density(0.0)


@pytest.mark.parametrize(
    "schedule",
    [
        lambda t: 1.5,
        lambda t: jnp.zeros(()),
        lambda t: jnp.asarray(jnp.nan),
        lambda t: jnp.full((2,), 0.1),
        # Leaves (0, 1] only at step 100, which is one of the probed steps.
        lambda t: jnp.where(t >= 100, -0.1, 0.1),
        lambda t: 0.1 - 0.002 * t,
    ],
    ids=["above-1", "zero", "nan", "vector", "negative-from-100", "linear-below-0"],
)
def test_schedule_out_of_range_is_refused_at_construction(schedule):
    for factory in FACTORIES.values():
        with pytest.raises(ValueError, match=r"the `density` schedule must return a scalar in"):
            factory(density=schedule)


def test_schedule_checked_only_at_probe_steps():
    # The schedule is probed at steps 0, 1, 10, 100, ... 1e6: a value out of range strictly
    # between two probes is not seen at construction. At run time it is clipped by the
    # rounding rule like any traced density (here 0.0 -> one entry per leaf).
    sched = lambda t: jnp.where((t > 20) & (t < 30), 0.0, 0.1)
    tx = na.magnitude_mask(sched, mask_interval=1000)
    params = {"w": jnp.linspace(-1.0, 1.0, 40)}
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(22):
        u, state = update(params, state, params)
        assert nonzero(u["w"]).sum() == (1 if step == 21 else 4), step


def test_schedule_above_its_max_density_attribute_is_refused():
    def sched(step):
        return jnp.asarray(0.5, jnp.float32)

    sched.max_density = 0.1  # wrong: compact buffers would hold 10% of each leaf
    with pytest.raises(ValueError, match="max_density"):
        na.nanoadam(1e-3, density=sched)


# -- labels: checked at init (they need the parameters) ------------------------------------------


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize(
    "labels",
    [
        lambda path, leaf: "Sparse",
        lambda path, leaf: None,
        lambda path, leaf: True,
        lambda path, leaf: 1,
        lambda params: {"a": "sparse", "b": "trainable"},
        {"a": "sparse", "b": "masked"},
    ],
    ids=["case", "none", "bool", "int", "tree-fn", "tree"],
)
def test_predicate_returning_unknown_label_is_refused(factory, labels):
    tx = FACTORIES[factory](labels=labels)
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"labels must return one of \('sparse', 'dense', 'frozen'"
    ):
        tx.init(params)


def test_label_tree_with_wrong_leaf_count_is_refused():
    tx = na.nanoadam(1e-3, labels={"a": "sparse"})
    with pytest.raises(ValueError, match=r"structure of the parameters"):
        tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})


@pytest.mark.parametrize(
    "labels", [{"a": "sparse", "c": "dense"}, ["sparse", "dense"]], ids=["other-keys", "list"]
)
def test_label_tree_with_wrong_structure_is_refused(labels):
    tx = na.nanoadam(1e-3, labels=labels)
    with pytest.raises(ValueError, match=r"structure of the parameters"):
        tx.init({"a": jnp.ones(3), "b": jnp.ones(2)})


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_complex_leaves_are_refused_whatever_the_label(factory):
    params = {"w": jnp.ones(3), "z": jnp.ones(4, jnp.complex64)}
    for labels in (None, lambda path, leaf: "frozen"):
        with pytest.raises(ValueError, match=r"complex parameters are not supported.*\['z'\]"):
            FACTORIES[factory](labels=labels).init(params)


@pytest.mark.parametrize("factory", sorted(FACTORIES))
def test_update_without_params_is_refused(factory):
    tx = FACTORIES[factory]()
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"call `update\(updates, state, params\)`"):
        tx.update(params, tx.init(params))


# ------------------------------------------------------------------------------------------------
# Traced arguments: what happens when a value cannot be checked at construction
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_injected_density_out_of_range_is_clipped(layout):
    """A traced density is clipped by the rounding rule: ``d <= 0`` trains one entry per leaf,
    ``d >= 1`` trains every entry, and NaN trains none (the sparse leaves get zero updates;
    dense leaves are still updated). Compact buffers are sized for density 1.0 here (no
    ``max_density``), so both layouts agree."""
    params = random_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.inject_hyperparams(na.nanoadam, static_args=("block_size",))(
        learning_rate=1.0, density=0.1, mask_interval=1, state_layout=layout
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    sizes = {"kernel": 120, "bias": 10}
    for d, expect in [(-0.5, 1), (0.0, 1), (1.0, None), (2.0, None), (np.inf, None), (np.nan, 0)]:
        state.hyperparams["density"] = jnp.asarray(d, jnp.float32)
        u, _ = update(grads, state, params)
        for name, n in sizes.items():
            want = n if expect is None else expect
            assert nonzero(u["dense_0"][name]).sum() == want, (d, name)
        assert nonzero(u["head"]["kernel"]).all()


def test_injected_density_above_max_density_keeps_the_smallest():
    params = {"w": jnp.linspace(-1.0, 1.0, 21)}
    grads = {"w": jnp.ones(21)}
    updates = {}
    for layout in ("compact", "dense"):
        tx = optax.inject_hyperparams(
            na.nanoadam, static_args=("block_size", "max_density", "mask_interval")
        )(learning_rate=1.0, density=0.1, max_density=0.2, state_layout=layout)
        state = tx.init(params)
        state.hyperparams["density"] = jnp.asarray(0.5, jnp.float32)
        updates[layout], _ = jax.jit(tx.update)(grads, state, params)
    sel = nonzero(updates["compact"]["w"])
    # Whatever the count, the updated entries are the smallest |w| ...
    np.testing.assert_array_equal(sel, ref_mask(params["w"], sel.sum() / 21))
    # ... and both layouts agree.
    chex.assert_trees_all_equal(updates["compact"], updates["dense"])


def test_traced_static_arguments_give_a_clear_error():
    params = {"w": jnp.linspace(-1.0, 1.0, 11)}
    tx = optax.inject_hyperparams(na.nanoadam)(learning_rate=0.1, block_size=4, scope="block")
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"`block_size` must be a static Python int.*static_args"):
        jax.jit(tx.update)(params, state, params)


def test_traced_mask_interval_zero_still_selects_exactly_k():
    # A traced mask_interval cannot be checked; an invalid value (0) must not crash nor
    # break the exact-k invariant (XLA defines ``x % 0`` as implementation-specific, so
    # only the invariant is tested, not the refresh steps).
    params = {"w": jnp.linspace(-1.0, 1.0, 11)}
    tx = optax.inject_hyperparams(na.nanoadam, static_args=("block_size",))(
        learning_rate=0.1, density=0.2, mask_interval=3
    )
    state = tx.init(params)
    state.hyperparams["mask_interval"] = jnp.asarray(0)
    update = jax.jit(tx.update)
    for _ in range(3):
        u, state = update(params, state, params)
        assert nonzero(u["w"]).sum() == ref_k(11, 0.2)
        params = optax.apply_updates(params, u)


# ------------------------------------------------------------------------------------------------
# Numerical edge cases
# ------------------------------------------------------------------------------------------------

DEGENERATE = {
    "empty": jnp.zeros((0,)),
    "empty_2d": jnp.zeros((3, 0)),
    "scalar": jnp.asarray(0.25),
    "tiny": jnp.asarray([0.3, -0.2, 0.9]),  # smaller than 1 / density: trains exactly one
    "count": jnp.arange(4, dtype=jnp.int32),
    "flag": jnp.asarray([True, False]),
    "head": {"kernel": jnp.asarray([1.0, -2.0])},
}
SPARSE_NAMES = ("empty", "empty_2d", "scalar", "tiny")


@pytest.mark.parametrize(
    ("scope", "layout", "policy"),
    [
        ("leaf", "compact", "reset"),
        ("block", "compact", "keep"),
        ("leaf", "dense", "keep"),
        ("global", "dense", "reset"),
    ],
)
def test_degenerate_leaves(scope, layout, policy):
    params = DEGENERATE
    density = 0.1
    tx = na.nanoadam(
        1.0,
        density=density,
        mask_interval=1,
        scope=scope,
        block_size=2,
        state_layout=layout,
        refresh_policy=policy,
    )
    grads = jax.tree.map(
        lambda x: jnp.ones_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else jnp.zeros_like(x),
        params,
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    sparse = [params[k] for k in SPARSE_NAMES]
    if scope == "global":
        want = dict(zip(SPARSE_NAMES, ref_global_masks(sparse, density)))
    else:
        want = {k: ref_mask(params[k], density, scope, 2) for k in SPARSE_NAMES}
    for _ in range(3):  # refresh at every step (exercises carry-over of empty buffers)
        u, state = update(grads, state, params)
        chex.assert_trees_all_equal_structs(u, params)
        chex.assert_trees_all_equal_shapes(u, params)
        for k in SPARSE_NAMES:
            np.testing.assert_array_equal(nonzero(u[k]), want[k], err_msg=k)
        assert nonzero(u["head"]["kernel"]).all()
        assert not nonzero(u["count"]).any() and not nonzero(u["flag"]).any()
        new = optax.apply_updates(params, u)
        for k in ("count", "flag"):
            assert new[k].dtype == params[k].dtype
            np.testing.assert_array_equal(new[k], params[k])
    if scope == "leaf":
        assert want["scalar"].all() and want["tiny"].sum() == 1
    sparse_state = state[0]
    # Frozen leaves hold no optimizer state at all.
    for part in (sparse_state.sparse_inner_state, sparse_state.dense_inner_state):
        assert part.mu["count"] is None and part.mu["flag"] is None
    assert (
        sparse_state.selected["count"] is None and sparse_state.selected["head"]["kernel"] is None
    )


def test_float0_gradients_of_integer_leaves_pass_through_sparse_update():
    params = {"w": jnp.asarray([0.1, 2.0, -0.3]), "step": jnp.asarray(3, jnp.int32)}
    grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2), allow_int=True)(params)
    assert grads["step"].dtype == jax.dtypes.float0
    tx = na.sparse_update(optax.scale_by_adam(), density=0.5)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    assert u["step"].dtype == jax.dtypes.float0
    assert nonzero(u["w"]).sum() == ref_k(3, 0.5)


SPECIAL = np.array([0.5, np.nan, -0.1, np.inf, 0.2, -np.nan, 0.0, -np.inf, -0.0, 3.0], np.float32)


@pytest.mark.parametrize("criterion", ["smallest", "largest", "random"])
@pytest.mark.parametrize("method", ["bisection", "sort"])
def test_nan_weights_are_never_selected_while_others_remain(criterion, method):
    x = jnp.asarray(SPECIAL)
    n, n_nan = x.size, int(np.isnan(SPECIAL).sum())

    @jax.jit
    def masks(x):
        key = jax.random.PRNGKey(3)
        return [
            na.select_mask(x, d, criterion=criterion, key=key, method=method)
            for d in (0.1, 0.3, 0.8, 0.9, 1.0)
        ]

    for d, m in zip((0.1, 0.3, 0.8, 0.9, 1.0), masks(x)):
        m = np.asarray(m)
        k = ref_k(n, d)
        assert m.sum() == k
        if k <= n - n_nan:
            assert not m[np.isnan(SPECIAL)].any()
        else:
            assert m[~np.isnan(SPECIAL)].all()
        if criterion != "random":
            np.testing.assert_array_equal(m, ref_mask(SPECIAL, d, criterion=criterion))


@pytest.mark.parametrize("scope", ["leaf", "block", "global"])
def test_all_nan_leaf_selects_exactly_k_in_index_order_and_terminates(scope):
    params = {"a": jnp.full((7, 3), jnp.nan), "b": jnp.asarray([np.nan, 1.0, np.inf, np.nan])}
    layout = "dense" if scope == "global" else "compact"
    tx = na.nanoadam(1.0, density=0.3, scope=scope, block_size=5, state_layout=layout)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    if scope == "global":
        want = dict(zip("ab", ref_global_masks([params["a"], params["b"]], 0.3)))
    else:
        want = {k: ref_mask(v, 0.3, scope, 5) for k, v in params.items()}
    for k in "ab":
        np.testing.assert_array_equal(nonzero(u[k]), want[k])
        assert np.isfinite(np.asarray(u[k])).all()
    if scope == "leaf":
        assert want["a"].reshape(-1)[: ref_k(21, 0.3)].all()  # the first k, by index


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_non_finite_gradient_outside_the_mask_does_not_leak(layout):
    params = {"w": jnp.asarray([0.5, 3.0, -0.1, 4.0, 0.2, -5.0])}
    grads = {"w": jnp.asarray([1.0, np.nan, 1.0, np.inf, 1.0, -np.inf])}
    tx = na.nanoadam(1.0, density=0.5, state_layout=layout)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(nonzero(u["w"]), [True, False, True, False, True, False])
    assert np.isfinite(np.asarray(u["w"])).all()
    for moment in (state[0].sparse_inner_state.mu["w"], state[0].sparse_inner_state.nu["w"]):
        assert np.isfinite(np.asarray(moment)).all()


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_apply_if_finite_skipped_step_leaves_mask_counters_and_moments(layout):
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.permutation(np.linspace(-1.0, 1.0, 16)), jnp.float32),
        "head": {"kernel": jnp.ones(3)},
    }
    tx = optax.apply_if_finite(
        na.nanoadam(0.1, density=0.25, mask_interval=2, state_layout=layout),
        max_consecutive_errors=3,
    )
    update = jax.jit(tx.update)
    state = tx.init(params)
    ones = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):  # steps 0 (refresh) and 1
        u, state = update(ones, state, params)
        params = optax.apply_updates(params, u)
    # New weights: the refresh due at step 2 would select other entries.
    old_mask = ref_mask(params["w"], 0.25)
    params = {"w": -params["w"][::-1] * 3.0 + 0.01, "head": params["head"]}
    assert not np.array_equal(ref_mask(params["w"], 0.25), old_mask)
    before = state
    for bad in (np.nan, np.inf):
        grads = {"w": ones["w"].at[5].set(bad), "head": {"kernel": ones["head"]["kernel"]}}
        u, state = update(grads, state, params)
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
        chex.assert_trees_all_equal(state.inner_state, before.inner_state)
    assert int(state.notfinite_count) == 2 and int(state.total_notfinite) == 2
    assert int(state.inner_state[0].sparse_step) == 2
    # The next finite step takes the refresh that was due.
    u, state = update(ones, state, params)
    assert int(state.inner_state[0].sparse_step) == 3
    np.testing.assert_array_equal(nonzero(u["w"]), ref_mask(params["w"], 0.25))


def _tied_values(dtype, n, seed):
    rng = np.random.default_rng(seed)
    tiny = float(jnp.finfo(dtype).smallest_subnormal)
    pool = np.array([0.0, -0.0, tiny, -tiny, 0.5, -0.5, 1.0, -1.0, 2.0, np.nan], np.float32)
    return jnp.asarray(rng.choice(pool, size=n, p=[0.15, 0.15] + [0.09] * 7 + [0.07]), dtype)


@pytest.mark.parametrize(("dtype", "layout"), [(jnp.bfloat16, "compact"), (jnp.float16, "dense")])
def test_half_precision_heavy_ties(dtype, layout):
    x = _tied_values(dtype, 97, seed=1)
    densities = (0.01, 0.37, 0.93)

    @jax.jit
    def masks(x):
        out = []
        for d in densities:
            out.append(na.select_mask(x, d))
            out.append(na.select_mask(x, d, scope="block", block_size=10))
        return out

    got = masks(x)
    for i, d in enumerate(densities):
        np.testing.assert_array_equal(got[2 * i], ref_mask(x, d), err_msg=f"leaf {d}")
        np.testing.assert_array_equal(got[2 * i + 1], ref_mask(x, d, "block", 10))
    # Through the optimizer: updates keep the half dtype and hit exactly the reference set.
    params = {"w": x.reshape(97, 1), "ln": {"scale": jnp.ones(4, dtype)}}
    tx = na.nanoadam(1.0, density=0.37, state_layout=layout)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(u, params)
    np.testing.assert_array_equal(nonzero(u["w"]), ref_mask(params["w"], 0.37))


@pytest.mark.parametrize("layout", ["compact", "dense"])
def test_bf16_params_with_f32_gradients(layout):
    params = {"w": jnp.linspace(-1.0, 1.0, 10).astype(jnp.bfloat16)}
    grads = {"w": jnp.ones(10, jnp.float32)}
    tx = na.nanoadam(0.1, density=0.3, mask_interval=2, state_layout=layout)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for _ in range(3):
        u, state = update(grads, state, params)
        assert nonzero(u["w"]).sum() == ref_k(10, 0.3)


X64_SCRIPT = textwrap.dedent(
    """
    import jax
    assert jax.config.jax_enable_x64
    import jax.numpy as jnp, numpy as np, optax
    import nanoadam_jax as na

    rng = np.random.default_rng(0)
    w = rng.normal(size=(6, 7))
    params = {"w": jnp.asarray(w), "b": jnp.asarray(w[0], jnp.float32),
              "head": {"kernel": jnp.asarray(w[:2])}}
    assert params["w"].dtype == jnp.float64
    sched = na.linear_density_decay(0.5, 0.2, decay_steps=4, density_interval=2)
    finals = {}
    for layout in ("compact", "dense"):
        tx = na.nanoadam(0.1, density=sched, mask_interval=3, state_layout=layout)
        state, p = tx.init(params), params
        update = jax.jit(tx.update)
        for t in range(5):
            u, state = update(jax.tree.map(lambda x: x - 1.0, p), state, p)
            assert u["w"].dtype == jnp.float64 and u["head"]["kernel"].dtype == jnp.float64
            assert u["b"].dtype == jnp.float32
            assert int(jnp.sum(u["w"] != 0)) == int(na.num_selected(42, sched(t))), t
            p = optax.apply_updates(p, u)
        s = state[0]
        assert s.sparse_step.dtype == jnp.int32 and s.sparse_density.dtype == jnp.float32
        assert s.sparse_inner_state.mu["w"].dtype == jnp.float64
        assert s.sparse_inner_state.nu["b"].dtype == jnp.float32
        finals[layout] = p
    np.testing.assert_array_equal(finals["compact"]["w"], finals["dense"]["w"])
    # Keys come from float32 (documented): closer than float32 resolution ties, by index.
    assert na.select_mask(jnp.asarray([1.0 + 1e-12, 1.0]), 0.5).tolist() == [True, False]
    assert na.select_mask(jnp.asarray([3e-50, -1e-60, 0.0]), 0.34).tolist() == [True, False, False]
    assert na.select_mask(jnp.asarray([1e300, 2.0, 1e39]), 0.67).tolist() == [True, True, False]
    print("X64-OK")
    """
)


def test_float64_under_x64_in_a_subprocess():
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)  # one device is enough here
    proc = subprocess.run(
        [sys.executable, "-c", X64_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "X64-OK" in proc.stdout, proc.stderr[-3000:]


# -- top_k selection method --------------------------------------------------------------------


def test_top_k_matches_the_rule_with_a_short_last_block():
    x = jnp.arange(10.0)
    got = na.select_mask(x, 0.5, scope="block", block_size=4, method="top_k")  # eager: concrete k
    np.testing.assert_array_equal(got, ref_mask(x, 0.5, "block", 4))  # [2, 2, 1] per block


@pytest.mark.parametrize("factory", ["nanoadam", "magnitude_mask"])
def test_top_k_method_works_in_the_transformations(factory):
    params = {"w": jnp.linspace(-1.0, 1.0, 10)}
    grads = {"w": jnp.ones(10)}
    out = {}
    for method in ("bisection", "top_k"):
        tx = FACTORIES[factory](density=0.2, selection_method=method)
        out[method], _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_equal(out["top_k"], out["bisection"])


# ------------------------------------------------------------------------------------------------
# Buffer donation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("layout", "policy", "scope"),
    [("compact", "reset", "leaf"), ("dense", "keep", "block")],
)
def test_donating_params_and_state_is_safe(layout, policy, scope):
    params = random_params(1)
    target = jax.tree.map(lambda x: x * 0.0 + 0.3, params)
    tx = na.nanoadamw(
        0.05,
        density=na.linear_density_decay(0.4, 0.1, decay_steps=4, density_interval=2),
        mask_interval=3,
        scope=scope,
        block_size=32,
        state_layout=layout,
        refresh_policy=policy,
    )
    want = train(tx, params, target, steps=7)

    def step(p, s):
        u, s = tx.update(quadratic_grads(p, target), s, p)
        return optax.apply_updates(p, u), s

    donated = jax.jit(step, donate_argnums=(0, 1))
    p = jax.tree.map(jnp.copy, params)
    s = tx.init(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(7):
            old_p, old_s = p, s
            p, s = donated(p, s)
            # The inputs really were donated: their buffers are gone.
            assert all(x.is_deleted() for x in jax.tree.leaves(old_p))
            assert all(x.is_deleted() for x in jax.tree.leaves(old_s) if x.size)
    assert not [w for w in caught if "donat" in str(w.message).lower()]
    chex.assert_trees_all_equal((p, s), want)


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def test_repeated_runs_with_the_random_criterion_are_bit_identical():
    # (The smallest-|w| criterion is covered by the donation test above, which compares two
    # separately compiled runs, and by test_checkpoint.py.)
    params = random_params(2)
    target = jax.tree.map(lambda x: jnp.full_like(x, -0.2), params)

    def run():
        tx = na.nanoadam(
            0.05,
            density=na.linear_density_decay(0.5, 0.2, decay_steps=6, density_interval=3),
            mask_interval=2,
            criterion="random",
            seed=11,
            scope="block",
            block_size=16,
        )
        return train(tx, params, target, steps=7)  # a fresh optimizer and a fresh compile

    chex.assert_trees_all_equal(run(), run())


def test_random_selection_depends_on_the_seed_and_changes_at_each_refresh():
    params = {"w": jnp.linspace(-1.0, 1.0, 200)}
    masks = {}
    for seed in (0, 1):
        tx = na.magnitude_mask(0.1, mask_interval=1, criterion="random", seed=seed)
        update = jax.jit(tx.update)
        state = tx.init(params)
        for step in range(2):
            u, state = update(jax.tree.map(jnp.ones_like, params), state, params)
            masks[seed, step] = nonzero(u["w"])
            assert masks[seed, step].sum() == 20
    assert not np.array_equal(masks[0, 0], masks[1, 0])
    assert not np.array_equal(masks[0, 0], masks[0, 1])
