"""optax's contract for optimizers, held against ``nanoadam``, ``nanoadamw`` and ``sparse_update``.

optax runs one generic suite over its contributed optimizers (``optax/contrib/_common_test.py``):
extra keyword arguments are accepted, a jitted step does not recompile on its second call,
``optax.tree_utils.tree_map_params`` works on the state, ``optax.inject_hyperparams`` gives
the same updates and state, updates keep the parameters' dtype and the state keeps its
types across steps, ``optax.MultiSteps`` works, learning-rate schedules are accepted, and
the optimizer converges on small targets. This file holds NanoAdam to the same contract
(own code), at ``density=1.0`` (where it must behave like the wrapped optimizer) and at a
density below one (everything but convergence), and adds what a sparse optimizer needs:

* parameter trees of every shape users pass (a bare array, a scalar, nested containers,
  ``None`` leaves as in Equinox ``filter`` trees, ``{}``, trees without a dense or without a
  sparse leaf, integer leaves);
* state sized from the density known at ``init`` (also through ``inject_hyperparams`` and
  density schedules), with larger traced densities capped at that capacity;
* optax wrappers (``MultiSteps``, ``apply_if_finite``, ``chain``, ``partition``,
  ``masked``) that cost no more state and, where they are no-ops, change no update.

Each configuration compiles once; the full optimizer x density x dtype product runs with
``pytest -m slow``.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_nanoadam import chunk_length, leaf_label, num_selected

import nanoadam_jax

slow = pytest.mark.slow

# ------------------------------------------------------------------------------------------------
# Optimizers under test
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Case:
    """One optimizer under test.

    ``make(learning_rate, density, mask_interval)`` builds it; ``factory`` and
    ``hparams(learning_rate, density, mask_interval)`` are what ``inject_hyperparams``
    wraps; ``lr`` and ``steps`` converge on the targets below.
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    factory: Callable[..., Callable[..., optax.GradientTransformation]]
    hparams: Callable[..., dict[str, Any]]
    lr: float
    steps: int = 8_000


def _alias_case(name: str, fn: Callable[..., Any], lr: float, steps: int = 3_000) -> Case:
    return Case(
        name=name,
        make=lambda learning_rate, density, mask_interval: fn(
            learning_rate, density=density, mask_interval=mask_interval
        ),
        factory=lambda learning_rate: fn,
        hparams=lambda learning_rate, density, mask_interval: dict(
            learning_rate=learning_rate, density=density, mask_interval=mask_interval
        ),
        lr=lr,
        steps=steps,
    )


def _wrapped_case(
    name: str,
    base: Callable[[float], optax.GradientTransformation],
    lr: float,
    steps: int = 8_000,
) -> Case:
    return Case(
        name=f"sparse_update({name})",
        make=lambda learning_rate, density, mask_interval: nanoadam_jax.sparse_update(
            base(learning_rate), density=density, mask_interval=mask_interval
        ),
        factory=lambda learning_rate: functools.partial(
            nanoadam_jax.sparse_update, base(learning_rate)
        ),
        hparams=lambda learning_rate, density, mask_interval: dict(
            density=density, mask_interval=mask_interval
        ),
        lr=lr,
        steps=steps,
    )


CASES = {
    c.name: c
    for c in (
        _alias_case("nanoadam", nanoadam_jax.nanoadam, 1e-2),
        _alias_case("nanoadamw", nanoadam_jax.nanoadamw, 1e-2),
        _wrapped_case("adam", optax.adam, 1e-2),
        _wrapped_case("sgd_momentum", lambda lr: optax.sgd(lr, momentum=0.9), 1e-3),
        _wrapped_case("lion", lambda lr: optax.lion(lr, b1=0.99), 1e-3, steps=20_000),
        _wrapped_case("rmsprop", optax.rmsprop, 1e-2),
        _wrapped_case("adabelief", optax.adabelief, 1e-2),
    )
}
#: The cases run by default in every test; the others run there only with ``-m slow``
#: (except where a test lists more defaults).
CORE = ("nanoadam", "sparse_update(sgd_momentum)")


