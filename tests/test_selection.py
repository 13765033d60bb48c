"""Tests of the selection rule: exact k, ties by index, per-chunk positions, criteria, methods."""

import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference_selection import ref_chunk_positions, ref_mask, ref_order

import nanoadam_jax as nanoadam
from nanoadam_jax import layout, selection

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks._selection_variants import chunk_positions_top_k  # noqa: E402


def reference_mask(x, k, criterion="smallest"):
    """The ``k`` first entries in selection order (float32 |x|, NaN last, ties by index)."""
    flat = np.asarray(x).astype(np.float32).reshape(-1)
    m = np.zeros(flat.shape, bool)
    m[ref_order(flat, criterion)[:k]] = True
    return m.reshape(np.shape(x))


# -- the rounding rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("n,d,k", [(1000, 0.1, 100), (10, 0.05, 1), (3, 0.5, 2), (7, 1.0, 7)])
def test_num_selected_rounding(n, d, k):
    assert int(nanoadam.num_selected(n, d)) == k
    assert selection.num_selected_static(n, d) == k


def test_num_selected_empty_leaf():
    assert int(nanoadam.num_selected(0, 0.5)) == 0
    assert selection.num_selected_static(0, 0.5) == 0


def test_num_selected_static_agrees_with_the_traced_rule():
    # The static count sizes the state, the traced one selects: they must never differ.
    for n in (1, 7, 48, 1000, 16384, 65535, 2**24 + 3):
        for d in (1e-4, 0.001, 0.01, 0.05, 0.1, 1 / 3, 0.5, 0.999, 1.0):
            assert selection.num_selected_static(n, d) == int(nanoadam.num_selected(n, d)), (n, d)


def test_num_selected_with_traced_out_of_range_density():
    k = jax.jit(jax.vmap(lambda d: nanoadam.num_selected(10, d)))
    out = k(jnp.array([-1.0, 0.0, 0.5, 1.0, 2.0, jnp.inf, jnp.nan]))
    assert out.tolist() == [1, 1, 5, 10, 10, 10, 0]


# -- keys ----------------------------------------------------------------------------------------


def test_selection_keys_order_magnitudes_and_put_nan_last():
    x = jnp.array([0.5, -0.1, jnp.nan, 2.0, -0.0, jnp.inf, -jnp.nan])
    small = np.asarray(nanoadam.selection_keys(x, "smallest"))
    large = np.asarray(nanoadam.selection_keys(x, "largest"))
    rand = np.asarray(nanoadam.selection_keys(x, "random", jax.random.PRNGKey(0)))
    assert small.dtype == large.dtype == rand.dtype == np.uint32
    assert np.argsort(small[[0, 1, 3, 4, 5]], stable=True).tolist() == [3, 1, 0, 2, 4]
    assert np.argsort(large[[0, 1, 3, 4, 5]], stable=True).tolist() == [4, 2, 0, 1, 3]
    for keys in (small, large, rand):
        nan = np.isnan(np.asarray(x))
        assert (keys[nan] == 0xFFFFFFFF).all()
        assert (keys[~nan] < 0xFFFFFFFF).all()  # never tied with a NaN


# -- select_mask (per chunk / per layer matrix) ----------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_exact_k_matches_stable_sort_reference(dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (37, 29)).astype(dtype)
    select = jax.jit(layout.select_mask, static_argnames="scope")  # one compile per dtype
    for d in (0.01, 0.1, 0.33, 1.0):
        m = select(x, d, scope="leaf")
        k = int(nanoadam.num_selected(x.size, d))
        assert int(m.sum()) == k
        np.testing.assert_array_equal(np.asarray(m), reference_mask(x, k))


def test_heavy_ties_broken_by_flat_index():
    # bf16 rounds many values to the same number: every entry ties.
    x = jnp.full((4, 5), 0.5, jnp.bfloat16)
    m = nanoadam.select_mask(x, 0.3)
    assert m.reshape(-1).tolist() == [True] * 6 + [False] * 14


def test_negative_zero_ties_with_zero():
    x = jnp.array([0.0, -0.0, 1.0, -0.0])
    assert nanoadam.select_mask(x, 0.5).tolist() == [True, True, False, False]


def test_nan_is_never_small_and_k_is_exact():
    x = jnp.array([jnp.nan, 0.3, jnp.nan, -0.1, 5.0, jnp.inf])
    assert nanoadam.select_mask(x, 0.5).tolist() == [False, True, False, True, True, False]
    # More NaNs than n - k: they fill the remaining slots in index order.
    y = jnp.array([jnp.nan, jnp.nan, 1.0, jnp.nan])
    assert nanoadam.select_mask(y, 0.5).tolist() == [True, False, True, False]


def test_largest_criterion():
    x = jax.random.normal(jax.random.PRNGKey(1), (100,))
    m = nanoadam.select_mask(x, 0.1, criterion="largest")
    np.testing.assert_array_equal(np.asarray(m), reference_mask(x, 10, "largest"))


