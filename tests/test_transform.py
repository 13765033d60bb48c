"""Tests of magnitude_mask, masked_apply and sparse_update: the NanoAdam semantics."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nanoadam_jax as nanoadam


def make_params(seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {
        "layer": {"kernel": jax.random.normal(k1, (16, 12)), "bias": jax.random.normal(k2, (12,))},
        "head": {"kernel": jax.random.normal(k3, (12, 3))},
        "step_counter": jnp.zeros((), jnp.int32),
    }


def loss_fn(params, x):
    h = jnp.tanh(x @ params["layer"]["kernel"] + params["layer"]["bias"])
    return jnp.mean((h @ params["head"]["kernel"] - 1.0) ** 2)


def grads_at(params, i):
    if "layer" not in params:
        return jax.grad(lambda p: sum(jnp.sum(jnp.sin(x * (i + 1))) for x in jax.tree.leaves(p)))(
            params
        )
    x = jax.random.normal(jax.random.PRNGKey(100 + i), (8, 16))
    g = jax.grad(loss_fn, allow_int=True)(params, x)
    return jax.tree.map(
        lambda a, p: jnp.zeros_like(p) if a.dtype == jax.dtypes.float0 else a, g, params
    )


def run(tx, params, steps, jit=True):
    state = tx.init(params)
    step = jax.jit(tx.update) if jit else tx.update
    history = []
    for i in range(steps):
        g = grads_at(params, i)
        updates, state = step(g, state, params)
        history.append((params, updates))
        params = optax.apply_updates(params, updates)
    return params, state, history


def selected_mask(params, density):
    return nanoadam.select_mask(params["layer"]["kernel"], density)


# -- exactly k, exactly zero elsewhere ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["compact", "dense"])
@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_updates_exactly_zero_outside_current_mask(layout, policy):
    tx = nanoadam.nanoadam(
        0.05, density=0.1, mask_interval=3, state_layout=layout, refresh_policy=policy
    )
    params = make_params()
    _, _, history = run(tx, params, 10)
    k = int(nanoadam.num_selected(16 * 12, 0.1))
    for t, (_, u) in enumerate(history):
        # The mask in force at step t was chosen at the last refresh, from those params.
        p_ref = history[t - t % 3][0]
        m = selected_mask(p_ref, 0.1)
        uk = np.asarray(u["layer"]["kernel"])
        assert np.all(uk[~np.asarray(m)] == 0.0), f"leak outside the mask at step {t}"
        assert np.count_nonzero(uk) == k
        assert np.count_nonzero(u["layer"]["bias"]) == int(nanoadam.num_selected(12, 0.1))
        assert np.count_nonzero(u["head"]["kernel"]) == 36  # dense
        assert float(u["step_counter"]) == 0.0  # non-float leaves are never moved


def test_density_one_equals_adam():
    params = make_params()
    for layout in ("compact", "dense"):
        tx = nanoadam.nanoadam(1e-2, density=1.0, mask_interval=4, state_layout=layout)
        # "keep" at density 1 never resets anything: identical to adam on every step.
        tx_keep = nanoadam.nanoadam(
            1e-2, density=1.0, mask_interval=4, state_layout=layout, refresh_policy="keep"
        )
        ref = optax.adam(1e-2)
        p_keep, _, _ = run(tx_keep, params, 12)
        p_ref, _, _ = run(
            optax.multi_transform(
                {"a": ref, "f": optax.set_to_zero()},
                jax.tree.map(lambda x: "f" if x.dtype == jnp.int32 else "a", params),
            ),
            params,
            12,
        )
        chex.assert_trees_all_close(p_keep, p_ref, rtol=1e-5, atol=1e-6)
        # "reset" equals adam until the first refresh after step 0.
        p_reset, _, _ = run(tx, params, 4)
        p_ref4, _, _ = run(optax.adam(1e-2), jax.tree.map(jnp.asarray, params), 4)
        chex.assert_trees_all_close(p_reset["layer"], p_ref4["layer"], rtol=1e-5, atol=1e-6)


# -- refresh schedule --------------------------------------------------------------------------


def test_refresh_happens_at_interval_and_on_density_change():
    sched = nanoadam.linear_density_decay(0.3, 0.1, decay_steps=8, density_interval=4)
    tx = nanoadam.sparse_update(optax.scale_by_adam(), density=sched, mask_interval=6)
    params = make_params()
    state = tx.init(params)
    prev = None
    refreshes = []
    for t in range(14):
        g = grads_at(params, t)
        u, state = jax.jit(tx.update)(g, state, params)
        params = optax.apply_updates(params, jax.tree.map(lambda x: -x, u))
        sel = np.asarray(state.selected["layer"]["kernel"])
        if prev is not None and not np.array_equal(sel, prev):
            refreshes.append(t)
        prev = sel
    # Interval refreshes at 6 and 12; density changes at 4 and 8 (0.3 -> 0.2 -> 0.1).
    assert refreshes == [4, 6, 8, 12]
    assert float(state.sparse_density) == pytest.approx(0.1)
    assert int(state.sparse_step) == 14


def test_non_refresh_steps_do_no_selection_work():
    tx = nanoadam.nanoadam(1e-3, density=0.1, mask_interval=10)
    params = make_params()
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(grads_at(params, 0), state, params)
    conds = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
    assert conds, "the refresh must be under lax.cond"
    # The bisection (a while loop) lives only inside the cond's refresh branch.
    top_level = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert "while" not in top_level


# -- moments at a refresh ------------------------------------------------------------------------


def _first_step_of_new_entries(policy):
    """Largest |update| / lr of entries that enter the selection at a refresh."""
    lr = 1e-3
    w = jnp.linspace(0.01, 1.0, 100)
    params = {"w": w}
    tx = nanoadam.nanoadam(lr, density=0.1, mask_interval=50, refresh_policy=policy)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(50):
        # Push the selected (smallest) weights up so the selection changes at step 50.
        u, state = update({"w": -jnp.ones(100)}, state, params)
        params = optax.apply_updates(params, u)
        params = {"w": params["w"] + jnp.where(u["w"] != 0, 0.02, 0.0)}
    old = np.asarray(u["w"] != 0)
    u, state = update({"w": -jnp.ones(100)}, state, params)
    new = np.asarray(u["w"] != 0)
    entering = new & ~old
    assert entering.any()
    return float(np.max(np.abs(np.asarray(u["w"])[entering]))) / lr


def test_reset_policy_has_no_outsized_first_step():
    assert _first_step_of_new_entries("reset") == pytest.approx(1.0, rel=1e-3)


def test_keep_policy_first_step_is_documented_bias_correction_factor():
    # With the global count t = 51 at the refresh, an entering entry's first Adam step is
    # (1 - b1) / (1 - b1**t) / sqrt((1 - b2) / (1 - b2**t)) times lr (2.5x at t = 1000).
    t = 51
    factor = 0.1 / (1 - 0.9**t) / np.sqrt(0.001 / (1 - 0.999**t))
    assert _first_step_of_new_entries("keep") == pytest.approx(factor, rel=1e-3)


def test_keep_policy_carries_moments_of_entries_that_stay():
    params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4, 5.0, 6.0])}
    tx = nanoadam.sparse_update(
        optax.scale_by_adam(), density=0.5, mask_interval=2, refresh_policy="keep"
    )
    state = tx.init(params)
    g = {"w": jnp.arange(1.0, 7.0)}
    _, state = tx.update(g, state, params)  # selects 0, 1, 2
    mu_before = np.asarray(state.sparse_inner_state.mu["w"])
    _, state = tx.update(g, state, params)
    params2 = {"w": jnp.array([0.1, 9.0, 0.3, 0.4, 5.0, 6.0])}  # entry 1 leaves, 3 enters
    _, state2 = tx.update({"w": jnp.zeros(6)}, state, params2)
    assert np.asarray(state2.selected["w"]).tolist() == [[0, 2, 3]]
    mu = np.asarray(state2.sparse_inner_state.mu["w"])
    mu_prev = np.asarray(state.sparse_inner_state.mu["w"])  # slots for entries 0, 1, 2
    np.testing.assert_allclose(mu, [0.9 * mu_prev[0], 0.9 * mu_prev[2], 0.0], rtol=1e-6)
    assert mu_before[0] != 0


# -- layouts agree -------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reset", "keep"])
@pytest.mark.parametrize("scope", ["leaf", "block"])
def test_compact_and_dense_layouts_agree_after_50_steps(policy, scope):
    params = make_params()
    kw = dict(density=0.15, mask_interval=7, refresh_policy=policy, scope=scope, block_size=40)
    p_c, _, _ = run(nanoadam.nanoadamw(3e-2, state_layout="compact", **kw), params, 50)
    p_d, _, _ = run(nanoadam.nanoadamw(3e-2, state_layout="dense", **kw), params, 50)
    chex.assert_trees_all_close(p_c, p_d, rtol=1e-5, atol=1e-6)


def test_compact_state_is_k_sized():
    params = {"w": jnp.zeros((100, 50))}
    state = nanoadam.nanoadam(1e-3, density=0.1).init(params)
    sparse = state[0]
    assert sparse.selected["w"].shape == (1, 500)
    assert sparse.sparse_inner_state.mu["w"].shape == (500,)
    dense = nanoadam.nanoadam(1e-3, density=0.1, state_layout="dense").init(params)
    assert dense[0].sparse_inner_state.mu["w"].shape == (100, 50)


def test_schedule_sizes_buffers_for_its_maximum():
    sched = nanoadam.linear_density_decay(0.2, 0.05, decay_steps=10, density_interval=5)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (40, 10))}
    tx = nanoadam.nanoadam(1e-2, density=sched, mask_interval=100)
    _, state, hist = run(tx, params, 12)
    assert state[0].selected["w"].shape == (1, 80)
    counts = [int(np.count_nonzero(u["w"])) for _, u in hist]
    assert counts[:5] == [80] * 5 and counts[5:10] == [50] * 5 and counts[10:] == [20] * 2


# -- scopes and criteria through the transformation ------------------------------------------------


def test_global_scope_selects_k_over_all_sparse_leaves():
    params = {"a": jnp.linspace(0.0, 1.0, 10), "b": jnp.linspace(0.5, 2.0, 30)}
    tx = nanoadam.sparse_update(optax.sgd(1.0), density=0.25, scope="global", state_layout="dense")
    u, _ = tx.update({"a": jnp.ones(10), "b": jnp.ones(30)}, tx.init(params), params)
    assert int(np.count_nonzero(u["a"])) + int(np.count_nonzero(u["b"])) == 10
    with pytest.raises(ValueError, match="global"):
        nanoadam.sparse_update(optax.sgd(1.0), scope="global")


def test_random_criterion_changes_at_each_refresh_and_is_seeded():
    params = {"w": jnp.ones(200)}

    def masks(seed):
        tx = nanoadam.mask(density=0.1, mask_interval=2, criterion="random", seed=seed)
        st = tx.init(params)
        update = jax.jit(tx.update)
        out = []
        for _ in range(4):
            _, st = update({"w": jnp.ones(200)}, st, params)
            out.append(np.asarray(st.mask["w"]))
        return out

    a, b = masks(0), masks(1)
    np.testing.assert_array_equal(a[0], a[1])  # no refresh at step 1
    assert not np.array_equal(a[0], a[2])  # new random set at step 2
    assert not np.array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[2], masks(0)[2])


def test_largest_criterion_through_mask():
    params = {"w": jnp.arange(10.0)}
    tx = nanoadam.mask(density=0.2, criterion="largest")
    u, _ = tx.update({"w": jnp.ones(10)}, tx.init(params), params)
    assert u["w"].tolist() == [0.0] * 8 + [1.0, 1.0]


# -- the spelled-out pipeline --------------------------------------------------------------------


def test_mask_then_adam_is_gradient_masking_only():
    """Documented limitation: adam moves deselected entries with stale momentum."""
    kw = dict(density=0.2, mask_interval=3)
    params = {"w": jnp.linspace(-1.0, 1.0, 20)}
    tx = optax.chain(nanoadam.mask(**kw), optax.adam(0.5))
    closed = optax.chain(
        nanoadam.magnitude_mask(**kw),
        optax.scale_by_adam(),
        nanoadam.masked_apply(**kw),
        optax.scale_by_learning_rate(0.5),
    )

    select = jax.jit(lambda w: nanoadam.select_mask(w, 0.2))

    def leaks(tx):
        st, p, total, m = tx.init(params), params, 0, None
        update = jax.jit(tx.update)
        for t in range(9):
            g = {"w": jnp.sin(p["w"] * (t + 1))}
            u, st = update(g, st, p)
            m = select(p["w"]) if t % 3 == 0 else m
            total += int(np.count_nonzero(np.asarray(u["w"])[~np.asarray(m)]))
            p = optax.apply_updates(p, u)
        return total

    assert leaks(tx) > 0
    assert leaks(closed) == 0


@pytest.mark.parametrize("wrapper", ["multisteps", "apply_if_finite"])
def test_mask_and_masked_apply_agree_inside_wrappers(wrapper):
    kw = dict(density=0.25, mask_interval=2)
    inner = optax.chain(
        nanoadam.magnitude_mask(**kw),
        optax.scale_by_adam(),
        nanoadam.masked_apply(**kw),
        optax.scale_by_learning_rate(0.1),
    )
    if wrapper == "multisteps":
        tx = optax.MultiSteps(inner, every_k_schedule=3)
    else:
        tx = optax.apply_if_finite(inner, max_consecutive_errors=5)
    params = {"w": jnp.linspace(-1.0, 1.0, 16)}
    st = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(12):
        g = {"w": jnp.cos(params["w"] * (t + 1))}
        if wrapper == "apply_if_finite" and t % 4 == 1:
            g = {"w": g["w"].at[0].set(jnp.nan)}
        u, st = update(g, st, params)
        inner_state = st.inner_opt_state if wrapper == "multisteps" else st.inner_state
        m1, m2 = inner_state[0].mask["w"], inner_state[2].apply_mask["w"]
        np.testing.assert_array_equal(m1, m2)
        assert inner_state[0].mask_step == inner_state[2].apply_step
        assert np.all(np.asarray(u["w"])[~np.asarray(m1)] == 0)
        params = optax.apply_updates(params, u)
    assert int(inner_state[0].mask_step) == 4 if wrapper == "multisteps" else 9


# -- optax ecosystem -----------------------------------------------------------------------------


def test_init_on_shape_dtype_structs_and_eval_shape():
    params = make_params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    for layout in ("compact", "dense"):
        tx = nanoadam.nanoadam(1e-3, density=0.1, state_layout=layout)
        shapes = jax.eval_shape(tx.init, abstract)
        real = tx.init(params)
        chex.assert_trees_all_equal_shapes_and_dtypes(shapes, real)
        shapes2 = tx.init(abstract) if layout == "dense" else shapes
        chex.assert_trees_all_equal_structs(shapes2, real)


def test_tree_get_and_tree_map_params():
    params = make_params()
    tx = nanoadam.nanoadam(1e-3, density=0.1, state_layout="dense")
    state = tx.init(params)
    assert int(optax.tree_utils.tree_get(state, "sparse_step")) == 0
    assert optax.tree_utils.tree_get(state, "selected") is not None
    specs = optax.tree_utils.tree_map_params(
        tx, lambda p: "P", state, transform_non_params=lambda _: None
    )
    assert "P" in jax.tree.leaves(specs)


def _minimise(tx, loss, params, steps):
    st = tx.init(params)

    @jax.jit
    def step(params, st):
        u, st = tx.update(jax.grad(loss)(params), st, params)
        return optax.apply_updates(params, u), st

    for _ in range(steps):
        params, st = step(params, st)
    return float(loss(params))


def test_converges_on_underdetermined_quadratic():
    # Fine-tuning is over-parameterised: any 20% of the coordinates can fit 10 targets.
    a = jax.random.normal(jax.random.PRNGKey(2), (10, 100))
    b = jax.random.normal(jax.random.PRNGKey(3), (10,))
    loss = lambda p: jnp.sum((a @ p["w"] - b) ** 2)
    params = {"w": 0.5 * jax.random.normal(jax.random.PRNGKey(4), (100,))}
    assert loss(params) > 100
    assert (
        _minimise(nanoadam.nanoadam(0.01, density=0.2, mask_interval=10), loss, params, 1000) < 0.05
    )


@pytest.mark.parametrize("policy,tol", [("reset", 5e-3), ("keep", 1e-3)])
def test_converges_on_overparameterised_rosenbrock(policy, tol):
    # Rosenbrock of (mean(u), mean(v)): 2 of 8 entries per leaf are trainable at a time.
    # (On the plain 2-D function, the smaller coordinate is always the selected one, and
    # NanoAdam stalls on a line: selection by magnitude needs redundant parameters.)
    def rosen(p):
        x, y = jnp.mean(p["u"]), jnp.mean(p["v"])
        return (1 - x) ** 2 + 100 * (y - x**2) ** 2

    params = {
        "u": -1.0 + 0.3 * jax.random.normal(jax.random.PRNGKey(0), (8,)),
        "v": 1.5 + 0.3 * jax.random.normal(jax.random.PRNGKey(1), (8,)),
    }
    tx = nanoadam.nanoadam(0.01, density=0.25, mask_interval=10, refresh_policy=policy)
    assert _minimise(tx, rosen, params, 3000) < tol


def test_no_recompilation_on_second_call_and_extra_args():
    params = make_params()
    tx = nanoadam.nanoadam(1e-3, density=0.1, mask_interval=2)
    st = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, value=1.0, unknown_arg="x"))
    for i in range(5):
        _, st = update(grads_at(params, i), st, params)
    assert update._cache_size() == 1


def test_inject_hyperparams_learning_rate_and_traced_density():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (30,))}
    tx = optax.inject_hyperparams(nanoadam.nanoadam, static_args=("max_density",))(
        learning_rate=0.1, density=0.2, max_density=0.5, mask_interval=1000
    )
    st = tx.init(params)
    update = jax.jit(tx.update)
    u, st = update({"w": jnp.ones(30)}, st, params)
    assert int(np.count_nonzero(u["w"])) == 6
    st.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
    st.hyperparams["density"] = jnp.asarray(0.5, jnp.float32)
    u, st = update({"w": jnp.ones(30)}, st, params)
    # A density change triggers a refresh even though mask_interval is 1000.
    assert int(np.count_nonzero(u["w"])) == 15
    assert float(jnp.max(jnp.abs(u["w"]))) == pytest.approx(0.01, rel=1e-3)


def test_chained_after_clip_by_global_norm_and_bf16_dtype():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64,)).astype(jnp.bfloat16)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), nanoadam.nanoadam(1e-2, density=0.25))
    st = tx.init(params)
    g = {"w": jnp.full((64,), 10.0, jnp.bfloat16)}
    u, st = jax.jit(tx.update)(g, st, params)
    assert u["w"].dtype == jnp.bfloat16
    assert int(np.count_nonzero(np.asarray(u["w"], np.float32))) == 16
    new = optax.apply_updates(params, u)
    assert new["w"].dtype == jnp.bfloat16


def test_vmap_over_densities_matches_loop():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (40, 5))}
    densities = jnp.array([0.05, 0.2, 0.5])

    def train(density):
        tx = nanoadam.nanoadam(0.05, density=density, mask_interval=3, max_density=0.5)
        p, st = params, tx.init(params)
        for t in range(7):
            g = jax.grad(lambda q: jnp.sum(jnp.sin(q["w"] * (t + 1))))(p)
            u, st = tx.update(g, st, p)
            p = optax.apply_updates(p, u)
        return p

    batched = jax.jit(jax.vmap(train))(densities)
    for i, d in enumerate(densities.tolist()):
        looped = jax.jit(train)(jnp.float32(d))
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], batched), looped, rtol=1e-5, atol=1e-6
        )


def test_sparse_update_wraps_lion_and_refuses_non_transformations():
    params = {"w": jnp.array([0.1, -2.0, 0.3, 4.0])}
    tx = nanoadam.sparse_update(optax.scale_by_lion(), density=0.5)
    u, _ = tx.update({"w": -jnp.ones(4)}, tx.init(params), params)
    assert u["w"].tolist() == [-1.0, 0.0, -1.0, 0.0]
    with pytest.raises(ValueError, match="inner"):
        nanoadam.sparse_update(lambda g: g)


def test_update_without_params_is_a_clear_error():
    tx = nanoadam.nanoadam(1e-3)
    st = tx.init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones(3)}, st)


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_learning_rate_schedule_is_not_restarted_by_refreshes(policy):
    # nanoadam applies the learning rate inside sparse_update; a "reset" refresh
    # re-initialises the inner state, which must not restart the schedule.
    schedule = optax.linear_schedule(1e-1, 1e-3, transition_steps=12)
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (6, 7)), "head": jnp.ones(3)}
    kwargs = dict(density=0.3, mask_interval=3, refresh_policy=policy)
    ours = nanoadam.nanoadam(schedule, **kwargs)
    reference = optax.chain(
        nanoadam.sparse_update(optax.scale_by_adam(), **kwargs),
        optax.scale_by_learning_rate(schedule),
    )
    p1, p2 = params, params
    s1, s2 = ours.init(p1), reference.init(p2)
    for i in range(12):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p1)
        u1, s1 = ours.update(g, s1, p1)
        u2, s2 = reference.update(g, s2, p2)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-7)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


def test_inplace_apply_gives_the_same_parameters():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (12, 9)), "b": jnp.ones(5)}
    txs = [nanoadam.nanoadamw(1e-2, 0.2, 4, inplace_apply=False)]
    txs.append(nanoadam.nanoadamw(1e-2, 0.2, 4, inplace_apply=True))

    def run(tx):
        p, s = params, tx.init(params)
        for i in range(10):
            g = jax.tree.map(lambda x, i=i: jnp.cos(x * (i + 2)), p)
            u, s = jax.jit(tx.update)(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    chex.assert_trees_all_close(run(txs[0]), run(txs[1]), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="inplace_apply"):
        nanoadam.nanoadam(1e-3, inplace_apply="yes")


def test_jitted_step_applies_sparse_updates_in_place():
    # With inplace_apply=True and the learning rate inside sparse_update, XLA turns
    # params + scatter_add(0, ...) into a scatter-add into the (donated) parameters: the
    # step needs no leaf-sized temporary buffer (neither a zero-filled update nor a
    # refresh scratch of n entries).
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))}
    tx = nanoadam.nanoadam(1e-3, density=0.1, inplace_apply=True)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < params["w"].nbytes, temp


def test_bias_correction_off_scales_the_first_step_and_keeps_the_state_layout():
    params = {"w": jnp.linspace(-1.0, 1.0, 10)}
    g = {"w": jnp.linspace(0.5, 2.0, 10)}
    on = nanoadam.nanoadam(0.1, density=0.3)
    off = nanoadam.nanoadam(0.1, density=0.3, bias_correction=False)
    u_on, s_on = on.update(g, on.init(params), params)
    u_off, s_off = off.update(g, off.init(params), params)
    selected = u_on["w"] != 0
    assert int(selected.sum()) == 3
    np.testing.assert_allclose(u_on["w"][selected], -0.1, rtol=1e-5)
    factor = (1 - 0.9) / np.sqrt(1 - 0.999)
    np.testing.assert_allclose(u_off["w"], factor * u_on["w"], rtol=1e-4)
    chex.assert_trees_all_equal_structs(s_on, s_off)
    chex.assert_trees_all_close(s_on[0].sparse_inner_state, s_off[0].sparse_inner_state)
    # Later steps follow the uncorrected Adam formula m / (sqrt(v) + eps).
    u2, _ = off.update(g, s_off, params)
    m = (1 - 0.9**2) * 2 * g["w"] / 2  # two steps of a constant gradient
    v = (1 - 0.999**2) * g["w"] ** 2
    expected = -0.1 * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(u2["w"][selected], expected[selected], rtol=1e-4)
    with pytest.raises(ValueError, match="bias_correction"):
        nanoadam.nanoadamw(0.1, bias_correction=1)
