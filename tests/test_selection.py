"""Tests of the selection rule: exact k, ties by index, scopes, criteria, methods."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nanoadam_jax as nanoadam
from nanoadam_jax import selection


def reference_mask(x, k, largest=False):
    """Stable sort reference: k smallest |x| (NaN last), ties by flat index."""
    a = np.abs(np.asarray(x, np.float32).reshape(-1))
    key = -a if largest else a.copy()
    key[np.isnan(a)] = np.inf
    key = np.where(np.isnan(a), np.inf, key)
    order = np.argsort(key, kind="stable")
    if largest:
        # NaN go last; among finite, larger |x| first.
        order = np.concatenate([order[~np.isnan(a[order])], order[np.isnan(a[order])]])
    m = np.zeros(a.shape, bool)
    m[order[:k]] = True
    return m.reshape(np.shape(x))


@pytest.mark.parametrize("n,d,k", [(1000, 0.1, 100), (10, 0.05, 1), (3, 0.5, 2), (7, 1.0, 7)])
def test_num_selected_rounding(n, d, k):
    assert int(nanoadam.num_selected(n, d)) == k


def test_num_selected_empty_leaf():
    assert int(nanoadam.num_selected(0, 0.5)) == 0


@pytest.mark.parametrize("method", selection.METHODS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_exact_k_matches_stable_sort_reference(method, dtype):
    x = jax.random.normal(jax.random.PRNGKey(0), (37, 29)).astype(dtype)
    for d in (0.01, 0.1, 0.33, 1.0):
        m = selection.select_mask(x, d, method=method)
        k = int(nanoadam.num_selected(x.size, d))
        assert int(m.sum()) == k
        np.testing.assert_array_equal(np.asarray(m), reference_mask(x.astype(jnp.float32), k))


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
    np.testing.assert_array_equal(np.asarray(m), reference_mask(x, 10, largest=True))


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


def test_block_scope_exact_k_per_block():
    x = jax.random.normal(jax.random.PRNGKey(3), (10, 11))  # 110 = 3 blocks of 32 + 14
    m = nanoadam.select_mask(x, 0.25, scope="block", block_size=32)
    flat = np.asarray(m).reshape(-1)
    counts = [flat[i : i + 32].sum() for i in range(0, 110, 32)]
    assert counts == [8, 8, 8, 4]  # round(0.25 * 14) = 3.5 -> 4 (half up)
    for i in range(0, 110, 32):
        blk = np.asarray(x).reshape(-1)[i : i + 32]
        np.testing.assert_array_equal(flat[i : i + 32], reference_mask(blk, counts[i // 32]))


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


def test_traced_density_under_vmap_matches_loop():
    x = jax.random.normal(jax.random.PRNGKey(6), (50, 40))
    ds = jnp.array([0.01, 0.1, 0.5, 1.0])
    batched = jax.jit(jax.vmap(lambda d: nanoadam.select_mask(x, d)))(ds)
    for i, d in enumerate(ds):
        chex.assert_trees_all_equal(batched[i], nanoadam.select_mask(x, float(d)))


def test_empty_and_scalar_leaves():
    assert nanoadam.select_mask(jnp.zeros((0, 3)), 0.5).shape == (0, 3)
    assert nanoadam.select_mask(jnp.array(2.0), 0.1).tolist() is True


def test_kth_smallest_key_is_exact():
    keys = jax.random.randint(jax.random.PRNGKey(7), (3, 100), 0, 50).astype(jnp.uint32)
    k = jnp.array([1, 37, 100])
    t = selection.kth_smallest_key(keys, k)
    for r in range(3):
        assert int(t[r]) == int(np.sort(np.asarray(keys[r]))[int(k[r]) - 1])


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="criterion"):
        nanoadam.selection_keys(jnp.ones(3), "median")
    with pytest.raises(ValueError, match="method"):
        nanoadam.bottom_k_mask(jnp.ones((1, 3), jnp.uint32), jnp.array([1]), "heap")


@pytest.mark.parametrize("k", [1, 1000, 70_000, 130_000, 150_000])
def test_leaf_bottom_k_indices_ties_across_chunks(k):
    # 150,000 entries (three chunks on CPU) drawn from five values, NaNs among them: the
    # k-th smallest is tied with tens of thousands of entries spread over every chunk,
    # so the chunk where the ties run out must rank them (ties by flat index).
    from reference_selection import ref_order

    rng = np.random.default_rng(k)
    x = rng.choice(np.array([0.0, -0.5, 0.5, 2.0, np.nan], np.float32), size=150_000)
    kmax, fill = k + 7, x.size  # padding slots keep the fill value
    got = np.asarray(selection.leaf_bottom_k_indices(jnp.asarray(x), k, kmax, fill))
    want = np.sort(ref_order(x)[:k])
    np.testing.assert_array_equal(got[:k], want)
    np.testing.assert_array_equal(got[k:], fill)