def test_random_criterion_is_seeded_and_exact():
    x = jnp.ones((1000,))
    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    m1 = nanoadam.select_mask(x, 0.1, criterion="random", key=k1)
    m1b = nanoadam.select_mask(x, 0.1, criterion="random", key=k1)
    m2 = nanoadam.select_mask(x, 0.1, criterion="random", key=k2)
    assert int(m1.sum()) == int(m2.sum()) == 100
    np.testing.assert_array_equal(m1, m1b)
    assert not np.array_equal(m1, m2)
    with pytest.raises(ValueError, match="key"):
        nanoadam.select_mask(x, 0.1, criterion="random")


def test_chunk_scope_exact_k_per_chunk():
    x = jax.random.normal(jax.random.PRNGKey(3), (10, 11))  # chunks of 22 (2 rows of 11)
    m = nanoadam.select_mask(x, 0.25, chunk_size=32)
    flat = np.asarray(m).reshape(-1)
    assert [int(flat[i : i + 22].sum()) for i in range(0, 110, 22)] == [6] * 5  # 5.5 -> 6
    np.testing.assert_array_equal(np.asarray(m), ref_mask(x, 0.25, "chunk", 32))
    # One chunk per leaf: k of the whole leaf.
    m = nanoadam.select_mask(x, 0.25, scope="leaf")
    np.testing.assert_array_equal(np.asarray(m), ref_mask(x, 0.25, "leaf"))
    assert int(m.sum()) == 28  # 27.5 -> 28


def test_layer_axes_are_selected_independently():
    x = jax.random.normal(jax.random.PRNGKey(4), (6, 3, 8))
    for axes in [(0,), (1,), (0, 2)]:
        m = nanoadam.select_mask(x, 0.3, scope="leaf", layer_axes=axes)
        np.testing.assert_array_equal(
            np.asarray(m), ref_mask(x, 0.3, "leaf", layer_axes=axes), err_msg=str(axes)
        )
    m = np.asarray(nanoadam.select_mask(x, 0.3, chunk_size=8, layer_axes=(1,)))
    np.testing.assert_array_equal(m, ref_mask(x, 0.3, "chunk", 8, layer_axes=(1,)))
    assert (m.sum(axis=(0, 2)) == 6 * 2).all()  # per layer: 6 chunks of 8, k = 2.4 -> 2
    with pytest.raises(ValueError, match="scope"):
        nanoadam.select_mask(x, 0.3, scope="global")


def test_traced_density_under_vmap_matches_loop():
    x = jax.random.normal(jax.random.PRNGKey(6), (50, 40))
    ds = jnp.array([0.01, 0.1, 0.5, 1.0])
    batched = jax.jit(jax.vmap(lambda d: nanoadam.select_mask(x, d)))(ds)
    for i, d in enumerate(ds):
        chex.assert_trees_all_equal(batched[i], nanoadam.select_mask(x, float(d)))


def test_empty_and_scalar_leaves():
    assert nanoadam.select_mask(jnp.zeros((0, 3)), 0.5).shape == (0, 3)
    assert nanoadam.select_mask(jnp.array(2.0), 0.1).tolist() is True


# -- global selection ----------------------------------------------------------------------------


def test_global_scope_matches_concatenated_reference():
    a = jax.random.normal(jax.random.PRNGKey(4), (20,))
    b = 3.0 * jax.random.normal(jax.random.PRNGKey(5), (7, 3))
    masks = nanoadam.select_global_masks([a, b], 0.2)
    k = int(nanoadam.num_selected(41, 0.2))
    ref = reference_mask(jnp.concatenate([a, b.reshape(-1)]), k)
    np.testing.assert_array_equal(np.concatenate([np.asarray(m).reshape(-1) for m in masks]), ref)
    # Global ties are broken by position in the concatenation.
    t = nanoadam.select_global_masks([jnp.ones(3), jnp.ones(3)], 0.5)
    assert [m.tolist() for m in t] == [[True, True, True], [False, False, False]]


# -- bisection primitives ------------------------------------------------------------------------


def test_kth_smallest_key_is_exact():
    keys = jax.random.randint(jax.random.PRNGKey(7), (3, 100), 0, 50).astype(jnp.uint32)
    k = jnp.array([1, 37, 100])
    t = selection.kth_smallest_key(keys, k)
    for r in range(3):
        assert int(t[r]) == int(np.sort(np.asarray(keys[r]))[int(k[r]) - 1])