def case_params(densities=(0.1, 1.0), default=CORE, default_densities=(0.1, 1.0), extra=()):
    """``(case name, density)`` parameters: the ``default`` cases at ``default_densities``
    and the ``extra`` ``(name, density)`` pairs run by default, every other combination
    is marked slow."""
    out = []
    for name in CASES:
        for d in densities:
            fast = (name in default and d in default_densities) or (name, d) in extra
            out.append(pytest.param(name, d, id=f"{name}-d{d}", marks=[] if fast else [slow]))
    return out


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------


def state_entries(state: Any) -> int:
    """Number of array entries in a state (what it costs in memory, per element)."""
    return sum(int(np.size(x)) for x in jax.tree.leaves(state))


def random_like(params: Any, seed: int) -> Any:
    """Random normal gradients (zeros of the same dtype for non-float leaves).

    Each leaf's values depend only on ``seed`` and the leaf's path, so a subtree of the
    parameters gets the same gradients as in the whole tree.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for path, x in leaves_with_path:
        dtype = jnp.asarray(x).dtype
        if jnp.issubdtype(dtype, jnp.floating):
            key = zlib.crc32(jax.tree_util.keystr(path).encode())
            rng = np.random.default_rng([seed, key])
            out.append(jnp.asarray(rng.normal(size=np.shape(x)), dtype))
        else:
            out.append(jnp.zeros_like(x))
    return jax.tree.unflatten(treedef, out)


def default_chunk_size() -> int:
    """The library's default chunk target (``scope="chunk"``)."""
    from nanoadam_jax import layout

    return int(layout.DEFAULT_CHUNK_SIZE)


def chunked_capacity(shape: tuple[int, ...], density: float, chunk_size: int) -> int:
    """Entries selected in a leaf of this shape at this density (one slice, chunked)."""
    n = int(np.prod(shape))
    c = chunk_length(shape, chunk_size)
    return (n // c) * num_selected(c, density)


def setup_parabola(dtype):
    initial = jnp.array([-1.0, 10.0, 1.0], dtype=dtype)
    final = jnp.array([1.0, -1.0, 1.0], dtype=dtype)
    return initial, final, lambda p: jnp.sum(jnp.square(p - final))


def setup_rosenbrock(dtype):
    initial = jnp.array([0.0, 0.0], dtype=dtype)
    final = jnp.array([1.0, 1.0], dtype=dtype)
    return initial, final, lambda p: jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - p[0] ** 2)


def setup_matrix(dtype):
    initial = jnp.zeros((2, 2), dtype=dtype)
    final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype=dtype)
    return initial, final, lambda p: jnp.sum(jnp.square(p - final))


def setup_mixed(dtype):
    initial = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))
    final = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))

    def objective(p):
        return jnp.sum(jnp.square(p[0] - final[0])) + jnp.sum(jnp.square(p[1] - final[1]))

    return initial, final, objective


TARGETS = {
    "parabola": setup_parabola,
    "rosenbrock": setup_rosenbrock,
    "matrix": setup_matrix,
    "mixed": setup_mixed,
}

