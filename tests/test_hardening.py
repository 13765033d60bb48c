"""Hardening: bad input, traced arguments, numerical edge cases, donation and determinism.

Every transformation is jitted once per configuration (XLA CPU compiles dominate the run
time); selections are checked against a small numpy reference written from the documented
rule (reference_selection.py): per chunk of ``C`` entries (or per layer matrix, or over all
sparse leaves) the ``k = clip(round_half_up(d * C), 1, C)`` entries with the smallest float32
``|w|``, NaN after everything else, ties broken by position.
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
    ("chunk_size", 0, r"`chunk_size` must be a positive integer"),
    ("chunk_size", -1, r"`chunk_size` must be a positive integer"),
    ("chunk_size", 64.0, r"`chunk_size` must be a positive integer"),
    ("chunk_size", True, r"`chunk_size` must be a positive integer"),
    ("scope", "layer", r"`scope` must be one of \('chunk', 'leaf', 'global'\)"),
    ("scope", None, r"`scope` must be one of"),
    ("scope", "block", r"scope='chunk'.*pass chunk_size="),  # the removed scope says where to go
    ("criterion", "magnitude", r"`criterion` must be one of \('smallest', 'largest', 'random'\)"),
    ("seed", 1.5, r"`seed` must be an integer"),
    ("seed", True, r"`seed` must be an integer"),
    ("layer_axis_names", "layers", r"`layer_axis_names` must be a sequence of axis names"),
    ("layer_axis_names", ("layers", 0), r"`layer_axis_names` must be a sequence of axis names"),
]


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize(("name", "value", "match"), BAD_COMMON, ids=lambda v: repr(v)[:20])
def test_bad_selection_arguments_fail_at_construction(factory, name, value, match):
    with pytest.raises(ValueError, match=match):
        FACTORIES[factory](**{name: value})


BAD_SPARSE = [
    ("refresh_policy", "zero", r"`refresh_policy` must be one of \('keep', 'reset'\)"),
    ("max_density", 0.0, r"`max_density` must be in \(0, 1\]"),
    ("max_density", 1.5, r"`max_density` must be in \(0, 1\]"),
    ("moment_dtype", jnp.int32, r"`moment_dtype` must be a floating dtype"),
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
    for scope in ("leaf", "global"):
        with pytest.raises(ValueError, match=r"`chunk_size` applies to scope='chunk' only"):
            na.nanoadam(1e-3, scope=scope, chunk_size=64)
    na.sparse_update(optax.scale_by_adam(), scope="global")  # no layout argument needed


@pytest.mark.parametrize("factory", sorted(FACTORIES))
@pytest.mark.parametrize(
    "name", ["block_size", "state_layout", "narrow_indices", "selection_method", "inplace_apply"]
)
def test_removed_arguments_are_refused(factory, name):
    # Removed in the chunked rewrite: never silently accepted (and ignored).
    with pytest.raises(TypeError, match=name):
        FACTORIES[factory](**{name: None})


def test_layer_axis_names_none_is_refused_by_name():
    with pytest.raises(ValueError, match=r"`layer_axis_names` must be a sequence of axis names"):
        na.nanoadam(1e-3, layer_axis_names=None)


@pytest.mark.parametrize("factory", sorted(SPARSE_FACTORIES))
def test_max_density_below_the_density_is_refused_at_init(factory):
    tx = SPARSE_FACTORIES[factory](density=0.1, max_density=0.05)
    with pytest.raises(ValueError, match=r"`max_density`=0.05 is below the density's largest"):
        tx.init({"w": jnp.ones(40)})
    sched = na.linear_density_decay(0.05, 0.2, decay_steps=10)
    with pytest.raises(ValueError, match=r"below the density's largest value 0.2"):
        SPARSE_FACTORIES[factory](density=sched, max_density=0.1).init({"w": jnp.ones(40)})


@pytest.mark.parametrize(
    ("dims", "match"),
    [
        (na.SelectionDimensionNumbers(axes=(5,)), r"for \['w'\] \(shape \(3, 4\)\) must name"),
        (na.SelectionDimensionNumbers(axes=()), r"must name at least one valid axis"),
        ((1, 2), r"must be a SelectionDimensionNumbers, a tree of them"),
        ({"v": None}, r"structure of the parameters"),
        (lambda path, leaf: (0, 1), r"for \['w'\] must be a SelectionDimensionNumbers or None"),
    ],
    ids=["axis-out-of-range", "no-axis", "tuple", "wrong-tree", "callable-bad-value"],
)
@pytest.mark.parametrize("factory", ["nanoadam", "magnitude_mask"])
def test_bad_dimension_numbers_are_refused_at_init(factory, dims, match):
    tx = FACTORIES[factory](dimension_numbers=dims)
    with pytest.raises(ValueError, match=match):
        tx.init({"w": jnp.ones((3, 4))})


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
def test_schedule_out_of_range_is_refused_before_the_first_update(schedule):
    # The schedule is probed (schedules.schedule_max) when the state is created.
    for name, factory in FACTORIES.items():
        with pytest.raises(ValueError, match=r"the `density` schedule must return a scalar"):
            factory(density=schedule).init({"w": jnp.ones(8)})
            pytest.fail(f"{name}: init accepted the schedule")


def test_schedule_out_of_range_is_refused_with_the_global_scope_too():
    accepted = []
    for name, factory in FACTORIES.items():
        try:
            factory(density=lambda t: 1.5, scope="global").init({"w": jnp.ones(8)})
        except ValueError as e:
            assert "the `density` schedule must return a scalar in" in str(e), (name, e)
        else:
            accepted.append(name)
    assert not accepted, f"init with scope='global' accepted a schedule returning 1.5: {accepted}"


def test_schedule_checked_only_at_probe_steps():
    # The schedule is probed at every step up to 1000, then every 100th: a value out of
    # range strictly between two probes is not seen at init. At run time it is clipped by
    # the rounding rule like any traced density (here 0.0 -> one entry per leaf).
    sched = lambda t: jnp.where((t > 1000) & (t < 1100), 0.0, 0.1)
    params = {"w": jnp.linspace(-1.0, 1.0, 40)}
    for tx in (na.magnitude_mask(sched, mask_interval=5000), na.nanoadam(1.0, sched, 5000)):
        update = jax.jit(tx.update)
        state = tx.init(params)
        counter = "mask_step" if isinstance(state, na.MagnitudeMaskState) else "sparse_step"
        start = {counter: jnp.asarray(999, jnp.int32)}
        state = state._replace(**start) if counter == "mask_step" else (state[0]._replace(**start),)
        for step in (999, 1000, 1001, 1002):
            u, state = update(params, state, params)
            assert nonzero(u["w"]).sum() == (1 if step > 1000 else 4), step


def test_schedule_above_its_max_density_attribute_is_capped_at_the_capacity():
    def sched(step):
        return jnp.asarray(0.5, jnp.float32)

    sched.max_density = 0.1  # wrong: the state is sized for 10% of each chunk
    params = {"w": jnp.asarray(np.random.default_rng(0).permutation(np.linspace(-1, 1, 40)))}
    tx = na.nanoadam(1.0, density=sched)
    state = tx.init(params)
    assert state[0].selected["w"].shape == (4,)
    u, _ = jax.jit(tx.update)({"w": jnp.ones(40)}, state, params)
    # Never a silently larger state: the 4 smallest entries, not 20.
    np.testing.assert_array_equal(nonzero(u["w"]), ref_mask(params["w"], 0.1))


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


@pytest.mark.parametrize(
    ("scope", "max_density"), [("chunk", 1.0), ("global", None), ("chunk", None)]
)
def test_injected_density_out_of_range_is_clipped(scope, max_density):
    """A traced density is clipped by the rounding rule: ``d <= 0`` trains one entry per chunk,
    ``d >= 1`` trains every entry the state can hold, and NaN trains none (the sparse leaves
    get zero updates; dense leaves are still updated). The compact state holds ``k`` of
    ``max_density`` (here 1.0: every entry), else of the density at init (0.1); the global
    scope's state is full-size."""
    params = random_params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optax.inject_hyperparams(na.nanoadam, static_args=("max_density", "scope"))(
        learning_rate=1.0, density=0.1, mask_interval=1, scope=scope, max_density=max_density
    )
    state = tx.init(params)
    update = jax.jit(tx.update)
    sizes = {"kernel": 120, "bias": 10}
    capacity = {name: (n if max_density else ref_k(n, 0.1)) for name, n in sizes.items()}
    for d, expect in [(-0.5, 1), (0.0, 1), (1.0, None), (2.0, None), (np.inf, None), (np.nan, 0)]:
        state.hyperparams["density"] = jnp.asarray(d, jnp.float32)
        u, _ = update(grads, state, params)
        if scope == "global":  # one selection over the 130 sparse entries
            got = sum(nonzero(u["dense_0"][name]).sum() for name in sizes)
            assert got == {1: 1, None: 130, 0: 0}[expect], d
        else:
            for name in sizes:
                want = capacity[name] if expect is None else expect
                assert nonzero(u["dense_0"][name]).sum() == want, (d, name)
        assert nonzero(u["head"]["kernel"]).all()


