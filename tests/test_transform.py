"""Tests of magnitude_mask, masked_apply and sparse_update: the NanoAdam semantics."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_selection import nonzero, ref_global_masks, ref_k, ref_mask

import nanoadam_jax as nanoadam
from nanoadam_jax import refresh, selection

REPO = Path(__file__).resolve().parents[1]


def normal(seed, shape, scale=1.0):
    """Standard-normal float32 weights from numpy (no jax.random compile per shape)."""
    return jnp.asarray(scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def make_params(seed=0):
    return {
        "layer": {"kernel": normal(seed, (16, 12)), "bias": normal(seed + 1, (12,))},
        "head": {"kernel": normal(seed + 2, (12, 3))},
        "step_counter": jnp.zeros((), jnp.int32),
    }


def loss_fn(params, x):
    h = jnp.tanh(x @ params["layer"]["kernel"] + params["layer"]["bias"])
    return jnp.mean((h @ params["head"]["kernel"] - 1.0) ** 2)


def grads_at(params, i):
    """Step ``i``'s gradient (traceable: ``i`` may be traced)."""
    if "layer" not in params:
        return jax.grad(lambda p: sum(jnp.sum(jnp.sin(x * (i + 1))) for x in jax.tree.leaves(p)))(
            params
        )
    x = jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(100), i), (8, 16))
    g = jax.grad(loss_fn, allow_int=True)(params, x)
    return jax.tree.map(
        lambda a, p: jnp.zeros_like(p) if a.dtype == jax.dtypes.float0 else a, g, params
    )


def run(tx, params, steps):
    """``steps`` steps of ``tx`` on :func:`grads_at`, each one jitted call (gradient,
    update, apply); returns (params, state, [(params before step t, updates of step t)])."""

    @jax.jit
    def step(params, state, i):
        updates, state = tx.update(grads_at(params, i), state, params)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    history = []
    for i in range(steps):
        new, state, updates = step(params, state, i)
        history.append((params, updates))
        params = new
    return params, state, history


def chunks(scope):
    """chunk_size=48 for scope="chunk" (the (16, 12) kernel is 16 one-row chunks of 12)."""
    return {"chunk_size": 48} if scope == "chunk" else {}


def expected_masks(params, density, scope, chunk_size):
    """Reference masks of make_params' two sparse leaves (the head is dense)."""
    layer = params["layer"]
    if scope == "global":
        bias, kernel = ref_global_masks([layer["bias"], layer["kernel"]], density)
        return {"bias": bias, "kernel": kernel}
    return {name: ref_mask(x, density, scope, chunk_size) for name, x in layer.items()}


# -- exactly k, exactly zero elsewhere ---------------------------------------------------------


@pytest.mark.parametrize("scope", ["chunk", "leaf", "global"])
@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_updates_exactly_zero_outside_current_mask(scope, policy):
    # chunk_size=48: the (16, 12) kernel is 16 one-row chunks of 12 (16 rows split over 16
    # devices leave a row per shard; k = 1 each, 16 in all, where one selection over the
    # leaf would take 19); the bias is one chunk of 12 (k = 1).
    tx = nanoadam.nanoadam(
        0.05, density=0.1, mask_interval=3, scope=scope, refresh_policy=policy, **chunks(scope)
    )
    params = make_params()
    _, _, history = run(tx, params, 10)
    counts = {"chunk": (16, 1), "leaf": (19, 1), "global": (ref_k(16 * 12 + 12, 0.1), 0)}
    for t, (_, u) in enumerate(history):
        # The mask in force at step t was chosen at the last refresh, from those params.
        want = expected_masks(history[t - t % 3][0], 0.1, scope, 48)
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(
                nonzero(u["layer"][name]), want[name], err_msg=f"{name} at step {t}"
            )
        if scope != "global":
            assert np.count_nonzero(u["layer"]["kernel"]) == counts[scope][0]
            assert np.count_nonzero(u["layer"]["bias"]) == counts[scope][1]
        else:
            total = np.count_nonzero(u["layer"]["kernel"]) + np.count_nonzero(u["layer"]["bias"])
            assert total == counts["global"][0]
        assert np.count_nonzero(u["head"]["kernel"]) == 36  # dense
        assert float(u["step_counter"]) == 0.0  # non-float leaves are never moved