# ------------------------------------------------------------------------------------------------
# Extra arguments, recompilation, tree_map_params
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, density", case_params(default=tuple(CASES), default_densities=(0.1,))
)
def test_extra_args_no_recompilation_and_tree_map_params(name, density):
    """``update`` accepts unknown keyword arguments; the jitted step traces and compiles
    once (the state coming out of ``update`` has exactly the types of ``init``'s);
    ``tree_map_params`` with the identity leaves the state unchanged and usable."""
    opt = CASES[name].make(1e-3, density, 3)
    params, _, objective = setup_rosenbrock(jnp.float32)
    traces = []

    @jax.jit
    def step(params, state):
        traces.append(None)
        value, grads = jax.value_and_grad(objective)(params)
        updates, state = opt.update(
            grads, state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1, value=value
        )
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    mapped = optax.tree_utils.tree_map_params(opt, lambda v: v, state)
    chex.assert_trees_all_equal_structs(mapped, state)
    chex.assert_trees_all_equal(mapped, state)
    mapped = optax.tree_utils.tree_map_params(
        opt, lambda v: v, state, transform_non_params=lambda v: v
    )
    chex.assert_trees_all_equal(mapped, state)

    for _ in range(4):  # across a refresh (mask_interval=3)
        params, mapped = step(params, mapped)
    assert len(traces) == 1, "the step was traced again on a later call"
    assert step._cache_size() == 1, "the step was compiled again on a later call"
    chex.assert_tree_all_finite(params)


# ------------------------------------------------------------------------------------------------
# inject_hyperparams
# ------------------------------------------------------------------------------------------------


def _inject_params():
    rng = np.random.default_rng(0)
    return {
        "w": [jnp.asarray(rng.normal(size=(2, 3)), jnp.float32), jnp.ones((2, 5, 2))],
        "head": {"kernel": jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
    }


@pytest.mark.parametrize(
    "name, density",
    case_params(
        default=("nanoadam",),
        extra=(("sparse_update(sgd_momentum)", 0.1), ("sparse_update(lion)", 0.1)),
    ),
)
def test_inject_hyperparams_same_updates_and_state(name, density):
    """``inject_hyperparams(factory)(**hparams)`` (every numeric argument injected, hence
    traced in ``update``) gives the same updates and the same state leaves, shapes and
    dtypes as the plain optimizer over steps across refreshes; its inner state is sized
    from the density given at (eager) ``init``, exactly as the plain state."""
    case = CASES[name]
    opt = case.make(0.1, density, 2)
    opt_inject = optax.inject_hyperparams(case.factory(0.1))(**case.hparams(0.1, density, 2))
    params = _inject_params()

    state = opt.init(params)
    state_inject = opt_inject.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state_inject.inner_state, state)
    assert state_entries(state_inject.inner_state) == state_entries(state)

    update = jax.jit(opt.update)
    update_inject = jax.jit(opt_inject.update)
    for t in range(5):
        grads = random_like(params, t)
        updates, state = update(grads, state, params)
        updates_inject, state_inject = update_inject(grads, state_inject, params)
        chex.assert_trees_all_close(updates_inject, updates, rtol=1e-5, atol=1e-7)
        chex.assert_trees_all_equal_shapes_and_dtypes(state_inject.inner_state, state)
        chex.assert_trees_all_close(state_inject.inner_state, state, rtol=1e-5, atol=1e-7)
        params = optax.apply_updates(params, updates)


