"""The library against the numpy reference of the whole algorithm (``reference_nanoadam.py``).

Every test runs the library's jitted ``update`` for tens of steps (30 steps, refresh every
7, random gradients from a fixed seed, the parameters moved by the produced updates, so
the selection follows the training) and, at every step, the reference on the same
gradients and parameters. Each step checks, leaf by leaf: the update's dtype; exact
zeros outside the reference's selection of sparse leaves, non-zeros inside it; and the
values (float32 rtol 1e-5, atol 1e-6). The reference keeps its own inner state (moments,
counts), so a wrong carry-over or reset at a refresh shows up in later steps.

Also here: the exact identities of the specification (``sparse_update(t, density=1.0)``
is ``t`` step for step across refreshes, ``nanoadam(density=1.0)`` is ``optax.adam``),
``jax.vmap`` over densities, and hypothesis properties of the selection and the chunk
layout.

Each configuration compiles once; the long variants run with ``pytest -m slow``.
"""

from __future__ import annotations

import zlib
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference_nanoadam import (
    SPARSE,
    Adam,
    NanoAdamReference,
    SgdMomentum,
    chunk_length,
    leaf_label,
    select_leaf,
)

import nanoadam_jax

slow = pytest.mark.slow
STEPS = 30
INTERVAL = 7
C64 = 64  # a small chunk target: the leaves below have several chunks
RTOL, ATOL = 1e-5, 1e-6

# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def gradients(params: Any, step: int, seed: int = 0) -> Any:
    """Random normal gradients; each leaf's depend only on (seed, step, path)."""
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, x in leaves_with_path:
        if jnp.issubdtype(x.dtype, jnp.floating):
            key = zlib.crc32(jax.tree_util.keystr(path).encode())
            rng = np.random.default_rng([seed, step, key])
            out.append(jnp.asarray(rng.normal(size=x.shape), x.dtype))
        else:
            out.append(jnp.zeros_like(x))
    return jax.tree.unflatten(treedef, out)


def assert_step_matches(updates: Any, want: Any, ref: NanoAdamReference, step: int) -> None:
    """Exact zeros outside the reference selection (non-zeros inside), and values."""
    got_leaves = jax.tree_util.tree_flatten_with_path(updates)[0]
    want_leaves = ref.treedef.flatten_up_to(want)
    for i, ((path, got), expected) in enumerate(zip(got_leaves, want_leaves)):
        where = f"step {step}, leaf {jax.tree_util.keystr(path)}"
        got = np.asarray(got)
        if ref.labels[i] == SPARSE:
            sel = ref.selected[i]
            assert np.all(got[~sel] == 0), f"{where}: unselected entries moved"
            assert np.all(got[sel] != 0), f"{where}: selected entries did not move"
        np.testing.assert_allclose(
            got.astype(np.float64), np.asarray(expected, np.float64), RTOL, ATOL, err_msg=where
        )


def run_against_reference(
    tx: optax.GradientTransformation,
    ref: NanoAdamReference,
    params: Any,
    steps: int = STEPS,
    seed: int = 0,
) -> NanoAdamReference:
    """``steps`` jitted library steps, each checked against the reference."""
    state = tx.init(params)
    ref.init(params)
    update = jax.jit(tx.update)
    for t in range(steps):
        grads = gradients(params, t, seed)
        updates, state = update(grads, state, params)
        chex.assert_trees_all_equal_dtypes(updates, params)
        want = ref.update(grads, params)
        assert_step_matches(updates, want, ref, t)
        params = optax.apply_updates(params, updates)
    return ref


def normal(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.normal(size=shape), jnp.float32)


def chunked_params(seed: int = 0) -> dict[str, Any]:
    """Sparse leaves whose chunks (target 64) take every branch of the chunk rule, a dense
    head and norm, and an integer leaf."""
    rng = np.random.default_rng(seed)
    return {
        "layer": {"kernel": normal(rng, 32, 40), "bias": normal(rng, 40)},
        "tall": normal(rng, 128, 3),
        "emb": normal(rng, 100),
        "odd": normal(rng, 97),
        "head": {"kernel": normal(rng, 40, 5)},
        "norm": {"scale": normal(rng, 40)},
        "step": jnp.asarray(3, jnp.int32),
    }


def small_params(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "layer": {"kernel": normal(rng, 32, 40)},
        "emb": normal(rng, 100),
        "head": {"kernel": normal(rng, 40, 5)},
    }