@functools.cache
def adam_reference(steps=12):
    """optax.adam on make_params (the int leaf frozen): the parameters after each step."""
    params = make_params()
    reference = optax.multi_transform(
        {"a": optax.adam(1e-2), "f": optax.set_to_zero()},
        jax.tree.map(lambda x: "f" if x.dtype == jnp.int32 else "a", params),
    )
    final, _, history = run(reference, params, steps)
    return [p for p, _ in history[1:]] + [final]


@pytest.mark.parametrize("scope", ["chunk", "leaf", "global"])
def test_density_one_equals_adam(scope):
    params, want = make_params(), adam_reference()
    # "keep" (the default) at density 1 never drops anything: adam on every step, across
    # the refreshes at steps 4 and 8.
    keep = nanoadam.nanoadam(1e-2, density=1.0, mask_interval=4, scope=scope, **chunks(scope))
    _, _, history = run(keep, params, 12)
    got = [p for p, _ in history[1:]]
    chex.assert_trees_all_close(got, want[:-1], rtol=1e-5, atol=1e-6)
    # "reset" equals adam until the first refresh after step 0, and restarts adam there.
    reset = nanoadam.nanoadam(
        1e-2, density=1.0, mask_interval=4, scope=scope, refresh_policy="reset", **chunks(scope)
    )
    final, _, history = run(reset, params, 12)
    chex.assert_trees_all_close(history[4][0], want[3], rtol=1e-5, atol=1e-6)
    assert not np.allclose(final["layer"]["kernel"], want[-1]["layer"]["kernel"], rtol=1e-4)


# -- refresh schedule --------------------------------------------------------------------------


def test_refresh_happens_at_interval_and_on_density_change():
    # The random criterion draws a new set at every refresh, so every refresh is visible.
    sched = nanoadam.linear_density_decay(0.3, 0.1, decay_steps=8, density_interval=4)
    tx = nanoadam.sparse_update(
        optax.scale_by_adam(), density=sched, mask_interval=6, criterion="random", chunk_size=48
    )
    params = make_params()
    state = tx.init(params)
    # 16 one-row chunks of 12, sized for 0.3
    assert state.selected["layer"]["kernel"].shape == (16, ref_k(12, 0.3))
    update = jax.jit(tx.update)
    prev = None
    refreshes = []
    for t in range(14):
        u, state = update(grads_at(params, t), state, params)
        sel = np.asarray(state.selected["layer"]["kernel"])
        if prev is not None and not np.array_equal(sel, prev):
            refreshes.append(t)
        prev = sel
        assert np.count_nonzero(u["layer"]["kernel"]) == 16 * ref_k(12, float(sched(t))), t
    # Interval refreshes at 6 and 12; density changes at 4 and 8 (0.3 -> 0.2 -> 0.1).
    assert refreshes == [4, 6, 8, 12]
    assert float(state.sparse_density) == pytest.approx(0.1)
    assert int(state.sparse_step) == 14


def test_refresh_due_rule():
    due = jax.jit(refresh.refresh_due)
    d = jnp.float32(0.1)
    assert [bool(due(jnp.int32(t), 5, d, d)) for t in range(11)] == [t % 5 == 0 for t in range(11)]
    assert bool(due(jnp.int32(3), 5, jnp.float32(0.2), d))  # a density change
    assert bool(due(jnp.int32(3), 5, d, jnp.float32(0.0)))  # no selection yet


# -- ordinary steps do no selection work (structure of the jaxpr) -----------------------------


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex.ClosedJaxpr):
                yield v.jaxpr
            elif isinstance(v, jex.Jaxpr):
                yield v


def _is_selection_loop(eqn):
    """Selection work: the bisection's 32 passes over the key bits (a fixed-bound fori_loop,
    lowered to a scan of length 32; a while loop if its bound were traced), or a sort or
    top_k (the alternatives to the bisection)."""
    name = eqn.primitive.name
    return name in ("while", "sort", "top_k") or (name == "scan" and eqn.params["length"] == 32)


