"""The compact optimizer state: size, dtypes, low-precision moments, huge leaves."""

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import nanoadam_jax as nanoadam


def tree_bytes(tree):
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def params_of(n_rows=256, n_cols=512):
    return {
        "a": jnp.ones((n_rows, n_cols)),
        "b": jnp.ones((n_cols, n_rows)),
        "head": {"kernel": jnp.ones((n_rows, 4))},
    }


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
def test_state_bytes_scale_with_density_f32_int32(density):
    params = params_of()
    ours = jax.eval_shape(
        nanoadam.nanoadam(1e-3, density=density, narrow_indices=False).init, params
    )
    ref = jax.eval_shape(optax.adamw(1e-3).init, params)
    n_sparse = 2 * 256 * 512
    dense_part = 2 * 4 * 256 * 4  # head: m and v, float32
    sparse_ratio = (tree_bytes(ours) - dense_part) / (tree_bytes(ref) - dense_part)
    # m, v (float32) and one int32 position per selected entry: 12 bytes vs 8 bytes.
    k = int(nanoadam.num_selected(256 * 512, density))
    assert sparse_ratio == pytest.approx(1.5 * 2 * k / n_sparse, rel=1e-3)
    assert sparse_ratio <= 1.5 * density * 1.001


def test_bf16_moments_and_block_local_indices_below_0_8_density():
    params = params_of()
    tx = nanoadam.nanoadam(
        1e-3, density=0.1, moment_dtype=jnp.bfloat16, scope="block", block_size=4096
    )
    state = jax.eval_shape(tx.init, params)
    assert state[0].selected["a"].dtype == jnp.uint16
    assert state[0].sparse_inner_state.mu["a"].dtype == jnp.bfloat16
    ref = jax.eval_shape(optax.adamw(1e-3).init, params)
    assert tree_bytes(state) / tree_bytes(ref) <= 0.8 * 0.1 + 0.01  # + the dense head


def test_bf16_moments_track_float32_moments():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 32))}
    runs = {}
    for dt in (None, jnp.bfloat16):
        tx = nanoadam.nanoadam(1e-2, density=0.2, mask_interval=5, moment_dtype=dt)
        p, st = params, tx.init(params)
        update = jax.jit(tx.update)
        for t in range(20):
            g = jax.grad(lambda q: jnp.sum(jnp.sin(q["w"] * (t + 1))))(p)
            u, st = update(g, st, p)
            p = optax.apply_updates(p, u)
        runs[dt] = p
    # 20 steps of 0.01 move entries by up to 0.2; bf16 moments change that by a few percent.
    chex.assert_trees_all_close(runs[None], runs[jnp.bfloat16], atol=1e-2)
    assert not jnp.array_equal(runs[None]["w"], runs[jnp.bfloat16]["w"])


def test_leaves_above_int32_range_work_with_block_scope():
    n = 2**31 + 1000
    params = {"huge": jax.ShapeDtypeStruct((n,), jnp.bfloat16)}
    tx = nanoadam.nanoadam(1e-3, density=0.01, scope="block", block_size=4096)
    state = jax.eval_shape(tx.init, params)
    rows = -(-n // 4096)
    assert state[0].selected["huge"].shape == (rows, 41)
    assert state[0].selected["huge"].dtype == jnp.uint16
    # The whole update lowers (nothing is allocated).
    lowered = jax.jit(tx.update).lower(params, state, params)
    assert "scatter" in lowered.as_text()
    with pytest.raises(ValueError, match="scope='block'"):
        jax.eval_shape(nanoadam.nanoadam(1e-3, density=0.01).init, params)


def test_dense_leaves_and_frozen_leaves_hold_no_sparse_buffers():
    params = {"w": jnp.ones((10, 10)), "head": jnp.ones(3), "i": jnp.zeros(2, jnp.int32)}
    st = nanoadam.nanoadam(1e-3, density=0.1).init(params)[0]
    assert st.selected["head"] is None and st.selected["i"] is None
    assert st.sparse_inner_state.mu["head"] is None
    assert st.dense_inner_state.mu["head"].shape == (3,)
    assert st.dense_inner_state.mu["w"] is None
