"""Every selected entry steps like Adam: the per-entry age behind ``bias_correction=True``.

With a constant gradient ``optax.adam`` moves every entry by exactly ``lr`` per step, at
any step count. NanoAdam's default bias correction counts each entry's steps from when it
entered the selection (a ``uint16`` age in the state), so entries that enter late do too.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nanoadam_jax as nanoadam

LR = 1e-3


def _swap_half(w: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """``w`` with half of the currently selected (smallest) entries made large, so that
    the next refresh selects other entries in their place."""
    w = w.copy().reshape(-1)
    chosen = np.flatnonzero(selected.reshape(-1))
    w[chosen[::2]] += 10.0
    return w.reshape(selected.shape)


def _constant_gradient_steps(tx, steps_before: int, steps_after: int, refreshes: int = 1):
    """Per-step |update| / lr of entering and staying entries after ``refreshes`` swaps
    of half the selection, each preceded by ``steps_before`` steps."""
    w = np.random.default_rng(0).permutation(256).reshape(16, 16) / 256.0 + 0.01
    params = {"w": jnp.asarray(w, jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    g = {"w": jnp.ones((16, 16))}
    entering, staying = [], []
    for _ in range(refreshes):
        for _ in range(steps_before):
            u, state = update(g, state, params)
        old = np.asarray(u["w"] != 0)
        params = {"w": jnp.asarray(_swap_half(np.asarray(params["w"]), old), jnp.float32)}
        for _ in range(steps_after):
            u, state = update(g, state, params)
            moved = np.abs(np.asarray(u["w"])) / LR
            new = np.asarray(u["w"] != 0)
            entering.append(moved[new & ~old])
            staying.append(moved[new & old])
    return np.concatenate(entering), np.concatenate(staying), state


def test_constant_gradient_moves_every_selected_entry_lr_per_step_at_any_step_count():
    # 2000 steps (past 1 / (1 - b2)), then half the selection changes at the refresh.
    tx = nanoadam.nanoadam(LR, density=0.25, mask_interval=50)
    entering, staying, _ = _constant_gradient_steps(tx, 2000, 20)
    assert entering.size and staying.size
    np.testing.assert_allclose(entering, 1.0, rtol=1e-4)
    np.testing.assert_allclose(staying, 1.0, rtol=1e-4)


def test_constant_gradient_after_many_refreshes():
    tx = nanoadam.nanoadam(LR, density=0.25, mask_interval=10)
    entering, staying, state = _constant_gradient_steps(tx, 30, 10, refreshes=6)
    np.testing.assert_allclose(entering, 1.0, rtol=1e-4)
    np.testing.assert_allclose(staying, 1.0, rtol=1e-4)
    age = np.asarray(state[0].sparse_age["w"])
    assert age.dtype == np.uint16 and age.min() < age.max()  # entries of different ages


def test_global_count_is_the_documented_defect():
    """``bias_correction="global"``: entering entries under the running count take
    steps of about 3 lr at first and up to 6 lr over their first 20 steps."""
    tx = nanoadam.nanoadam(LR, density=0.25, mask_interval=50, bias_correction="global")
    entering, staying, _ = _constant_gradient_steps(tx, 2000, 20)
    np.testing.assert_allclose(staying, 1.0, rtol=1e-4)
    assert 5.5 < entering.max() < 6.5


def test_gradient_initialised_moments_give_unit_steps_without_extra_state():
    tx = nanoadam.nanoadam(LR, density=0.25, mask_interval=50, bias_correction="gradient")
    entering, staying, state = _constant_gradient_steps(tx, 300, 20)
    np.testing.assert_allclose(entering, 1.0, rtol=1e-4)
    np.testing.assert_allclose(staying, 1.0, rtol=1e-4)
    assert state[0].sparse_age is None


def test_age_state_costs_two_bytes_per_selected_entry():
    params = {"w": jnp.zeros((64, 64))}
    with_age = nanoadam.nanoadam(LR, density=0.1).init(params)[0]
    without = nanoadam.nanoadam(LR, density=0.1, bias_correction="global").init(params)[0]
    assert with_age.sparse_age["w"].dtype == jnp.uint16
    assert with_age.sparse_age["w"].shape == with_age.selected["w"].shape
    assert without.sparse_age is None


def test_age_saturates():
    params = {"w": jnp.linspace(0.1, 1.0, 10)}
    tx = nanoadam.nanoadam(LR, density=0.5, mask_interval=10**6)
    state = tx.init(params)
    _, state = tx.update({"w": jnp.ones(10)}, state, params)
    inner = state[0]
    near = jax.tree.map(lambda a: jnp.full_like(a, 0xFFFE), inner.sparse_age)
    state = (inner._replace(sparse_age=near),)
    for _ in range(3):
        u, state = tx.update({"w": jnp.ones(10)}, state, params)
    assert int(state[0].sparse_age["w"].min()) == 0xFFFF
    assert np.all(np.isfinite(np.asarray(u["w"])))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_density_one_is_optax_adam_across_refreshes(wd):
    rng = np.random.default_rng(1)
    params = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "b": jnp.zeros(6)}
    ours = (
        nanoadam.nanoadamw(1e-2, density=1.0, mask_interval=3, weight_decay=wd)
        if wd
        else nanoadam.nanoadam(1e-2, density=1.0, mask_interval=3)
    )
    theirs = optax.adamw(1e-2, weight_decay=wd) if wd else optax.adam(1e-2)
    p1 = p2 = params
    s1, s2 = ours.init(params), theirs.init(params)
    update1, update2 = jax.jit(ours.update), jax.jit(theirs.update)
    for t in range(10):
        g = jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) + 0.1, p1)
        u1, s1 = update1(g, s1, p1)
        u2, s2 = update2(g, s2, p2)
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-9)
        p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)


def test_bf16_moments_keep_unit_steps():
    tx = nanoadam.nanoadam(LR, density=0.25, mask_interval=10, moment_dtype=jnp.bfloat16)
    entering, staying, state = _constant_gradient_steps(tx, 30, 10, refreshes=2)
    # bfloat16 keeps 8 bits of each moment: steps within a few percent of lr (the global
    # count's entering steps would be about 2.6 lr here).
    np.testing.assert_allclose(entering, 1.0, rtol=4e-2)
    np.testing.assert_allclose(staying, 1.0, rtol=4e-2)
    assert state[0].sparse_inner_state.mu["w"].dtype == jnp.bfloat16


def test_stacked_layers_have_one_age_per_layer_slot():
    rng = np.random.default_rng(2)
    params = {"blocks": jnp.asarray(rng.normal(size=(3, 32, 32)), jnp.float32)}
    dims = nanoadam.SelectionDimensionNumbers(axes=(1, 2))
    tx = nanoadam.nanoadam(LR, density=0.1, mask_interval=2, dimension_numbers=dims)
    state = tx.init(params)
    age, sel = state[0].sparse_age["blocks"], state[0].selected["blocks"]
    assert age.shape == sel.shape and age.shape[0] == 3
    g = {"blocks": jnp.ones((3, 32, 32))}
    for _ in range(3):
        _, state = tx.update(g, state, params)
    # The refresh at step 2 re-selects the same entries (the parameters did not move):
    # they keep their ages, 3 updates each, in every layer.
    np.testing.assert_array_equal(np.asarray(state[0].sparse_age["blocks"]), 3)
    params = {"blocks": params["blocks"].at[1].multiply(100.0).at[1, 0].set(0.0)}
    for _ in range(2):  # refresh at step 4: layer 1's row 0 is now the smallest
        _, state = tx.update(g, state, params)
    age = np.asarray(state[0].sparse_age["blocks"])
    assert age[0].min() == 5 and age[2].min() == 5  # other layers: no change
    assert age[1].min() == 1  # entered at step 4, one update since


def test_vmap_over_densities_keeps_ages_per_run():
    params = {"w": jnp.linspace(0.01, 1.0, 64).reshape(8, 8)}
    g = {"w": jnp.ones((8, 8))}

    def run(density):
        tx = nanoadam.nanoadam(LR, density=density, mask_interval=3, max_density=0.5)
        state = tx.init(params)
        for _ in range(4):
            u, state = tx.update(g, state, params)
        return u, state[0].sparse_age

    us, ages = jax.jit(jax.vmap(run))(jnp.array([0.1, 0.5]))
    for i, d in enumerate((0.1, 0.5)):
        u_single, age_single = run(d)
        chex.assert_trees_all_close(jax.tree.map(lambda x: x[i], us), u_single, rtol=1e-6)
        chex.assert_trees_all_equal(jax.tree.map(lambda x: x[i], ages), age_single)