def _selects(jaxpr):
    return any(_is_selection_loop(e) or any(map(_selects, _sub_jaxprs(e))) for e in jaxpr.eqns)


def refresh_structure(jaxpr):
    """``(refresh conds, selection loops outside them)`` of a jaxpr, at any depth.

    A refresh cond is a ``cond`` whose true branch (``branches[1]``) contains a selection
    loop and whose false branch (the ordinary step) contains none. Loops inside a refresh
    branch are not counted; any other selection loop is.
    """
    conds = outside = 0
    for e in jaxpr.eqns:
        if e.primitive.name == "cond":
            branches = [b.jaxpr for b in e.params["branches"]]
            if len(branches) == 2 and _selects(branches[1]) and not _selects(branches[0]):
                conds += 1
                continue
        outside += _is_selection_loop(e)
        for sub in _sub_jaxprs(e):
            c, o = refresh_structure(sub)
            conds, outside = conds + c, outside + o
    return conds, outside


def test_refresh_structure_detects_selection_outside_the_cond():
    # The checker itself: it must flag a selection computed every step, whether it is
    # then discarded by a select (what a batched lax.cond becomes) or run in both branches.
    x, old = jnp.linspace(-1.0, 1.0, 40).reshape(2, 20), jnp.zeros((2, 3), jnp.int32)

    def select(x):
        return selection.chunk_positions(selection.selection_keys(x), 3, 3)

    def every_step(due, x, old):
        return jnp.where(due, select(x), old)

    def both_branches(due, x, old):
        return jax.lax.cond(due, select, lambda x: select(-x), x)

    def only_when_due(due, x, old):
        return jax.lax.cond(due, lambda op: select(op[0]), lambda op: op[1], (x, old))

    def structure(fn):
        return refresh_structure(jax.make_jaxpr(fn)(True, x, old).jaxpr)

    assert structure(every_step) == (0, 1)
    assert structure(both_branches) == (0, 2)
    assert structure(only_when_due) == (1, 0)
    batched = jax.make_jaxpr(jax.vmap(only_when_due, (0, None, None)))(jnp.array([True]), x, old)
    assert refresh_structure(batched.jaxpr) == (0, 1)  # lax.cond under vmap: a select


def _two_layer_params():
    return {
        "a": normal(0, (16, 12)),
        "b": normal(1, (16, 12)),  # same shape: one shared refresh program
        "c": normal(2, (40,)),
        "head": jnp.ones(3),
    }


@pytest.mark.parametrize("scope", ["chunk", "global"])
def test_non_refresh_steps_do_no_selection_work(scope):
    params = _two_layer_params()
    tx = nanoadam.nanoadam(1e-3, density=0.1, mask_interval=10, scope=scope, **chunks(scope))
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
    assert refresh_structure(jaxpr) == (1, 0)


def test_non_refresh_steps_do_no_selection_work_under_vmap_over_densities():
    params = _two_layer_params()

    def step(density):
        tx = nanoadam.nanoadam(1e-3, density, mask_interval=10, max_density=0.5, chunk_size=48)
        state = tx.init(params)
        return tx.update(params, state, params)

    jaxpr = jax.make_jaxpr(jax.vmap(step))(jnp.array([0.05, 0.1, 0.2])).jaxpr
    assert refresh_structure(jaxpr) == (1, 0)

    # The same with the state passed in (batched) and the step not at a refresh.
    def update(density, state):
        tx = nanoadam.nanoadam(1e-3, density, mask_interval=10, max_density=0.5, chunk_size=48)
        return tx.update(params, state, params)

    init = jax.vmap(
        lambda d: nanoadam.nanoadam(1e-3, d, 10, max_density=0.5, chunk_size=48).init(params)
    )
    densities = jnp.array([0.05, 0.1, 0.2])
    states = init(densities)
    jaxpr = jax.make_jaxpr(jax.vmap(update))(densities, states).jaxpr
    assert refresh_structure(jaxpr) == (1, 0)