def test_inject_hyperparams_with_jitted_init_and_static_max_density():
    """Under a jitted ``init`` the injected density is traced, so its value cannot size the
    buffers; with a static ``max_density`` equal to it the state has the plain state's
    shapes and the updates are the plain optimizer's."""
    opt = nanoadam_jax.nanoadam(0.1, density=0.1, mask_interval=2)
    opt_inject = optax.inject_hyperparams(nanoadam_jax.nanoadam, static_args=("max_density",))(
        learning_rate=0.1, density=0.1, mask_interval=2, max_density=0.1
    )
    params = _inject_params()
    state, state_inject = opt.init(params), jax.jit(opt_inject.init)(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(state_inject.inner_state, state)
    update, update_inject = jax.jit(opt.update), jax.jit(opt_inject.update)
    for t in range(3):
        grads = random_like(params, t)
        updates, state = update(grads, state, params)
        updates_inject, state_inject = update_inject(grads, state_inject, params)
        chex.assert_trees_all_close(updates_inject, updates, rtol=1e-5, atol=1e-7)
        params = optax.apply_updates(params, updates)


# ------------------------------------------------------------------------------------------------
# dtypes
# ------------------------------------------------------------------------------------------------

DTYPES = ("bfloat16", "float16", "float32", "float64")


def dtype_params():
    out = []
    for name in CASES:
        for dtype in DTYPES:
            core = name == "nanoadam" or (name in CORE and dtype in ("bfloat16", "float32"))
            out.append(
                pytest.param(name, dtype, id=f"{name}-{dtype}", marks=[] if core else [slow])
            )
    return out


@pytest.mark.parametrize("name, dtype", dtype_params())
def test_updates_keep_param_dtype_and_state_types_are_stable(name, dtype):
    """Parameters of each float dtype (float64 under ``jax.enable_x64``) get updates of
    that dtype, on sparse and dense leaves; the state that ``update`` returns has the
    types of ``init``'s (both branches of a ``lax.cond`` accept it), over two steps."""
    dtype = jnp.dtype(dtype)
    with jax.enable_x64(dtype == jnp.float64):
        opt = CASES[name].make(1e-3, 0.5, 3)
        params = {
            "w": jnp.array([1.0, 2.0, -3.0, 0.5], dtype=dtype),
            "head": jnp.array([1.0, -2.0], dtype=dtype),
        }
        objective = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["head"] ** 2)

        @jax.jit
        def step(params, state):
            grads = jax.grad(objective)(params)
            # A predicate XLA cannot fold: both branches must produce the same types.
            pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, state = jax.lax.cond(
                pred, lambda: opt.update(grads, state, params), lambda: (params, state)
            )
            return updates, optax.apply_updates(params, updates), state

        state = opt.init(params)
        for _ in range(2):
            updates, params, new_state = step(params, state)
            for leaf in jax.tree.leaves(updates) + jax.tree.leaves(params):
                assert leaf.dtype == dtype, (leaf.dtype, dtype)
            pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            state = jax.lax.cond(pred, lambda: state, lambda: new_state)


# ------------------------------------------------------------------------------------------------
# MultiSteps and learning-rate schedules
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name, density", case_params(default_densities=(0.1,)))
def test_multisteps_first_updates_are_zero(name, density, dtype):
    """Inside ``optax.MultiSteps(every_k_schedule=4)`` the first (accumulating) update is
    exactly zero in the parameters' dtype."""
    dtype = jnp.dtype(dtype)
    opt = optax.MultiSteps(CASES[name].make(1e-3, density, 3), every_k_schedule=4)
    params = jnp.array([1.0, 2.0], dtype=dtype)
    grads = jax.grad(lambda x: jnp.sum(x**2))(params)
    state = jax.jit(opt.init)(params)
    updates, _ = jax.jit(opt.update)(grads, state, params)
    chex.assert_trees_all_equal(updates, jnp.zeros_like(grads))
    assert updates.dtype == dtype


@pytest.mark.parametrize("name, density", case_params(default_densities=(0.1,)))
def test_constant_schedule_equals_float_learning_rate(name, density):
    """A constant learning-rate schedule gives the same parameters as the same float
    (schedules are accepted wherever a float is)."""
    case = CASES[name]
    params0, _, objective = setup_parabola(jnp.float32)
    out = []
    for lr in (optax.constant_schedule(1e-3), 1e-3):
        opt = case.make(lr, density, 3)

        @jax.jit
        def step(params, state, opt=opt):
            updates, state = opt.update(jax.grad(objective)(params), state, params)
            return optax.apply_updates(params, updates), state

        params, state = params0, opt.init(params0)
        for _ in range(10):
            params, state = step(params, state)
        out.append(params)
    chex.assert_trees_all_close(out[0], out[1], rtol=1e-6)