def test_chunk_rule_on_the_test_leaves():
    """The reference chunk rule gives the chunks these tests rely on (target 64): whole
    trailing axes while they fit (40 of (32, 40)); a divisor of the first axis that keeps
    chunks inside shards on every FSDP mesh of up to 16 devices (24 = 8 x 3 of (128, 3):
    128 / 16 = 8 rows per shard; 5 of (100,): 100 / 20); a plain divisor when no such
    one is long enough (48 = 24 x 2 of (48, 2); 16000 of (160, 200)); the whole axis when
    the divisor is below 64 // 16 (97 is prime); a leaf within the target is one chunk."""
    assert chunk_length((32, 40), C64) == 40
    assert chunk_length((128, 3), C64) == 24
    assert chunk_length((100,), C64) == 5
    assert chunk_length((48, 2), C64) == 48
    assert chunk_length((97,), C64) == 97
    assert chunk_length((40,), C64) == 40
    assert chunk_length((16, 24), C64) == 24
    assert chunk_length((160, 200), 16384) == 16000


# ------------------------------------------------------------------------------------------------
# NanoAdam against the reference
# ------------------------------------------------------------------------------------------------


def test_nanoadam_chunk_scope_keep_policy():
    """``nanoadam`` with ``scope="chunk"`` (explicit), ``chunk_size=64`` and the default
    ``refresh_policy="keep"``: 30 steps, refreshes at 0, 7, 14, 21, 28."""
    tx = nanoadam_jax.nanoadam(
        1e-2, density=0.1, mask_interval=INTERVAL, scope="chunk", chunk_size=C64
    )
    ref = NanoAdamReference(Adam(1e-2), 0.1, INTERVAL, chunk_size=C64)
    ref = run_against_reference(tx, ref, chunked_params())
    assert ref.refresh_steps == [0, 7, 14, 21, 28]


def test_nanoadam_defaults():
    """``nanoadam(lr, density, mask_interval)`` with every other argument at its default:
    ``scope="chunk"`` with ``layout.DEFAULT_CHUNK_SIZE``, ``refresh_policy="keep"``,
    bias correction on. A (160, 200) leaf exceeds the default chunk and has two chunks."""
    c = nanoadam_jax.layout.DEFAULT_CHUNK_SIZE
    rng = np.random.default_rng(3)
    params = {"big": normal(rng, 160, 200), "w": normal(rng, 30, 20), "head": normal(rng, 20)}
    assert chunk_length((160, 200), c) < 160 * 200 or c >= 160 * 200
    tx = nanoadam_jax.nanoadam(1e-2, density=0.05, mask_interval=INTERVAL)
    ref = NanoAdamReference(Adam(1e-2), 0.05, INTERVAL, chunk_size=c)
    run_against_reference(tx, ref, params)


SCOPE_POLICIES = [
    pytest.param("chunk", "reset", id="chunk-reset"),
    pytest.param("leaf", "keep", id="leaf-keep"),
    pytest.param("global", "keep", id="global-keep"),
    pytest.param("leaf", "reset", id="leaf-reset", marks=slow),
    pytest.param("global", "reset", id="global-reset", marks=slow),
]


@pytest.mark.parametrize("scope, policy", SCOPE_POLICIES)
def test_nanoadam_scopes_and_refresh_policies(scope, policy):
    """``scope="leaf"`` (one selection per leaf), ``scope="global"`` (one selection over all
    sparse entries, ties by leaf order then index) and ``refresh_policy="reset"`` (the
    sparse moments and Adam's count restart at every refresh; dense leaves never)."""
    tx = nanoadam_jax.nanoadam(
        1e-2,
        density=0.1,
        mask_interval=INTERVAL,
        scope=scope,
        # chunk_size applies to scope="chunk" only (an error elsewhere).
        chunk_size=C64 if scope == "chunk" else None,
        refresh_policy=policy,
    )
    ref = NanoAdamReference(
        Adam(1e-2), 0.1, INTERVAL, scope=scope, chunk_size=C64, refresh_policy=policy
    )
    run_against_reference(tx, ref, chunked_params(1) if scope == "chunk" else small_params(1))


def test_nanoadamw_with_learning_rate_schedule():
    """``nanoadamw``: ``-lr(t) * (adam + weight_decay * w)`` on selected entries and dense
    leaves, exactly zero elsewhere; the learning-rate schedule is evaluated at the global
    step (not restarted by refreshes)."""
    schedule = optax.linear_schedule(2e-2, 1e-3, STEPS)
    tx = nanoadam_jax.nanoadamw(
        schedule, density=0.1, mask_interval=INTERVAL, weight_decay=0.1, chunk_size=C64
    )
    ref = NanoAdamReference(
        Adam(lambda t: schedule(t), weight_decay=0.1), 0.1, INTERVAL, chunk_size=C64
    )
    run_against_reference(tx, ref, small_params(2))


