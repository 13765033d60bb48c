"""The compact optimizer state: chunk layout, size, dtypes, capacity, low-precision moments,
huge leaves."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from reference_selection import ref_chunk_length, ref_k, ref_positions

import nanoadam_jax as nanoadam
from nanoadam_jax import layout


def tree_bytes(tree):
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def params_of(n_rows=256, n_cols=512):
    return {
        "a": jnp.ones((n_rows, n_cols)),
        "b": jnp.ones((n_cols, n_rows)),
        "head": {"kernel": jnp.ones((n_rows, 4))},
    }


# -- the chunk layout ------------------------------------------------------------------------------


def test_chunk_length_documented_examples():
    assert layout.DEFAULT_CHUNK_SIZE == 16384
    assert layout.chunk_length((4096, 1024)) == 16384  # 16 rows of 1024
    assert layout.chunk_length((300, 20)) == 6000  # fits whole
    # 2 rows of 30 would fit, but 20 rows split over 5 or 10 devices give shards of 4 or
    # 2 rows: one row per chunk keeps every FSDP mesh's chunking the one-device one.
    assert layout.chunk_length((20, 30), 100) == 30
    assert layout.chunk_length((384, 384)) == 3072  # 8 rows: 384 / 48 rows per shard max
    assert layout.chunk_length((4, 37), 32) == 37  # 37 is prime: one whole (longer) row
    assert layout.chunk_length((1024, 20011), 16384) == 20011  # a row above the target


@pytest.mark.parametrize(
    "shape",
    [(1,), (7,), (97, 1), (7, 3), (13, 17, 5), (64, 48), (4096, 1024), (300, 20), (11, 6, 10)],
)
@pytest.mark.parametrize("target", [1, 2, 5, 16, 48, 100, 16384])
def test_chunk_length_follows_the_rule(shape, target):
    c = layout.chunk_length(shape, target)
    assert c == ref_chunk_length(shape, target)
    assert math.prod(shape) % c == 0  # equal chunks, none crossing the end


def test_leaf_layout_grid_capacity_and_index_dtype():
    lay = layout.leaf_layout((4, 64, 512), batch_axes=(0,), max_density=0.1)  # documented
    assert (lay.grid, lay.chunk, lay.capacity) == ((4, 16), 2048, 205)
    assert lay.state_shape == (4, 16, 205) and lay.index_dtype == jnp.uint16
    # A layer axis that is not leading is moved first.
    lay = layout.leaf_layout((64, 4, 512), batch_axes=(1,), max_density=0.1)
    assert lay.permutation == (1, 0, 2) and lay.grid == (4, 16)
    # Positions are uint16 while a chunk has fewer than 65536 entries (padding = C fits).
    assert layout.leaf_layout((65535,), scope="leaf").index_dtype == jnp.uint16
    assert layout.leaf_layout((65536,), scope="leaf").index_dtype == jnp.int32
    assert layout.leaf_layout((65536,)).index_dtype == jnp.uint16  # chunks of 16384


def test_view_and_unview_round_trip_with_layer_axes():
    x = jnp.arange(2 * 6 * 4.0).reshape(6, 2, 4)
    lay = layout.leaf_layout(x.shape, batch_axes=(1,), chunk_size=8, max_density=0.5)
    v = lay.view(x)
    assert v.shape == (2, 6, 4)
    # Layer 0's matrix x[:, 0, :], flattened row-major, cut into chunks of one row (4):
    # 6 rows split over 6 devices leave one row per shard.
    np.testing.assert_array_equal(v[0].reshape(-1), np.asarray(x[:, 0, :]).reshape(-1))
    chex.assert_trees_all_equal(lay.unview(v), x)


# -- state size ------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5])
def test_state_bytes_scale_with_density_f32_uint16(density):
    params = params_of()
    ours = jax.eval_shape(nanoadam.nanoadam(1e-3, density=density).init, params)
    # 16 chunks of 16 rows x 512 (256 rows over 16 devices: 16 rows per shard).
    assert ours[0].selected["a"].shape == (16, ref_k(8192, density))
    assert ours[0].selected["a"].dtype == jnp.uint16
    ref = jax.eval_shape(optax.adamw(1e-3).init, params)
    n_sparse = 2 * 256 * 512
    dense_part = 2 * 4 * 256 * 4  # head: m and v, float32
    sparse_ratio = (tree_bytes(ours) - dense_part) / (tree_bytes(ref) - dense_part)
    # m, v (float32), a uint16 position and a uint16 age per selected entry: 12 bytes vs 8.
    k = 32 * ref_k(8192, density)  # 32 chunks over the two sparse leaves
    assert sparse_ratio == pytest.approx(1.5 * k / n_sparse, rel=1e-3)
    assert sparse_ratio <= 1.5 * (density + 0.5 / 8192)  # k rounds half up per chunk


def test_leaf_scope_above_65535_entries_stores_int32_positions():
    params = params_of()
    state = jax.eval_shape(nanoadam.nanoadam(1e-3, density=0.1, scope="leaf").init, params)
    k = ref_k(256 * 512, 0.1)
    assert state[0].selected["a"].shape == (k,) and state[0].selected["a"].dtype == jnp.int32
    assert state[0].sparse_inner_state.mu["a"].shape == (k,)


def test_bf16_moments_and_uint16_positions_below_0_8_density():
    params = params_of()
    tx = nanoadam.nanoadam(1e-3, density=0.1, moment_dtype=jnp.bfloat16, chunk_size=4096)
    state = jax.eval_shape(tx.init, params)
    assert state[0].selected["a"].dtype == jnp.uint16
    assert state[0].selected["a"].shape == (32, 410)
    assert state[0].sparse_inner_state.mu["a"].dtype == jnp.bfloat16
    assert state[0].dense_inner_state.mu["head"]["kernel"].dtype == jnp.bfloat16
    ref = jax.eval_shape(optax.adamw(1e-3).init, params)
    # bf16 m and v, uint16 position and age: 8 bytes per selected entry (AdamW: 8 per entry).
    assert tree_bytes(state) / tree_bytes(ref) <= 1.0 * 0.1 + 0.01  # + the dense head
    tx = nanoadam.nanoadam(
        1e-3, density=0.1, moment_dtype=jnp.bfloat16, chunk_size=4096, bias_correction="global"
    )
    state = jax.eval_shape(tx.init, params)  # the paper's memory model: 6 bytes per entry
    assert tree_bytes(state) / tree_bytes(ref) <= 0.75 * 0.1 + 0.01


def test_state_shapes_follow_the_layer_axes_and_chunk_grid():
    params = {"w": jnp.ones((3, 40, 12)), "v": jnp.ones((10, 7)), "head": jnp.ones(3)}
    dims = {"w": nanoadam.SelectionDimensionNumbers(axes=(1, 2)), "v": None, "head": None}
    st = nanoadam.nanoadam(1e-3, 0.1, chunk_size=48, dimension_numbers=dims).init(params)[0]
    # w: 3 layers x 40 chunks of one row of 12 (40 rows split over 40 / 5, 40 / 8, ...
    # devices: one row per chunk keeps every FSDP mesh's chunks), k = round(1.2) = 1;
    # v: no layer axis, 10 chunks of one row of 7, k = round(0.7) = 1.
    assert st.selected["w"].shape == (3, 40, 1) and st.selected["v"].shape == (10, 1)
    assert st.sparse_inner_state.mu["w"].shape == (3, 40, 1)
    assert st.sparse_inner_state.nu["v"].shape == (10, 1)


def test_compact_state_is_k_sized_and_global_state_is_full_size():
    params = {"w": jnp.zeros((100, 50))}
    sparse = nanoadam.nanoadam(1e-3, density=0.1).init(params)[0]
    assert sparse.selected["w"].shape == (500,)  # one chunk of 5000 entries
    assert sparse.sparse_inner_state.mu["w"].shape == (500,)
    dense = nanoadam.nanoadam(1e-3, density=0.1, scope="global").init(params)[0]
    assert dense.selected["w"].shape == (100, 50) and dense.selected["w"].dtype == jnp.bool_
    assert dense.sparse_inner_state.mu["w"].shape == (100, 50)


def test_dense_leaves_and_frozen_leaves_hold_no_sparse_buffers():
    params = {"w": jnp.ones((10, 10)), "head": jnp.ones(3), "i": jnp.zeros(2, jnp.int32)}
    st = nanoadam.nanoadam(1e-3, density=0.1).init(params)[0]
    assert st.selected["head"] is None and st.selected["i"] is None
    assert st.sparse_inner_state.mu["head"] is None
    assert st.dense_inner_state.mu["head"].shape == (3,)
    assert st.dense_inner_state.mu["w"] is None
    assert st.dense_inner_state.mu["i"] is None and st.sparse_inner_state.mu["i"] is None


# -- capacity: k of the largest density the run uses -----------------------------------------------


def test_capacity_from_schedule_max_max_density_and_injected_density():
    params = {"w": jnp.ones((40, 10))}
    sched = nanoadam.linear_density_decay(0.05, 0.2, decay_steps=10)  # max 0.2, at the end
    assert nanoadam.nanoadam(1e-3, sched).init(params)[0].selected["w"].shape == (80,)
    probed = nanoadam.nanoadam(1e-3, lambda t: jnp.where(t < 500, 0.1, 0.3)).init(params)
    assert probed[0].selected["w"].shape == (120,)  # found by probing the schedule
    big = nanoadam.nanoadam(1e-3, 0.1, max_density=0.5).init(params)
    assert big[0].selected["w"].shape == (200,)
    injected = optax.inject_hyperparams(nanoadam.nanoadam)(learning_rate=0.1, density=0.2)
    assert injected.init(params).inner_state[0].selected["w"].shape == (80,)


def test_traced_density_below_capacity_pads_with_the_chunk_length():
    # A chunk of 65535 entries: the padding value 65535 is the largest uint16.
    n = 65535
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=n), jnp.float32)}
    tx = optax.inject_hyperparams(nanoadam.nanoadam, static_args=("max_density", "scope"))(
        learning_rate=1.0, density=0.01, max_density=0.02, scope="leaf"
    )
    state = tx.init(params)
    sel = state.inner_state[0].selected["w"]
    assert sel.shape == (ref_k(n, 0.02),) and sel.dtype == jnp.uint16
    u, state = jax.jit(tx.update)({"w": jnp.ones(n)}, state, params)
    sel = np.asarray(state.inner_state[0].selected["w"])
    k = ref_k(n, 0.01)
    assert (sel[k:] == n).all()
    np.testing.assert_array_equal(sel[:k], ref_positions(params["w"], 0.01, "leaf")[0])
    assert int(jnp.sum(u["w"] != 0)) == k


# -- moments in low precision ----------------------------------------------------------------------


def test_bf16_moments_track_float32_moments():
    params = {"w": jax.random.normal(jax.random.PRNGKey(0), (64, 32))}
    runs = {}
    for dt in (None, jnp.bfloat16):
        tx = nanoadam.nanoadam(1e-2, density=0.2, mask_interval=5, moment_dtype=dt, chunk_size=512)
        p, st = params, tx.init(params)
        update = jax.jit(tx.update)
        for t in range(20):
            g = jax.grad(lambda q: jnp.sum(jnp.sin(q["w"] * (t + 1))))(p)
            u, st = update(g, st, p)
            p = optax.apply_updates(p, u)
        assert st[0].sparse_inner_state.nu["w"].dtype == (dt or jnp.float32)
        runs[dt] = p
    # 20 steps of 0.01 move entries by up to 0.2; bf16 moments change that by a few percent.
    chex.assert_trees_all_close(runs[None], runs[jnp.bfloat16], atol=1e-2)
    assert not jnp.array_equal(runs[None]["w"], runs[jnp.bfloat16]["w"])


# -- huge leaves -----------------------------------------------------------------------------------


def test_leaves_above_int32_range_work_with_chunk_scope():
    n = 2**31 + 2**14  # 16384 * 131073 = 2**14 * 3 * 43691: 48 | n, and n / 48 = 2**10 * 43691
    params = {"huge": jax.ShapeDtypeStruct((n,), jnp.bfloat16)}
    tx = nanoadam.nanoadam(1e-3, density=0.01)
    state = jax.eval_shape(tx.init, params)
    assert state[0].selected["huge"].shape == (n // 1024, 10)  # chunks of 1024 (2**10)
    assert state[0].selected["huge"].dtype == jnp.uint16
    # The whole update lowers (nothing is allocated).
    lowered = jax.jit(tx.update).lower(params, state, params)
    assert "scatter" in lowered.as_text()


@pytest.mark.parametrize(
    ("n", "scope"),
    [(2**31 + 2**14, "leaf"), (2**31 + 11, "chunk")],  # 2**31 + 11 has no divisor near 16384
    ids=["leaf-scope", "awkward-length"],
)
def test_chunks_above_int32_range_are_refused(n, scope):
    """A chunk of more than 2**31 - 1 entries cannot be indexed by int32 positions: the
    state must not be created with int32 positions (it would silently wrap)."""
    params = {"huge": jax.ShapeDtypeStruct((n,), jnp.bfloat16)}
    tx = nanoadam.nanoadam(1e-3, density=0.01, scope=scope)
    with pytest.raises(ValueError, match="chunk"):
        jax.eval_shape(tx.init, params)
