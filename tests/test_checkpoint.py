"""Checkpoints: the optimizer state saves and restores with orbax-checkpoint, also sharded over
the 8 host CPU devices that the repository's conftest.py asks XLA for, and a run stopped at
step ``s`` and resumed from its checkpoint is bit-identical to an uninterrupted run, across a
mask refresh and a density change (``linear_density_decay``).

The state is the chunked compact layout (positions ``(*layer_axes, *chunk_grid,
capacity)``, ``uint16``), including a stacked leaf whose layer axis is declared with
``dimension_numbers``. The resumed half rebuilds the optimizer, recompiles its step and
restores into an abstract target, as a restarted job would: ``jax.eval_shape`` of ``init``
on one device; on a mesh, the shapes and shardings of a fresh ``init`` on the sharded
parameters (automatic sharding hides the shardings from ``eval_shape``, and the chunking
follows the shards).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nanoadam_jax as na

TOTAL_STEPS = 8
# Stopping after step 1: the resumed half holds the density change (and refresh) at step 3,
# the interval refresh at step 4, the second density change at step 6 and a refresh at step 8.
STOP_AT = 2
CHUNK = 24


def make_params():
    rng = np.random.default_rng(0)
    return {
        "layer": {
            "kernel": jnp.asarray(rng.normal(size=(16, 12)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(12,)), jnp.float32),
        },
        # Three stacked layers, selected one by one (declared with dimension_numbers).
        "blocks": {"kernel": jnp.asarray(rng.normal(size=(3, 8, 12)), jnp.float32)},
        "embed": {"embedding": jnp.asarray(rng.normal(size=(8, 6)), jnp.bfloat16)},
        "head": {"kernel": jnp.asarray(rng.normal(size=(12, 4)), jnp.float32)},
    }


def stacked(path, leaf):
    return na.SelectionDimensionNumbers(axes=(1, 2)) if leaf.ndim == 3 else None


def make_tx(scope: str, policy: str, criterion: str, wrap: bool):
    tx = na.nanoadamw(
        0.05,
        density=na.linear_density_decay(0.4, 0.1, decay_steps=6, density_interval=3),
        mask_interval=4,
        weight_decay=0.01,
        scope=scope,
        chunk_size=CHUNK if scope == "chunk" else None,
        dimension_numbers=stacked,
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


def assert_crossed_refreshes(before, after):
    """The resumed half really crossed a density change and mask refreshes."""
    assert int(before.sparse_step) == STOP_AT and int(after.sparse_step) == TOTAL_STEPS
    assert float(before.sparse_density) == pytest.approx(0.4)
    assert float(after.sparse_density) == pytest.approx(0.1)
    old_sel = jax.tree.leaves(before.selected)
    new_sel = jax.tree.leaves(after.selected)
    assert any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(old_sel, new_sel))


CONFIGS = [
    pytest.param("chunk", "reset", "smallest", False, id="chunk-reset-smallest"),
    pytest.param("chunk", "keep", "random", True, id="chunk-keep-random-apply_if_finite"),
    pytest.param("leaf", "keep", "smallest", False, id="leaf-keep-smallest"),
    pytest.param("global", "keep", "smallest", False, id="global-keep-smallest"),
]


@pytest.mark.parametrize(("scope", "policy", "criterion", "wrap"), CONFIGS)
def test_resume_from_checkpoint_is_bit_identical(tmp_path, scope, policy, criterion, wrap):
    params = make_params()
    tx = make_tx(scope, policy, criterion, wrap)
    step = make_step(tx)
    want = run(step, params, tx.init(params), TOTAL_STEPS)

    p, s = run(step, params, tx.init(params), STOP_AT)
    path = tmp_path / f"step_{STOP_AT}"
    save(path, p, s)
    before = inner_state(s, wrap)
    if scope != "global":
        # The compact layout: (layers, chunks, capacity) uint16 positions for the stack,
        # (chunks, capacity) for the kernel; capacity = k of the schedule's largest density.
        sel = before.selected
        k = na.selection.num_selected_static
        if scope == "chunk":  # one 12-entry row per chunk: the same on every FSDP mesh
            chex.assert_shape(sel["blocks"]["kernel"], (3, 8, k(12, 0.4)))
            chex.assert_shape(sel["layer"]["kernel"], (16, k(12, 0.4)))
        else:  # one chunk per layer matrix
            chex.assert_shape(sel["blocks"]["kernel"], (3, k(96, 0.4)))
            chex.assert_shape(sel["layer"]["kernel"], (k(192, 0.4),))
        assert sel["layer"]["kernel"].dtype == jnp.uint16
        assert sel["head"]["kernel"] is None  # dense

    # A restarted job: a new optimizer, a new compile, an abstract restore target.
    tx2 = make_tx(scope, policy, criterion, wrap)
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
    assert_crossed_refreshes(before, inner_state(want[1], wrap))


def test_restoring_a_state_of_another_chunking_is_refused(tmp_path):
    """A checkpoint made with another chunk size does not fit the new optimizer's state."""
    params = make_params()
    tx = make_tx("chunk", "keep", "smallest", False)
    path = tmp_path / "ckpt"
    save(path, params, tx.init(params))
    other = na.nanoadamw(0.05, chunk_size=48, dimension_numbers=stacked)
    target = {
        "params": jax.eval_shape(lambda: params),
        "opt_state": jax.eval_shape(other.init, params),
    }
    with pytest.raises(ValueError):
        restore(path, target)