@pytest.mark.parametrize(
    "make, reference",
    [
        pytest.param(nanoadam_jax.nanoadam, optax.adam, id="nanoadam"),
        pytest.param(nanoadam_jax.nanoadamw, optax.adamw, id="nanoadamw"),
    ],
)
def test_learning_rate_schedule_follows_the_step_at_density_one(make, reference):
    """At ``density=1.0`` with a decaying learning-rate schedule, 12 steps across
    refreshes (``mask_interval=3``) equal the optax optimizer with the same schedule:
    the schedule is evaluated at the global step, never restarted by a refresh."""
    schedule = optax.linear_schedule(0.1, 0.01, 12)
    opt, ref = make(schedule, density=1.0, mask_interval=3), reference(schedule)
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "head": jnp.ones(3)}
    p_ref, state, state_ref = params, opt.init(params), ref.init(params)
    update, update_ref = jax.jit(opt.update), jax.jit(ref.update)
    for t in range(12):
        grads = random_like(params, t)
        updates, state = update(grads, state, params)
        updates_ref, state_ref = update_ref(grads, state_ref, p_ref)
        chex.assert_trees_all_close(updates, updates_ref, rtol=1e-5, atol=1e-7)
        params, p_ref = (
            optax.apply_updates(params, updates),
            optax.apply_updates(p_ref, updates_ref),
        )


# ------------------------------------------------------------------------------------------------
# Convergence at density 1.0
# ------------------------------------------------------------------------------------------------


def convergence_params():
    out = []
    for name in CASES:
        for target in TARGETS:
            marks = [] if name == "nanoadam" else [slow]
            out.append(pytest.param(name, target, id=f"{name}-{target}", marks=marks))
    return out


@pytest.mark.parametrize("name, target", convergence_params())
def test_converges_at_density_one(name, target):
    """At ``density=1.0`` (every entry selected, refreshed every 10 steps) the optimizer
    reaches the minimum of optax's targets (parabola, Rosenbrock, matrix, mixed tree)
    within optax's tolerance, with ``tree_map_params`` applied to the state first."""
    case = CASES[name]
    opt = case.make(case.lr, 1.0, 10)
    params, final, objective = TARGETS[target](jnp.float32)
    state = opt.init(params)
    state = optax.tree_utils.tree_map_params(opt, lambda v: v, state)

    def body(carry, _):
        params, state = carry
        updates, state = opt.update(jax.grad(objective)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    run = jax.jit(lambda c: jax.lax.scan(body, c, length=case.steps))
    (params, _), _ = run((params, state))
    chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


# ------------------------------------------------------------------------------------------------
# Parameter trees
# ------------------------------------------------------------------------------------------------


def _trees():
    rng = np.random.default_rng(1)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)

    return {
        "array": jnp.arange(1.0, 11.0),
        "scalar": jnp.asarray(3.0),
        "nested": {
            "blocks": [arr(3, 4), (arr(5), {"kernel": arr(2, 3)})],
            "head": {"kernel": arr(4, 2), "bias": arr(2)},
        },
        "none_leaves": {"w": arr(4, 5), "act": None, "blocks": [None, {"kernel": arr(6)}]},
        "empty": {},
        "no_dense_leaf": {"w": arr(8, 3), "b": arr(3)},
        "no_sparse_leaf": {"head": arr(3, 2), "LayerNorm_0": {"scale": arr(3)}},
        "with_int_leaf": {"w": arr(10), "count": jnp.arange(3, dtype=jnp.int32)},
    }


TREES = tuple(_trees())


TREE_CASES = [
    pytest.param(
        name,
        tree,
        density,
        id=f"{name}-{tree}-d{density}",
        marks=[]
        if (name == "nanoadam" and (density == 0.1 or tree == "none_leaves"))
        or (tree in ("none_leaves", "with_int_leaf") and density == 0.1)
        else [slow],
    )
    for name in ("nanoadam", "sparse_update(sgd_momentum)")
    for tree in TREES
    for density in ((0.1, 1.0) if tree in ("nested", "none_leaves") else (0.1,))
]