def test_mask_pipeline_selects_only_under_its_refresh_conds():
    params = _two_layer_params()
    kw = dict(density=0.1, mask_interval=10, chunk_size=48)
    tx = optax.chain(
        nanoadam.magnitude_mask(**kw), optax.scale_by_adam(), nanoadam.masked_apply(**kw)
    )
    state = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, state, params).jaxpr
    assert refresh_structure(jaxpr) == (2, 0)


def test_refresh_cond_under_vmap_runs_the_refresh_only_when_some_run_is_due():
    calls = []

    def expensive(x):
        jax.debug.callback(lambda: calls.append(1))
        return x + 1

    def f(cond):
        return jax.jit(jax.vmap(lambda p, x: cond(p, expensive, lambda x: x, x)))

    ours, plain = f(refresh.cond), f(jax.lax.cond)
    for preds in ([True, False, True], [False, False, False], [True, True, True]):
        calls.clear()
        out = ours(jnp.array(preds), jnp.zeros(3))
        jax.effects_barrier()
        assert out.tolist() == [float(p) for p in preds]  # each run gets its own branch
        assert bool(calls) == any(preds), preds
    calls.clear()
    plain(jnp.array([False, False, False]), jnp.zeros(3))
    jax.effects_barrier()
    assert calls  # what refresh.cond avoids: a batched lax.cond runs both branches


# -- moments at a refresh ------------------------------------------------------------------------


def _first_step_of_new_entries(policy, bias_correction=True):
    """Largest |update| / lr of entries that enter the selection at a refresh."""
    lr = 1e-3
    w = jnp.linspace(0.01, 1.0, 100)
    params = {"w": w}
    tx = nanoadam.nanoadam(
        lr,
        density=0.1,
        mask_interval=50,
        refresh_policy=policy,
        bias_correction=bias_correction,
    )
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


def test_keep_policy_first_step_of_an_entering_entry_is_lr_with_its_own_age():
    # The default bias correction counts from the entry's own first update.
    assert _first_step_of_new_entries("keep") == pytest.approx(1.0, rel=1e-3)
    assert _first_step_of_new_entries("keep", "gradient") == pytest.approx(1.0, rel=1e-3)


def test_keep_policy_global_count_first_step_is_documented_bias_correction_factor():
    # With the global count t = 51 at the refresh, an entering entry's first Adam step is
    # (1 - b1) / (1 - b1**t) / sqrt((1 - b2) / (1 - b2**t)) times lr (2.5x at t = 1000).
    t = 51
    factor = 0.1 / (1 - 0.9**t) / np.sqrt(0.001 / (1 - 0.999**t))
    assert _first_step_of_new_entries("keep", "global") == pytest.approx(factor, rel=1e-3)


def test_keep_policy_carries_moments_of_entries_that_stay():
    params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4, 5.0, 6.0])}
    tx = nanoadam.sparse_update(
        optax.scale_by_adam(), density=0.5, mask_interval=2, refresh_policy="keep"
    )
    state = tx.init(params)
    g = {"w": jnp.arange(1.0, 7.0)}
    _, state = tx.update(g, state, params)  # selects 0, 1, 2
    assert np.asarray(state.selected["w"]).tolist() == [0, 1, 2]
    mu_before = np.asarray(state.sparse_inner_state.mu["w"])
    _, state = tx.update(g, state, params)
    params2 = {"w": jnp.array([0.1, 9.0, 0.3, 0.4, 5.0, 6.0])}  # entry 1 leaves, 3 enters
    _, state2 = tx.update({"w": jnp.zeros(6)}, state, params2)
    assert np.asarray(state2.selected["w"]).tolist() == [0, 2, 3]
    mu = np.asarray(state2.sparse_inner_state.mu["w"])
    mu_prev = np.asarray(state.sparse_inner_state.mu["w"])  # slots for entries 0, 1, 2
    np.testing.assert_allclose(mu, [0.9 * mu_prev[0], 0.9 * mu_prev[2], 0.0], rtol=1e-6)
    assert mu_before[0] != 0
    assert int(state2.sparse_inner_state.count) == 3  # "keep" never resets the count