def test_injected_density_above_max_density_keeps_the_smallest():
    params = {"w": jnp.linspace(-1.0, 1.0, 21)}
    grads = {"w": jnp.ones(21)}
    tx = optax.inject_hyperparams(na.nanoadam, static_args=("max_density", "mask_interval"))(
        learning_rate=1.0, density=0.1, max_density=0.2
    )
    state = tx.init(params)
    assert state.inner_state[0].selected["w"].shape == (ref_k(21, 0.2),)
    state.hyperparams["density"] = jnp.asarray(0.5, jnp.float32)
    u, _ = jax.jit(tx.update)(grads, state, params)
    # Capped at the capacity (k of max_density), and the updated entries are the smallest.
    np.testing.assert_array_equal(nonzero(u["w"]), ref_mask(params["w"], 0.2))


def test_traced_chunk_size_at_init_gives_a_clear_error():
    # chunk_size shapes the state: traced when the state is created (init under jit with
    # inject_hyperparams), it must be refused by name, pointing at static_args.
    params = {"w": jnp.linspace(-1.0, 1.0, 40)}
    tx = optax.inject_hyperparams(na.nanoadam, static_args=("density",))(
        learning_rate=0.1, density=0.1, chunk_size=8
    )
    with pytest.raises(ValueError, match=r"`chunk_size` is traced when the state is created"):
        jax.jit(tx.init)(params)