@pytest.mark.parametrize("name, tree_name, density", TREE_CASES)
def test_parameter_trees(name, tree_name, density):
    """``init`` and jitted ``update`` work on every kind of parameter tree; the updates have
    the parameters' structure and dtypes; sparse leaves move exactly ``k`` entries (all
    leaves here are far below any chunk size), dense leaves all entries, integer leaves
    none; a second step (and a refresh at step 2) works too."""
    params = _trees()[tree_name]
    opt = CASES[name].make(1e-2, density, 2)
    state = opt.init(params)
    update = jax.jit(opt.update)
    for t in range(3):
        grads = jax.tree.map(
            lambda x: jnp.ones_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x * 0, params
        )
        updates, state = update(grads, state, params)
        chex.assert_trees_all_equal_structs(updates, params)
        chex.assert_trees_all_equal_dtypes(updates, params)
        for (path, u), p in zip(
            jax.tree_util.tree_flatten_with_path(updates)[0], jax.tree.leaves(params)
        ):
            label = leaf_label(path, p)
            moved = int(np.count_nonzero(np.asarray(u, np.float32)))
            if label == "frozen":
                assert moved == 0, jax.tree_util.keystr(path)
            elif label == "dense":
                assert moved == p.size, jax.tree_util.keystr(path)
            else:
                assert moved == num_selected(p.size, density), (jax.tree_util.keystr(path), t)
        params = optax.apply_updates(params, updates)
    if tree_name == "array" and density == 0.1:
        # The one selected entry is the smallest magnitude, 1.0 at index 0 (and it only
        # shrinks: the gradient is +1 everywhere).
        assert np.flatnonzero(np.asarray(updates)).tolist() == [0]


# ------------------------------------------------------------------------------------------------
# State size: from the density known at init, capped later
# ------------------------------------------------------------------------------------------------

BIG = (250, 400)  # 100_000 entries


def _big_params():
    return {"w": jax.random.normal(jax.random.key(0), BIG), "head": jnp.zeros(4)}


@functools.cache
def _big_plain_step():
    """State entries and first updates of the plain ``density=0.1`` optimizer (once)."""
    params = _big_params()
    tx = nanoadam_jax.nanoadam(1e-3, density=0.1)
    state = tx.init(params)
    updates, _ = jax.jit(tx.update)(random_like(params, 0), state, params)
    return state_entries(state), updates


def test_state_is_sized_by_the_density():
    """The plain ``density=0.1`` state of a 100_000-entry leaf is far below Adam's (the
    sparse state is k-sized, not n-sized), and ``inject_hyperparams`` with the same
    density (eager ``init``) has exactly the same inner state entries."""
    params = _big_params()
    plain = _big_plain_step()[0]
    adam = state_entries(optax.adam(1e-3).init(params))
    assert plain <= 0.5 * adam, (plain, adam)
    injected = optax.inject_hyperparams(nanoadam_jax.nanoadam)(learning_rate=1e-3, density=0.1)
    assert state_entries(injected.init(params).inner_state) == plain


@pytest.mark.parametrize(
    "density",
    [
        pytest.param(lambda step: 0.1, id="lambda"),
        pytest.param(optax.linear_schedule(0.1, 0.05, 100), id="optax.linear_schedule"),
        pytest.param(
            nanoadam_jax.linear_density_decay(0.1, 0.05, 100),
            id="linear_density_decay",
            marks=slow,
        ),
    ],
)
def test_density_schedule_state_is_no_larger_than_its_maximum(density):
    """A density schedule sizes the buffers for its largest value (found by probing it):
    the state is no larger than the plain state at that value (0.1), and the schedule's
    updates at step 0 move as many entries as the plain optimizer's."""
    params = _big_params()
    tx = nanoadam_jax.nanoadam(1e-3, density=density)
    state = tx.init(params)
    plain_entries, plain_updates = _big_plain_step()
    assert state_entries(state) <= plain_entries
    updates, _ = jax.jit(tx.update)(random_like(params, 0), state, params)
    chex.assert_trees_all_close(updates, plain_updates, rtol=1e-6)