def test_reset_policy_restarts_the_inner_state_and_count():
    params = {"w": jnp.array([0.1, 0.2, 0.3, 0.4, 5.0, 6.0])}
    tx = nanoadam.sparse_update(
        optax.scale_by_adam(), density=0.5, mask_interval=2, refresh_policy="reset"
    )
    state = tx.init(params)
    g = {"w": jnp.arange(1.0, 7.0)}
    for _ in range(2):
        _, state = tx.update(g, state, params)
    assert int(state.sparse_inner_state.count) == 2
    _, state = tx.update({"w": jnp.zeros(6)}, state, params)  # refresh: a fresh state
    assert int(state.sparse_inner_state.count) == 1
    np.testing.assert_array_equal(state.sparse_inner_state.mu["w"], 0.0)


# -- scopes and layouts agree --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_compact_and_full_size_state_agree_after_50_steps(policy):
    # With one sparse leaf, one threshold over all sparse leaves ("global": bool masks and
    # full-size inner state) is one selection per leaf ("leaf": positions and k-sized state).
    params = {"w": normal(0, (16, 12)), "head": jnp.ones(5)}
    kw = dict(density=0.15, mask_interval=7, refresh_policy=policy)
    p_c, s_c, _ = run(nanoadam.nanoadamw(3e-2, scope="leaf", **kw), params, 50)
    p_g, s_g, _ = run(nanoadam.nanoadamw(3e-2, scope="global", **kw), params, 50)
    assert s_c[0].selected["w"].shape == (ref_k(192, 0.15),)
    assert s_g[0].selected["w"].shape == (16, 12)
    chex.assert_trees_all_close(p_c, p_g, rtol=1e-5, atol=1e-6)


def test_chunks_and_layers_are_selected_like_separate_leaves():
    # A (4, 48) leaf in chunks of 48 is four 48-entry leaves; a (3, 8, 6) leaf whose
    # layer axis is declared is three (8, 6) leaves.
    a, b = normal(1, (4, 48)), normal(2, (3, 8, 6))
    joined = {"a": a, "b": b}
    split = {"a": list(a), "b": list(b)}
    kw = dict(density=0.2, mask_interval=3)
    dims = {"a": None, "b": nanoadam.SelectionDimensionNumbers(axes=(1, 2))}
    tx_joined = nanoadam.nanoadamw(3e-2, chunk_size=48, dimension_numbers=dims, **kw)
    tx_split = nanoadam.nanoadamw(3e-2, scope="leaf", **kw)
    p_j, s_j, _ = run(tx_joined, joined, 12)
    p_s, _, _ = run(tx_split, split, 12)
    assert s_j[0].selected["a"].shape == (4, ref_k(48, 0.2))
    assert s_j[0].selected["b"].shape == (3, ref_k(48, 0.2))
    chex.assert_trees_all_close(
        p_j, {"a": jnp.stack(p_s["a"]), "b": jnp.stack(p_s["b"])}, rtol=1e-6, atol=1e-7
    )


def test_schedule_sizes_buffers_for_its_maximum():
    sched = nanoadam.linear_density_decay(0.2, 0.05, decay_steps=10, density_interval=5)
    params = {"w": normal(0, (40, 10))}
    tx = nanoadam.nanoadam(1e-2, density=sched, mask_interval=100)
    _, state, hist = run(tx, params, 12)
    assert state[0].selected["w"].shape == (80,)
    counts = [int(np.count_nonzero(u["w"])) for _, u in hist]
    assert counts[:5] == [80] * 5 and counts[5:10] == [50] * 5 and counts[10:] == [20] * 2
    # The unused slots are padding (the chunk length) after the last refresh.
    assert (np.asarray(state[0].selected["w"])[20:] == 400).all()


# -- scopes and criteria through the transformation ------------------------------------------------