def test_nanoadam_without_bias_correction():
    """``bias_correction=False``: ``m / (sqrt(v) + eps)``, with the moments carried over by
    the ``keep`` policy."""
    tx = nanoadam_jax.nanoadam(
        1e-2, density=0.1, mask_interval=INTERVAL, bias_correction=False, chunk_size=C64
    )
    ref = NanoAdamReference(Adam(1e-2, bias_correction=False), 0.1, INTERVAL, chunk_size=C64)
    run_against_reference(tx, ref, small_params(3))


@pytest.mark.parametrize(
    "policy, nesterov",
    [
        pytest.param("keep", False, id="keep"),
        pytest.param("reset", False, id="reset", marks=slow),
        pytest.param("keep", True, id="keep-nesterov", marks=slow),
    ],
)
def test_sparse_update_sgd_momentum(policy, nesterov):
    """``sparse_update(optax.sgd(lr, momentum=0.9))``: the momentum trace of an entry
    follows the same keep/reset rule as Adam's moments."""
    tx = nanoadam_jax.sparse_update(
        optax.sgd(1e-2, momentum=0.9, nesterov=nesterov),
        density=0.1,
        mask_interval=INTERVAL,
        chunk_size=C64,
        refresh_policy=policy,
    )
    ref = NanoAdamReference(
        SgdMomentum(1e-2, 0.9, nesterov), 0.1, INTERVAL, chunk_size=C64, refresh_policy=policy
    )
    run_against_reference(tx, ref, chunked_params(4))


def test_density_schedule_refreshes_when_the_density_changes():
    """``linear_density_decay(0.3, 0.1, decay_steps=20, density_interval=5)``: the selection
    is also recomputed when the density changes (steps 5, 10, 15, 20), each time with that
    step's ``k`` per chunk; the buffers hold the schedule's maximum."""
    schedule = nanoadam_jax.linear_density_decay(0.3, 0.1, decay_steps=20, density_interval=5)
    tx = nanoadam_jax.nanoadam(1e-2, density=schedule, mask_interval=INTERVAL, chunk_size=C64)
    ref = NanoAdamReference(Adam(1e-2), schedule, INTERVAL, chunk_size=C64)
    ref = run_against_reference(tx, ref, small_params(5))
    assert ref.refresh_steps == [0, 5, 7, 10, 14, 15, 20, 21, 28]


@pytest.mark.parametrize("form", ["tree", pytest.param("callable", marks=slow)])
def test_stacked_layer_axes(form):
    """``dimension_numbers``: a ``(4, 16, 24)`` stack with selection axes ``(1, 2)`` and a
    ``(16, 3, 24)`` leaf with selection axes ``(0, 2)`` (the middle axis is the batch
    axis) select each layer on its own (chunks of one 24-entry row in each: 16 rows over 16
    devices is a row per shard); ``None`` entries
    keep the default (whole leaf). Given as a tree or as a callable ``params -> tree``."""
    rng = np.random.default_rng(6)
    params = {
        "stack": normal(rng, 4, 16, 24),
        "mid": normal(rng, 16, 3, 24),
        "plain": normal(rng, 32, 40),
        "head": normal(rng, 24, 3),
    }
    sdn = nanoadam_jax.SelectionDimensionNumbers
    tree = {"stack": sdn(axes=(1, 2)), "mid": sdn(axes=(0, 2)), "plain": None, "head": None}
    dims = tree if form == "tree" else (lambda p: tree)
    tx = nanoadam_jax.nanoadam(
        1e-2, density=0.1, mask_interval=INTERVAL, chunk_size=C64, dimension_numbers=dims
    )
    ref = NanoAdamReference(
        Adam(1e-2),
        0.1,
        INTERVAL,
        chunk_size=C64,
        axes={"['stack']": (1, 2), "['mid']": (0, 2)},
    )
    run_against_reference(tx, ref, params)