# --------------------------------------------------------------------------------------
# Sharded state.
# --------------------------------------------------------------------------------------


def _spec(path, x) -> P:
    """FSDP: the leading matrix axis over the 8 devices where it divides; else replicated."""
    axis = 1 if x.ndim == 3 else 0  # the stack's layer axis (3) is not split
    if x.ndim > axis and x.shape[axis] % 8 == 0:
        return P(*([None] * axis), "data")
    return P()


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_sharded_state_saves_restores_and_resumes(tmp_path, mode):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
    axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((8,), ("data",), axis_types=(axis_type,))
    shard = lambda tree: jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, _spec(path, x)), tree
    )

    with jax.set_mesh(mesh):
        params = make_params()
        p_shard = shard(params)
        params = jax.device_put(params, p_shard)
        tx = make_tx("chunk", "keep", "smallest", wrap=False)
        state = tx.init(params)  # sharded like the parameter rows
        s_shard = jax.tree.map(lambda x: x.sharding, state)
        # kernel (16, 12) split in 8 row pairs and the stack (3, 8, 12) split along its
        # rows: chunks of 12 = 1 row, as on one device.
        sel = state[0].selected
        chex.assert_shape(sel["layer"]["kernel"], (16, 5))
        chex.assert_shape(sel["blocks"]["kernel"], (3, 8, 5))
        for leaf in (sel["layer"]["kernel"], sel["blocks"]["kernel"]):
            assert len(leaf.sharding.device_set) == 8
            assert not leaf.sharding.is_fully_replicated
        mu = state[0].sparse_inner_state[0].mu["blocks"]["kernel"]
        assert mu.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "data", None)), 3)

        step = make_step(tx, out_shardings=(p_shard, s_shard))
        want = run(step, params, state, TOTAL_STEPS)
        p, s = run(step, params, state, STOP_AT)
        path = tmp_path / "sharded"
        save(path, p, s)

        # A restarted job: its own init on the sharded parameters gives the target.
        tx2 = make_tx("chunk", "keep", "smallest", wrap=False)
        fresh = {"params": params, "opt_state": tx2.init(params)}
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, fresh)
        restored = restore(path, target)
        chex.assert_trees_all_equal(restored, {"params": p, "opt_state": s})
        for got, ref in zip(
            jax.tree.leaves(restored), jax.tree.leaves({"params": p, "opt_state": s})
        ):
            assert got.sharding.is_equivalent_to(ref.sharding, got.ndim), (
                got.sharding,
                ref.sharding,
            )
        got = run(
            make_step(tx2, out_shardings=(p_shard, s_shard)),
            restored["params"],
            restored["opt_state"],
            TOTAL_STEPS - STOP_AT,
        )
    chex.assert_trees_all_equal(got, want)
    for x, ref in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.sharding.is_equivalent_to(ref.sharding, x.ndim)
    assert_crossed_refreshes(s[0], want[1][0])