def test_global_scope_selects_k_over_all_sparse_leaves():
    params = {"a": jnp.linspace(0.0, 1.0, 10), "b": jnp.linspace(0.5, 2.0, 30)}
    tx = nanoadam.sparse_update(optax.sgd(1.0), density=0.25, scope="global")
    state = tx.init(params)
    u, state = tx.update({"a": jnp.ones(10), "b": jnp.ones(30)}, state, params)
    want = ref_global_masks([params["a"], params["b"]], 0.25)
    np.testing.assert_array_equal(nonzero(u["a"]), want[0])
    np.testing.assert_array_equal(nonzero(u["b"]), want[1])
    assert int(np.count_nonzero(u["a"])) + int(np.count_nonzero(u["b"])) == 10
    np.testing.assert_array_equal(state.selected["a"], want[0])  # bool masks


def test_chunk_scope_selects_k_in_every_chunk():
    # The smallest entries all sit in the first row: a per-leaf selection would take them
    # all, the per-chunk one takes k from every chunk (ties by position inside a chunk).
    w = jnp.concatenate([jnp.full((1, 40), 1e-3), jnp.ones((3, 40))]).reshape(4, 40)
    params = {"w": w}
    grads = {"w": jnp.ones((4, 40))}
    per_chunk = nanoadam.sparse_update(optax.sgd(1.0), density=0.25, chunk_size=40)
    u, state = per_chunk.update(grads, per_chunk.init(params), params)
    assert nonzero(u["w"]).sum(axis=1).tolist() == [10, 10, 10, 10]
    assert np.asarray(state.selected["w"])[1:].tolist() == [list(range(10))] * 3
    per_leaf = nanoadam.sparse_update(optax.sgd(1.0), density=0.25, scope="leaf")
    u, _ = per_leaf.update(grads, per_leaf.init(params), params)
    assert nonzero(u["w"]).sum(axis=1).tolist() == [40, 0, 0, 0]


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


def test_mask_and_sparse_update_select_the_same_entries():
    # Random keys (folded per refresh step and per leaf) make any difference in how the
    # two transformations cut, group or order the leaves visible.
    params = _two_layer_params()
    del params["c"]
    params["layers"] = normal(5, (2, 10, 9))
    sched = nanoadam.linear_density_decay(0.3, 0.1, decay_steps=4, density_interval=2)
    kw = dict(
        density=sched,
        mask_interval=3,
        chunk_size=30,
        criterion="random",
        seed=3,
        dimension_numbers=lambda path, leaf: (
            nanoadam.SelectionDimensionNumbers(axes=(1, 2)) if leaf.ndim == 3 else None
        ),
    )
    masker, sparse = nanoadam.magnitude_mask(**kw), nanoadam.sparse_update(optax.sgd(1.0), **kw)
    s_m, s_s = masker.init(params), sparse.init(params)
    up_m, up_s = jax.jit(masker.update), jax.jit(sparse.update)
    grads = jax.tree.map(jnp.ones_like, params)
    for t in range(6):  # refreshes at 0, 2 (density), 3 (interval), 4 (density)
        u_m, s_m = up_m(grads, s_m, params)
        u_s, s_s = up_s(grads, s_s, params)
        for name in ("a", "b", "layers"):
            np.testing.assert_array_equal(nonzero(u_m[name]), nonzero(u_s[name]), f"{name} {t}")
        params = jax.tree.map(lambda p, u: p - 0.01 * u * p, params, u_s)


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

    def leaks(tx):
        st, p, total, m = tx.init(params), params, 0, None
        update = jax.jit(tx.update)
        for t in range(9):
            g = {"w": jnp.sin(p["w"] * (t + 1))}
            u, st = update(g, st, p)
            m = ref_mask(p["w"], 0.2) if t % 3 == 0 else m
            total += int(np.count_nonzero(np.asarray(u["w"])[~m]))
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
    # MultiSteps runs the inner chain on every 3rd of 12 steps; apply_if_finite skips the
    # three steps with a NaN gradient (t = 1, 5, 9).
    assert int(inner_state[0].mask_step) == (4 if wrapper == "multisteps" else 9)