def test_injected_density_above_capacity_is_capped():
    """An injected density above the one given at ``init`` cannot grow the buffers: the
    number of entries that move is the capacity (``k`` at density 0.1 in every chunk),
    not more, at the refresh of step 0 and after a later change; a density below the
    capacity moves its own ``k`` per chunk."""
    params = {"w": jax.random.normal(jax.random.key(0), BIG)}
    opt = optax.inject_hyperparams(nanoadam_jax.nanoadam)(
        learning_rate=1e-3, density=0.1, mask_interval=100
    )
    state = opt.init(params)
    update = jax.jit(opt.update)
    c = default_chunk_size()
    capacity = chunked_capacity(BIG, 0.1, c)
    for t, density in enumerate([0.5, 0.8, 0.05]):
        state.hyperparams["density"] = jnp.asarray(density, jnp.float32)
        updates, state = update(random_like(params, t), state, params)
        moved = int(np.count_nonzero(np.asarray(updates["w"])))
        expected = min(capacity, chunked_capacity(BIG, density, c))
        assert moved == expected, (density, moved, expected)
        params = optax.apply_updates(params, updates)


# ------------------------------------------------------------------------------------------------
# optax wrappers
# ------------------------------------------------------------------------------------------------


def _wrapper_params():
    rng = np.random.default_rng(2)
    return {
        "w": jnp.asarray(rng.normal(size=(12, 10)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(30,)), jnp.float32),
        "head": jnp.asarray(rng.normal(size=(10, 3)), jnp.float32),
    }


def _run(opt, params, steps=6):
    """Updates of ``steps`` jitted steps on random gradients, and the first state."""
    state0 = opt.init(params)
    state, update, out = state0, jax.jit(opt.update), []
    for t in range(steps):
        updates, state = update(random_like(params, t), state, params)
        out.append(updates)
        params = optax.apply_updates(params, updates)
    return out, state0


def _plain():
    return nanoadam_jax.nanoadam(1e-2, density=0.1, mask_interval=2)


@functools.cache
def _plain_run(leaves: tuple[str, ...]):
    """The plain optimizer's updates and initial state on some leaves (computed once)."""
    params = _wrapper_params()
    return _run(_plain(), {k: params[k] for k in leaves})


def assert_same_updates(got: Any, want: Any) -> None:
    """The same entries move, by the same amounts (separately compiled programs may
    round the same arithmetic differently in the last bit)."""
    chex.assert_trees_all_equal_structs(got, want)
    chex.assert_trees_all_equal(
        jax.tree.map(lambda u: np.asarray(u) != 0, got),
        jax.tree.map(lambda u: np.asarray(u) != 0, want),
    )
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "wrapper", ["multisteps", "apply_if_finite", "chain_clip", "partition_one_group"]
)
def test_noop_wrappers_give_exactly_the_plain_updates_and_state_size(wrapper):
    """Wrappers that change nothing here (``MultiSteps(every_k_schedule=1)``,
    ``apply_if_finite`` on finite gradients, ``chain(clip_by_global_norm(huge), .)``,
    ``partition`` with every leaf in one group) give exactly the plain optimizer's updates
    over steps across refreshes, and hold an inner state identical in shapes to the
    plain one (plus at most a parameter-sized accumulator for ``MultiSteps``)."""
    params = _wrapper_params()
    n_params = sum(x.size for x in jax.tree.leaves(params))
    if wrapper == "multisteps":
        opt = optax.MultiSteps(_plain(), every_k_schedule=1)
        inner, overhead = (lambda s: s.inner_opt_state), n_params + 16
    elif wrapper == "apply_if_finite":
        opt = optax.apply_if_finite(_plain(), max_consecutive_errors=3)
        inner, overhead = (lambda s: s.inner_state), 16
    elif wrapper == "chain_clip":
        opt = optax.chain(optax.clip_by_global_norm(1e9), _plain())
        inner, overhead = (lambda s: s[1]), 16
    else:
        labels = jax.tree.map(lambda _: "all", params)
        opt = optax.partition({"all": _plain()}, labels)
        inner, overhead = (lambda s: s.inner_states["all"].inner_state), 16
    updates, state = _run(opt, params)
    plain_updates, plain_state = _plain_run(tuple(params))
    assert_same_updates(updates, plain_updates)
    chex.assert_trees_all_equal_shapes_and_dtypes(inner(state), plain_state)
    assert state_entries(state) <= state_entries(plain_state) + overhead