def test_traced_max_density_at_init_and_injected_chunk_size_after_init():
    params = {"w": jnp.linspace(-1.0, 1.0, 40)}
    tx = optax.inject_hyperparams(na.nanoadam, static_args=("density",))(
        learning_rate=0.1, density=0.1, max_density=0.5
    )
    with pytest.raises(ValueError, match=r"`max_density` is traced at init"):
        jax.jit(tx.init)(params)
    # Once the state exists, an injected chunk_size is harmless: the chunking is read
    # back from the state.
    tx = optax.inject_hyperparams(na.nanoadam)(learning_rate=0.1, density=0.1, chunk_size=8)
    state = tx.init(params)
    u, _ = jax.jit(tx.update)(params, state, params)
    np.testing.assert_array_equal(nonzero(u["w"]), ref_mask(params["w"], 0.1, "chunk", 8))


def test_traced_mask_interval_zero_still_selects_exactly_k():
    # A traced mask_interval cannot be checked; an invalid value (0) must not crash nor
    # break the exact-k invariant (XLA defines ``x % 0`` as implementation-specific, so
    # only the invariant is tested, not the refresh steps).
    params = {"w": jnp.linspace(-1.0, 1.0, 11)}
    tx = optax.inject_hyperparams(na.nanoadam)(learning_rate=0.1, density=0.2, mask_interval=3)
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
    ("scope", "policy"),
    [("leaf", "reset"), ("chunk", "keep"), ("leaf", "keep"), ("global", "reset")],
)
def test_degenerate_leaves(scope, policy):
    params = DEGENERATE
    density = 0.1
    chunks = {"chunk_size": 2} if scope == "chunk" else {}
    tx = na.nanoadam(
        1.0, density=density, mask_interval=1, scope=scope, refresh_policy=policy, **chunks
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
    if scope == "chunk":  # "tiny" (3 entries, prime) is cut into chunks of 1: all selected
        assert want["tiny"].all()
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


@pytest.mark.parametrize("factory", ["nanoadam", "magnitude_mask"])
def test_layer_axis_of_length_zero(factory):
    # A stack of zero layers: init accepts it; update has nothing to select in it.
    params = {"w": jnp.zeros((0, 3)), "v": jnp.asarray([0.1, -2.0, 0.3, 4.0])}
    dims = {"w": na.SelectionDimensionNumbers(axes=(1,)), "v": None}
    tx = FACTORIES[factory](density=0.5, dimension_numbers=dims)
    state = tx.init(params)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
    assert u["w"].shape == (0, 3)
    np.testing.assert_array_equal(nonzero(u["v"]), [True, False, True, False])


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
def test_nan_weights_are_never_selected_while_others_remain(criterion):
    x = jnp.asarray(SPECIAL)
    n, n_nan = x.size, int(np.isnan(SPECIAL).sum())
    densities = (0.1, 0.3, 0.8, 0.9, 1.0)

    @jax.jit
    def masks(x):
        key = jax.random.PRNGKey(3)
        return [na.select_mask(x, d, criterion=criterion, key=key) for d in densities]

    # The optimizer's own path (positions per chunk): one compile, the density injected.
    tx = optax.inject_hyperparams(na.sparse_update, static_args=("criterion", "max_density"))(
        optax.sgd(1.0), density=0.1, criterion=criterion, max_density=1.0
    )
    state, update = tx.init({"w": x}), jax.jit(tx.update)
    for d, mask in zip(densities, masks(x)):
        state.hyperparams["density"] = jnp.asarray(d, jnp.float32)
        u, state = update({"w": jnp.ones(n)}, state, {"w": x})
        for m in (np.asarray(mask), nonzero(u["w"])):
            k = ref_k(n, d)
            assert m.sum() == k
            if k <= n - n_nan:
                assert not m[np.isnan(SPECIAL)].any()
            else:
                assert m[~np.isnan(SPECIAL)].all()
            if criterion != "random":
                np.testing.assert_array_equal(m, ref_mask(SPECIAL, d, criterion=criterion))


@pytest.mark.parametrize("scope", ["leaf", "chunk", "global"])
def test_all_nan_leaf_selects_exactly_k_in_index_order_and_terminates(scope):
    params = {"a": jnp.full((7, 3), jnp.nan), "b": jnp.asarray([np.nan, 1.0, np.inf, np.nan])}
    chunks = {"chunk_size": 5} if scope == "chunk" else {}
    tx = na.nanoadam(1.0, density=0.3, scope=scope, **chunks)
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


@pytest.mark.parametrize("scope", ["chunk", "global"])
def test_non_finite_gradient_outside_the_mask_does_not_leak(scope):
    params = {"w": jnp.asarray([0.5, 3.0, -0.1, 4.0, 0.2, -5.0])}
    grads = {"w": jnp.asarray([1.0, np.nan, 1.0, np.inf, 1.0, -np.inf])}
    tx = na.nanoadam(1.0, density=0.5, scope=scope)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    np.testing.assert_array_equal(nonzero(u["w"]), [True, False, True, False, True, False])
    assert np.isfinite(np.asarray(u["w"])).all()
    for moment in (state[0].sparse_inner_state.mu["w"], state[0].sparse_inner_state.nu["w"]):
        assert np.isfinite(np.asarray(moment)).all()


@pytest.mark.parametrize("scope", ["chunk", "global"])
def test_apply_if_finite_skipped_step_leaves_mask_counters_and_moments(scope):
    rng = np.random.default_rng(0)
    params = {
        "w": jnp.asarray(rng.permutation(np.linspace(-1.0, 1.0, 16)), jnp.float32),
        "head": {"kernel": jnp.ones(3)},
    }
    tx = optax.apply_if_finite(
        na.nanoadam(0.1, density=0.25, mask_interval=2, scope=scope),
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


@pytest.mark.parametrize(("dtype", "scope"), [(jnp.bfloat16, "chunk"), (jnp.float16, "global")])
def test_half_precision_heavy_ties(dtype, scope):
    x = _tied_values(dtype, 100, seed=1)
    densities = (0.01, 0.37, 0.93)

    @jax.jit
    def masks(x):
        out = []
        for d in densities:
            out.append(na.select_mask(x, d))
            out.append(na.select_mask(x, d, chunk_size=10))
        return out

    got = masks(x)
    for i, d in enumerate(densities):
        np.testing.assert_array_equal(got[2 * i], ref_mask(x, d), err_msg=f"leaf {d}")
        np.testing.assert_array_equal(got[2 * i + 1], ref_mask(x, d, "chunk", 10))
    # Through the optimizer: updates keep the half dtype and hit exactly the reference set.
    params = {"w": x.reshape(100, 1), "ln": {"scale": jnp.ones(4, dtype)}}
    tx = na.nanoadam(1.0, density=0.37, scope=scope)
    u, _ = jax.jit(tx.update)(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    chex.assert_trees_all_equal_dtypes(u, params)
    np.testing.assert_array_equal(nonzero(u["w"]), ref_mask(params["w"], 0.37))


@pytest.mark.parametrize("scope", ["chunk", "global"])
def test_bf16_params_with_f32_gradients(scope):
    params = {"w": jnp.linspace(-1.0, 1.0, 10).astype(jnp.bfloat16)}
    grads = {"w": jnp.ones(10, jnp.float32)}
    tx = na.nanoadam(0.1, density=0.3, mask_interval=2, scope=scope)
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
    # "ln" is a norm (dense by default): "w" is the only sparse leaf, and it is one chunk,
    # so the compact state ("chunk") and one selection over all sparse leaves ("global",
    # full-size state) must agree.
    params = {"w": jnp.asarray(w), "ln": jnp.asarray(w[0], jnp.float32),
              "head": {"kernel": jnp.asarray(w[:2])}}
    assert params["w"].dtype == jnp.float64
    sched = na.linear_density_decay(0.5, 0.2, decay_steps=4, density_interval=2)
    finals = {}
    for scope in ("chunk", "global"):
        tx = na.nanoadam(0.1, density=sched, mask_interval=3, scope=scope)
        state, p = tx.init(params), params
        update = jax.jit(tx.update)
        for t in range(5):
            u, state = update(jax.tree.map(lambda x: x - 1.0, p), state, p)
            assert u["w"].dtype == jnp.float64 and u["head"]["kernel"].dtype == jnp.float64
            assert u["ln"].dtype == jnp.float32
            assert int(jnp.sum(u["w"] != 0)) == int(na.num_selected(42, sched(t))), t
            p = optax.apply_updates(p, u)
        s = state[0]
        assert s.sparse_step.dtype == jnp.int32 and s.sparse_density.dtype == jnp.float32
        assert s.sparse_inner_state.mu["w"].dtype == jnp.float64
        assert s.dense_inner_state.nu["ln"].dtype == jnp.float32
        if scope != "global":
            assert s.selected["w"].dtype == jnp.uint16 and s.selected["w"].shape == (21,)
        finals[scope] = p
    np.testing.assert_allclose(finals["chunk"]["w"], finals["global"]["w"], rtol=1e-14)
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


# ------------------------------------------------------------------------------------------------
# Buffer donation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("scope", "policy"), [("chunk", "reset"), ("global", "keep")])
def test_donating_params_and_state_is_safe(scope, policy):
    params = random_params(1)
    target = jax.tree.map(lambda x: x * 0.0 + 0.3, params)
    tx = na.nanoadamw(
        0.05,
        density=na.linear_density_decay(0.4, 0.1, decay_steps=4, density_interval=2),
        mask_interval=3,
        scope=scope,
        refresh_policy=policy,
        **({"chunk_size": 32} if scope == "chunk" else {}),
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
            chunk_size=16,
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