# -- optax ecosystem -----------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["chunk", "global"])
def test_init_on_shape_dtype_structs_and_eval_shape(scope):
    params = make_params()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    tx = nanoadam.nanoadam(1e-3, density=0.1, scope=scope, **chunks(scope))
    shapes = jax.eval_shape(tx.init, abstract)
    real = tx.init(params)
    chex.assert_trees_all_equal_shapes_and_dtypes(shapes, real)
    chex.assert_trees_all_equal_shapes_and_dtypes(tx.init(abstract), real)


@pytest.mark.parametrize("scope", ["chunk", "global"])
def test_tree_get_and_tree_map_params(scope):
    params = make_params()
    tx = nanoadam.nanoadam(1e-3, density=0.1, scope=scope)
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


@pytest.mark.parametrize("policy,tol,steps", [("reset", 5e-3, 3000), ("keep", 1e-3, 6000)])
def test_converges_on_overparameterised_rosenbrock(policy, tol, steps):
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
    # keep: entries that enter take unit first steps (per-entry bias correction), which
    # is slower here than the global count's 3x first steps (0.19 at 3000 steps).
    assert _minimise(tx, rosen, params, steps) < tol


def test_no_recompilation_on_second_call_and_extra_args():
    params = make_params()
    tx = nanoadam.nanoadam(1e-3, density=0.1, mask_interval=2)
    st = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, value=1.0, unknown_arg="x"))
    for i in range(5):
        _, st = update(grads_at(params, i), st, params)
    assert update._cache_size() == 1


def test_inject_hyperparams_learning_rate_and_traced_density():
    params = {"w": normal(0, (30,))}
    tx = optax.inject_hyperparams(nanoadam.nanoadam, static_args=("max_density",))(
        learning_rate=0.1, density=0.2, max_density=0.5, mask_interval=1000
    )
    st = tx.init(params)
    assert st.inner_state[0].selected["w"].shape == (15,)  # sized by max_density
    update = jax.jit(tx.update)
    u, st = update({"w": jnp.ones(30)}, st, params)
    assert int(np.count_nonzero(u["w"])) == 6
    st.hyperparams["learning_rate"] = jnp.asarray(0.01, jnp.float32)
    st.hyperparams["density"] = jnp.asarray(0.5, jnp.float32)
    u, st = update({"w": jnp.ones(30)}, st, params)
    # A density change triggers a refresh even though mask_interval is 1000.
    assert int(np.count_nonzero(u["w"])) == 15
    assert float(jnp.max(jnp.abs(u["w"]))) == pytest.approx(0.01, rel=1e-3)


def test_injected_density_above_its_init_value_is_capped_at_the_capacity():
    params = {"w": normal(0, (30,))}
    tx = optax.inject_hyperparams(nanoadam.nanoadam)(learning_rate=0.1, density=0.2)
    st = tx.init(params)
    assert st.inner_state[0].selected["w"].shape == (6,)  # sized by the value at init
    st.hyperparams["density"] = jnp.asarray(0.5, jnp.float32)
    u, st = jax.jit(tx.update)({"w": jnp.ones(30)}, st, params)
    np.testing.assert_array_equal(nonzero(u["w"]), ref_mask(params["w"], 0.2))  # 6 smallest


def test_chained_after_clip_by_global_norm_and_bf16_dtype():
    params = {"w": normal(0, (64,)).astype(jnp.bfloat16)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), nanoadam.nanoadam(1e-2, density=0.25))
    st = tx.init(params)
    g = {"w": jnp.full((64,), 10.0, jnp.bfloat16)}
    u, st = jax.jit(tx.update)(g, st, params)
    assert u["w"].dtype == jnp.bfloat16
    assert int(np.count_nonzero(np.asarray(u["w"], np.float32))) == 16
    new = optax.apply_updates(params, u)
    assert new["w"].dtype == jnp.bfloat16


def test_vmap_over_densities_matches_loop():
    params = {"w": normal(0, (40, 5))}
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