def test_ties_zeros_infinities_and_nans():
    """Many equal magnitudes (ties by flat index within the chunk, ``-0.0 == +0.0``), NaN
    after ``+-inf`` after every finite value, and a chunk with more NaNs than unselected
    slots (NaNs fill the rest in index order; their update is finite, their parameter
    stays NaN). Unselected NaN and inf entries get exactly zero updates."""
    rng = np.random.default_rng(7)
    ties = rng.choice(np.array([0.5, -0.5, 0.25, -0.25, 0.0, -0.0], np.float32), size=(4, 48))
    nans = rng.normal(size=100).astype(np.float32)
    nans[rng.choice(50, size=5, replace=False)] = np.nan  # first chunk: never selected
    nans[50:] = np.nan  # second chunk: 2 finite, 2 infinite, 46 NaN; k = 5
    nans[[60, 90]] = [0.3, -2.0]
    nans[[70, 55]] = [np.inf, -np.inf]
    params = {"ties": jnp.asarray(ties), "nans": jnp.asarray(nans.reshape(2, 50))}
    assert chunk_length((4, 48), C64) == 48 and chunk_length((2, 50), C64) == 50
    tx = nanoadam_jax.nanoadam(1e-2, density=0.1, mask_interval=INTERVAL, chunk_size=C64)
    ref = NanoAdamReference(Adam(1e-2), 0.1, INTERVAL, chunk_size=C64)
    ref.init(params)
    first = select_leaf(np.asarray(params["nans"]), 0.1, "chunk", C64).reshape(-1)
    # Second chunk (k = 5): the two finite values, both infinities, then the first NaN.
    assert (np.flatnonzero(first[50:]) + 50).tolist() == [50, 55, 60, 70, 90]
    run_against_reference(tx, ref, params)


# ------------------------------------------------------------------------------------------------
# Exact identities
# ------------------------------------------------------------------------------------------------

INNER = {
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "sgd_nesterov": lambda: optax.sgd(1e-2, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
    "rmsprop": lambda: optax.rmsprop(1e-2),
    "adabelief": lambda: optax.adabelief(1e-2),
    "lion": lambda: optax.lion(1e-3),
    "adamax": lambda: optax.adamax(1e-2),
    "amsgrad": lambda: optax.amsgrad(1e-2),
    "yogi": lambda: optax.yogi(1e-2),
}
FAST_INNER = ("sgd_momentum", "adam", "lion", "yogi")


def _identity_params():
    rng = np.random.default_rng(8)
    return {"w": normal(rng, 6, 5), "b": normal(rng, 5), "head": normal(rng, 5, 2)}


def assert_same_trajectory(tx, reference, params, steps=12):
    """``tx`` and ``reference`` give the same updates step for step (each moving its own
    parameters) on the same gradients."""
    p, q = params, params
    s, r = tx.init(params), reference.init(params)
    update, update_ref = jax.jit(tx.update), jax.jit(reference.update)
    for t in range(steps):
        grads = gradients(params, t)
        u, s = update(grads, s, p)
        v, r = update_ref(grads, r, q)
        chex.assert_trees_all_close(u, v, rtol=1e-6, atol=1e-8)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in FAST_INNER else [slow]) for n in INNER]
)
def test_sparse_update_at_density_one_is_the_inner_optimizer(name):
    """``sparse_update(t, density=1.0, mask_interval=3)`` equals ``t`` for 12 steps across
    four refreshes: at density one every entry stays selected, the ``keep`` policy keeps
    every entry's state, and the inner count keeps running."""
    tx = nanoadam_jax.sparse_update(INNER[name](), density=1.0, mask_interval=3)
    assert_same_trajectory(tx, INNER[name](), _identity_params())


@pytest.mark.parametrize(
    "make, reference",
    [
        pytest.param(
            lambda: nanoadam_jax.nanoadam(1e-2, density=1.0, mask_interval=3),
            lambda: optax.adam(1e-2),
            id="nanoadam-adam",
        ),
        pytest.param(
            lambda: nanoadam_jax.nanoadamw(1e-2, density=1.0, mask_interval=3),
            lambda: optax.adamw(1e-2),
            id="nanoadamw-adamw",
        ),
    ],
)
def test_nanoadam_at_density_one_is_optax(make, reference):
    """``nanoadam(lr, density=1.0) == optax.adam(lr)`` and ``nanoadamw(lr, density=1.0) ==
    optax.adamw(lr)`` (default weight decay) step for step across refreshes."""
    assert_same_trajectory(make(), reference(), _identity_params())