@pytest.mark.parametrize("method", selection.METHODS)
def test_bottom_k_mask_per_row_with_ties(method):
    keys = jnp.asarray(np.random.default_rng(0).integers(0, 4, size=(5, 70)), jnp.uint32)
    k = np.array([0, 1, 17, 35, 70], np.int32)
    got = np.asarray(
        nanoadam.bottom_k_mask(keys, k if method == "top_k" else jnp.asarray(k), method)
    )
    for r in range(5):
        want = np.zeros(70, bool)
        want[np.lexsort((np.arange(70), np.asarray(keys[r])))[: k[r]]] = True
        np.testing.assert_array_equal(got[r], want, err_msg=f"row {r}")


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="criterion"):
        nanoadam.selection_keys(jnp.ones(3), "median")
    with pytest.raises(ValueError, match="method"):
        nanoadam.bottom_k_mask(jnp.ones((1, 3), jnp.uint32), jnp.array([1]), "heap")


# -- chunk_positions: the compact layout's selection -----------------------------------------------


def tied_keys(shape, values=5, seed=0):
    """uint32 keys drawn from a few values: the k-th smallest is tied in every row."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, values, size=shape), jnp.uint32)


chunk_positions = jax.jit(selection.chunk_positions, static_argnums=2)


@pytest.mark.parametrize("c", [1, 5, 64, 200, 256])  # 256: the two-level running count
def test_chunk_positions_match_the_sorted_reference(c):
    for values in (3, 2**32 - 1):  # heavy ties / almost none
        keys = tied_keys((3, 4, c), values, seed=c)
        for k in sorted({1, c // 3 + 1, c}):  # traced k, capacity c: one compile per shape
            got = np.asarray(chunk_positions(keys, k, c))
            assert got.shape == (3, 4, c) and got.dtype == np.int32
            np.testing.assert_array_equal(got, ref_chunk_positions(np.asarray(keys), k, c))
    # A static k equal to the capacity (the state of a static density): no padding.
    keys = tied_keys((2, c), 3, seed=c + 1)
    want = ref_chunk_positions(np.asarray(keys), c // 2 + 1, c // 2 + 1)
    np.testing.assert_array_equal(selection.chunk_positions(keys, c // 2 + 1, c // 2 + 1), want)


def test_chunk_positions_pad_with_the_chunk_length_and_select_nothing_at_k_zero():
    keys = tied_keys((6, 40), values=4)
    for k in (0, 3, 10):
        got = np.asarray(chunk_positions(keys, k, 10))
        np.testing.assert_array_equal(got, ref_chunk_positions(np.asarray(keys), k, 10))
        assert (got[:, k:] == 40).all()
    assert selection.chunk_positions(keys, 0, 0).shape == (6, 0)


def test_chunk_positions_rows_are_independent():
    # Each chunk is selected on its own: changing one row never moves another row's set.
    keys = tied_keys((8, 64), values=2**20, seed=1)
    base = np.asarray(chunk_positions(keys, 7, 7))
    changed = keys.at[3].set(jnp.uint32(0))
    got = np.asarray(chunk_positions(changed, 7, 7))
    np.testing.assert_array_equal(np.delete(got, 3, axis=0), np.delete(base, 3, axis=0))
    assert got[3].tolist() == list(range(7))  # all tied: the first seven by position


def test_chunk_positions_traced_k_under_vmap_matches_loop():
    keys = tied_keys((5, 96), values=7, seed=2)
    ks = jnp.array([0, 1, 9, 20, 32], jnp.int32)
    batched = jax.jit(jax.vmap(lambda k: selection.chunk_positions(keys, k, 32)))(ks)
    for i, k in enumerate(ks.tolist()):
        np.testing.assert_array_equal(
            batched[i], ref_chunk_positions(np.asarray(keys), k, 32), err_msg=f"k={k}"
        )


@pytest.mark.parametrize("values", [3, 2**32 - 1])
def test_chunk_positions_top_k_is_the_same_selection(values):
    keys = tied_keys((4, 2, 128), values, seed=3)
    top_k = jax.jit(chunk_positions_top_k, static_argnums=(1, 2))
    for k, cap in [(1, 1), (13, 13), (13, 20), (128, 128)]:
        a = chunk_positions(keys, k, cap)
        b = top_k(keys, k, cap)
        chex.assert_trees_all_equal(a, b)
    traced = jax.jit(lambda k: chunk_positions_top_k(keys, k, 20))(jnp.int32(5))
    np.testing.assert_array_equal(traced, ref_chunk_positions(np.asarray(keys), 5, 20))


def test_chunk_positions_of_weights_follow_the_rule():
    # Keys from weights: NaN after inf, -0.0 == +0.0, ties by position inside each chunk.
    w = jnp.array(
        [[jnp.nan, 0.5, -0.0, 0.0, jnp.inf, 0.5], [1.0, jnp.nan, jnp.nan, 2.0, -1.0, jnp.nan]]
    )
    keys = nanoadam.selection_keys(w)
    assert selection.chunk_positions(keys, 3, 3).tolist() == [[1, 2, 3], [0, 3, 4]]
    assert selection.chunk_positions(keys, 5, 5).tolist() == [[1, 2, 3, 4, 5], [0, 1, 2, 3, 4]]