@pytest.mark.parametrize("wrapper", ["partition", "masked"])
def test_partial_wrappers_match_the_plain_optimizer_on_their_leaves(wrapper):
    """``partition`` / ``multi_transform`` with NanoAdam on some leaves and SGD on the
    others, and ``masked`` with NanoAdam on some leaves: the NanoAdam leaves get exactly
    the updates of the plain optimizer run on those leaves alone, the others what the
    other branch gives; NanoAdam's inner state there has the plain state's shapes."""
    params = _wrapper_params()
    sub = {"w": params["w"], "head": params["head"]}
    if wrapper == "partition":
        labels = {"w": "na", "v": "sgd", "head": "na"}
        opt = optax.partition({"na": _plain(), "sgd": optax.sgd(0.1)}, labels)
        legacy = optax.multi_transform({"na": _plain(), "sgd": optax.sgd(0.1)}, labels)
    else:
        opt = optax.masked(_plain(), {"w": True, "v": False, "head": True})
        legacy = None
    updates, state = _run(opt, params)
    plain_updates, plain_state = _plain_run(tuple(sub))
    for got, want, t in zip(updates, plain_updates, range(len(updates))):
        assert_same_updates({"w": got["w"], "head": got["head"]}, want)
        grads_v = random_like(params, t)["v"]
        if wrapper == "partition":
            chex.assert_trees_all_close(got["v"], -0.1 * grads_v, rtol=1e-6)
        else:  # optax.masked passes the masked-out leaves through unchanged
            chex.assert_trees_all_equal(got["v"], grads_v)
    inner = state.inner_states["na"].inner_state if wrapper == "partition" else state.inner_state
    assert state_entries(inner) == state_entries(plain_state)
    if legacy is not None:
        legacy_updates, _ = _run(legacy, params, steps=2)
        assert_same_updates(legacy_updates, updates[:2])


def test_inject_hyperparams_init_under_jit_names_both_ways_out():
    """optax's contrib suite jits ``inject_hyperparams(opt)(...).init``, which traces an
    injected density: the error names ``max_density`` and ``static_args``, and both
    ways out give the plain state's shapes."""
    params = {"w": jnp.ones((64, 64)), "head": jnp.ones((64, 3))}
    plain = jax.eval_shape(nanoadam_jax.nanoadam(1e-3, density=0.1).init, params)
    injected = optax.inject_hyperparams(nanoadam_jax.nanoadam)(learning_rate=1e-3, density=0.1)
    with pytest.raises(ValueError, match=r"max_density.*static_args=\('density',\)"):
        jax.jit(injected.init)(params)
    static = optax.inject_hyperparams(nanoadam_jax.nanoadam, static_args=("density",))(
        learning_rate=1e-3, density=0.1
    )
    sized = optax.inject_hyperparams(nanoadam_jax.nanoadam, static_args=("max_density",))(
        learning_rate=1e-3, density=0.1, max_density=0.1
    )
    for tx in (static, sized):
        state = jax.jit(tx.init)(params)
        chex.assert_trees_all_equal_shapes(state.inner_state[0].selected, plain[0].selected)
        u, state = jax.jit(tx.update)(
            {"w": jnp.ones((64, 64)), "head": jnp.ones((64, 3))}, state, params
        )
        assert int(jnp.sum(u["w"] != 0)) == int(plain[0].selected["w"].size)