def test_vmap_over_densities_equals_the_loop():
    """``jax.vmap`` over densities (optimizer built, state created and updated inside the
    vmapped function, buffers sized by a static ``max_density``) gives, for each density,
    the parameters of a separate run with that density as a Python float."""
    rng = np.random.default_rng(9)
    params = {"w": normal(rng, 40, 5), "head": normal(rng, 5)}
    densities = [0.05, 0.2, 0.5]

    def train(density, max_density):
        tx = nanoadam_jax.nanoadam(
            0.05, density=density, mask_interval=3, chunk_size=C64, max_density=max_density
        )
        p, s = params, tx.init(params)
        for t in range(7):
            u, s = tx.update(gradients(params, t), s, p)
            p = optax.apply_updates(p, u)
        return p

    batched = jax.jit(jax.vmap(lambda d: train(d, 0.5)))(jnp.asarray(densities))
    for i, d in enumerate(densities):
        looped = jax.jit(lambda d=d: train(d, None))()
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], batched), looped, rtol=1e-5, atol=1e-6
        )


# ------------------------------------------------------------------------------------------------
# Properties
# ------------------------------------------------------------------------------------------------

_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture]


def budget(n: int) -> settings:
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=_QUIET,
        print_blob=True,
    )


_shapes = st.lists(st.integers(1, 40), min_size=1, max_size=3).map(tuple)


@budget(300)
@given(shape=_shapes, target=st.integers(1, 200))
def test_chunk_length_matches_the_reference(shape, target):
    """The library's chunk rule (``layout.chunk_length``) equals the reference's, and the
    chunk divides the slice."""
    got = nanoadam_jax.layout.chunk_length(shape, target)
    assert got == chunk_length(shape, target)
    assert int(np.prod(shape)) % got == 0


_MAGNITUDES = [0.0, -0.0, 0.25, -0.25, 0.5, 1.0, -1.0, 2.0, np.inf, -np.inf, np.nan]


@st.composite
def _selection_cases(draw):
    shape = draw(st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple))
    n = int(np.prod(shape))
    values = draw(
        st.lists(
            st.one_of(
                st.sampled_from(_MAGNITUDES),
                st.floats(-3, 3, allow_nan=False, width=32),
            ),
            min_size=n,
            max_size=n,
        )
    )
    w = np.asarray(values, np.float32).reshape(shape)
    density = draw(st.sampled_from([0.01, 0.1, 0.25, 0.3, 0.5, 0.75, 1.0]))
    scope = draw(st.sampled_from(["chunk", "leaf"]))
    chunk = draw(st.sampled_from([4, 8, 16, 64]))
    return w, density, scope, chunk


def _selection_property(n_examples: int):
    @budget(n_examples)
    @given(case=_selection_cases())
    def check(case):
        w, density, scope, chunk = case
        tx = nanoadam_jax.sparse_update(
            optax.sgd(1.0),
            density=density,
            mask_interval=1,
            scope=scope,
            chunk_size=chunk if scope == "chunk" else None,
        )
        params = {"w": jnp.asarray(w)}
        updates, _ = jax.jit(tx.update)({"w": jnp.ones_like(params["w"])}, tx.init(params), params)
        got = np.asarray(updates["w"]) != 0
        want = select_leaf(w, density, scope, chunk)
        np.testing.assert_array_equal(got, want, err_msg=f"{w!r} {density} {scope} {chunk}")

    return check


def test_selection_matches_the_reference():
    """Library selection (which entries move at step 0) equals the reference's on random
    small shapes, densities, chunk targets and scopes, with ties, signed zeros, infinities
    and NaNs among the weights."""
    _selection_property(12)()


@slow
def test_selection_matches_the_reference_long():
    _selection_property(150)()


def test_labels_of_the_test_trees():
    """The reference labels every leaf these tests (and ``test_optax_contract.py``) use as
    the library does: the leaf names control which leaves are sparse, dense or frozen."""
    from test_optax_contract import _trees

    trees = {
        "chunked": chunked_params(),
        "identity": _identity_params(),
        "contract": {k: v for k, v in _trees().items() if v is not None},
    }
    params = chunked_params()
    got = {
        jax.tree_util.keystr(path): leaf_label(path, x)
        for path, x in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    assert got == {
        "['emb']": "sparse",
        "['head']['kernel']": "dense",
        "['layer']['bias']": "sparse",
        "['layer']['kernel']": "sparse",
        "['norm']['scale']": "dense",
        "['odd']": "sparse",
        "['step']": "frozen",
        "['tall']": "sparse",
    }
    for tree in trees.values():
        want = [leaf_label(p, x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
        assert jax.tree.leaves(nanoadam_jax.label_params(tree)) == want