def test_init_under_vmap_over_densities_needs_max_density():
    params = {"w": jnp.ones((4, 5))}
    init = jax.vmap(lambda d: nanoadam.nanoadam(0.1, density=d).init(params))
    with pytest.raises(ValueError, match=r"traced.*pass `max_density`"):
        init(jnp.array([0.1, 0.2]))
    sized = jax.vmap(lambda d: nanoadam.nanoadam(0.1, density=d, max_density=0.2).init(params))
    assert sized(jnp.array([0.1, 0.2]))[0].selected["w"].shape == (2, 4)


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
    params = {"w": normal(0, (6, 7)), "head": jnp.ones(3)}
    kwargs = dict(density=0.3, mask_interval=3, refresh_policy=policy)
    ours = nanoadam.nanoadam(schedule, **kwargs)
    reference = optax.chain(
        nanoadam.sparse_update(optax.scale_by_adam(), **kwargs),
        optax.scale_by_learning_rate(schedule),
    )
    p1, p2 = params, params
    s1, s2 = ours.init(p1), reference.init(p2)
    u1_step, u2_step = jax.jit(ours.update), jax.jit(reference.update)
    for i in range(12):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p1)
        u1, s1 = u1_step(g, s1, p1)
        u2, s2 = u2_step(g, s2, p2)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-7)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


IN_PLACE_SCRIPT = r"""
import re
import jax, jax.numpy as jnp, optax
import nanoadam_jax as nanoadam

assert jax.device_count() == 1
params = {"w": jax.random.normal(jax.random.PRNGKey(0), (1024, 1024))}
for kw in (dict(), dict(max_density=0.2)):  # static density / padded positions
    tx = nanoadam.nanoadam(1e-3, density=0.1, **kw)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, tx.init(params), params)
    hlo = lowered.compile().as_text()
    entry = hlo[hlo.index("\nENTRY") :].splitlines()
    param = next(re.match(r"\s*(%\S+) = .* parameter\(0\)", x) for x in entry if "ter(0)" in x)
    root = next(x for x in entry if x.strip().startswith("ROOT"))
    new_w = re.search(r"tuple\((%[^,)]+)", root).group(1)
    define = next(x for x in entry if x.strip().startswith(new_w + " = "))
    # The new parameters are a scatter(-add) fusion whose operand is the old parameters
    # (updated in place), not params + (a zero-filled, parameter-sized update).
    scatter = r"\s*%\S*scatter\S* = f32\[1024,1024\]\S* (?:fusion|scatter)\((%[^,)]+)"
    first = re.match(scatter, define)
    assert first and first.group(1) == param.group(1), (kw, define)
print("IN-PLACE-OK")
"""


def test_jitted_step_applies_sparse_updates_in_place():
    # The learning rate is applied inside sparse_update and the update is a scatter-add
    # into zeros: XLA turns params + scatter_add(0, ...) into a scatter-add into the
    # (donated) parameters, so an ordinary step needs no parameter-sized update buffer.
    # Checked on the optimized HLO (the refresh branch's scratch dominates the temp
    # size), on one device, in a subprocess (this session has 8 host devices).
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-c", IN_PLACE_SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "IN-PLACE-OK" in proc.stdout, proc.stderr[-3000:]


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
    chex.assert_trees_all_equal_structs(s_on[0].sparse_inner_state, s_off[0].sparse_inner_state)
    chex.assert_trees_all_close(s_on[0].sparse_inner_state, s_off[0].sparse_inner_state)
    assert s_off[0].sparse_age is None  # no age without a per-entry correction
    assert s_on[0].sparse_age["w"].dtype == jnp.uint16
    # Later steps follow the uncorrected Adam formula m / (sqrt(v) + eps).
    u2, _ = off.update(g, s_off, params)
    m = (1 - 0.9**2) * 2 * g["w"] / 2  # two steps of a constant gradient
    v = (1 - 0.999**2) * g["w"] ** 2
    expected = -0.1 * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(u2["w"][selected], expected[selected], rtol=1e-4)
    with pytest.raises(ValueError, match="bias_correction"):
        nanoadam.nanoadamw(0.1, bias_correction=1)
