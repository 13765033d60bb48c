"""Checkpoints: the optimizer state saves and restores with orbax-checkpoint, also sharded over
the 8 host CPU devices that the repository's conftest.py asks XLA for, and a run stopped at
step ``s`` and resumed from its checkpoint is bit-identical to an uninterrupted run, across a
mask refresh and a density change (``linear_density_decay``).

The resumed half rebuilds the optimizer, recompiles its step and restores into an abstract
target (``jax.eval_shape`` of ``init``), as a restarted job would.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nanoadam_jax as na

TOTAL_STEPS = 8
# Stopping after step 1: the resumed half holds the density change (and refresh) at step 3,
# the interval refresh at step 4, the second density change at step 6 and a refresh at step 8.
STOP_AT = 2


def make_params():
    rng = np.random.default_rng(0)
    return {
        "layer": {
            "kernel": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
        },
        "embed": {"embedding": jnp.asarray(rng.normal(size=(8, 6)), jnp.bfloat16)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)},
    }


def make_tx(layout: str, policy: str, criterion: str, wrap: bool):
    tx = na.nanoadamw(
        0.05,
        density=na.linear_density_decay(0.4, 0.1, decay_steps=6, density_interval=3),
        mask_interval=4,
        weight_decay=0.01,
        scope="block",
        block_size=24,
        state_layout=layout,
        refresh_policy=policy,
        criterion=criterion,
        seed=7,
    )
    return optax.apply_if_finite(tx, max_consecutive_errors=3) if wrap else tx


def make_step(tx, out_shardings=None):
    target = jax.tree.map(lambda x: jnp.full_like(x, 0.25), make_params())

    def step(params, state):
        grads = jax.tree.map(lambda p, t: (p - t) * (1.0 + p * p), params, target)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, out_shardings=out_shardings)


def run(step, params, state, steps):
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


def save(path, params, state):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"params": params, "opt_state": state})
        ckptr.wait_until_finished()


def restore(path, target):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def inner_state(state, wrap):
    return (state.inner_state if wrap else state)[0]


CONFIGS = [
    pytest.param("compact", "reset", "smallest", False, id="compact-reset-smallest"),
    pytest.param("dense", "keep", "random", True, id="dense-keep-random-apply_if_finite"),
]


@pytest.mark.parametrize(("layout", "policy", "criterion", "wrap"), CONFIGS)
def test_resume_from_checkpoint_is_bit_identical(tmp_path, layout, policy, criterion, wrap):
    params = make_params()
    tx = make_tx(layout, policy, criterion, wrap)
    step = make_step(tx)
    want = run(step, params, tx.init(params), TOTAL_STEPS)

    p, s = run(step, params, tx.init(params), STOP_AT)
    path = tmp_path / f"step_{STOP_AT}"
    save(path, p, s)
    before = inner_state(s, wrap)

    # A restarted job: a new optimizer, a new compile, an abstract restore target.
    tx2 = make_tx(layout, policy, criterion, wrap)
    abstract = {
        "params": jax.eval_shape(lambda: params),
        "opt_state": jax.eval_shape(tx2.init, params),
    }
    restored = restore(path, abstract)
    assert jax.tree.structure(restored["opt_state"]) == jax.tree.structure(s)
    chex.assert_trees_all_equal(restored, {"params": p, "opt_state": s})
    chex.assert_trees_all_equal_shapes_and_dtypes(restored["opt_state"], s)
    got = run(make_step(tx2), restored["params"], restored["opt_state"], TOTAL_STEPS - STOP_AT)
    chex.assert_trees_all_equal(got, want)

    # The resumed half really crossed a density change and mask refreshes.
    after = inner_state(want[1], wrap)
    assert int(before.sparse_step) == STOP_AT and int(after.sparse_step) == TOTAL_STEPS
    assert float(before.sparse_density) == pytest.approx(0.4)
    assert float(after.sparse_density) == pytest.approx(0.1)
    old_sel = jax.tree.leaves(before.selected)
    new_sel = jax.tree.leaves(after.selected)
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(old_sel, new_sel))


def _spec(x) -> P:
    """Shard the leading axis over the 8 devices when it divides; replicate otherwise."""
    if getattr(x, "ndim", 0) >= 1 and x.shape[0] % 8 == 0 and x.shape[0] > 0:
        return P("data")
    return P()


def test_sharded_state_saves_restores_and_resumes(tmp_path):
    devices = jax.devices()
    if len(devices) < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    mesh = Mesh(np.array(devices[:8]), ("data",))
    shard = lambda tree: jax.tree.map(lambda x: NamedSharding(mesh, _spec(x)), tree)

    tx = make_tx("compact", "keep", "smallest", wrap=False)
    params = make_params()
    p_shard = shard(params)
    s_shard = shard(jax.eval_shape(tx.init, params))
    params = jax.device_put(params, p_shard)
    state = jax.device_put(tx.init(params), s_shard)
    # The compact buffers are sharded too: 8 blocks of 24 -> (8, k_max) indices.
    sel = state[0].selected["layer"]["kernel"]
    assert sel.shape[0] == 8 and len(sel.sharding.device_set) == 8
    assert not state[0].selected["layer"]["kernel"].sharding.is_fully_replicated

    step = make_step(tx, out_shardings=(p_shard, s_shard))
    want = run(step, params, state, TOTAL_STEPS)
    p, s = run(step, params, state, STOP_AT)
    path = tmp_path / "sharded"
    save(path, p, s)

    tx2 = make_tx("compact", "keep", "smallest", wrap=False)
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, {"params": p, "opt_state": s})
    restored = restore(path, target)
    chex.assert_trees_all_equal(restored, {"params": p, "opt_state": s})
    for got, ref in zip(jax.tree.leaves(restored), jax.tree.leaves({"params": p, "opt_state": s})):
        assert got.sharding.is_equivalent_to(ref.sharding, got.ndim), (got.sharding, ref.sharding)
    got = run(
        make_step(tx2, out_shardings=(p_shard, s_shard)),
        restored["params"],
        restored["opt_state"],
        TOTAL_STEPS - STOP_AT,
    )
    chex.assert_trees_all_equal(got, want)
    for x, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(ref.sharding, x.ndim)
