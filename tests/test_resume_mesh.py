"""Resume on another mesh (issue 18): a checkpoint saved with orbax on one mesh continues on
another.

Parameters and ``nanoadam`` state are saved with ``orbax.checkpoint`` after 3 steps and the
run continues for 3 more steps elsewhere (mask refreshes at steps 0, 2 and 4):

* **FSDP -> FSDP** (8 -> 1, 8 -> 4, 1 -> 8 host devices): the layouts agree, so the usual
  flow works: the restore target is ``jax.eval_shape(tx.init, params_on_the_new_mesh)``
  with the new mesh's shardings attached. The resumed run equals an uninterrupted 6-step
  run on the new mesh bit for bit, and ``relayout`` of a state whose layout is unchanged is
  an exact copy.
* **FSDP -> tensor-parallel** (the last axis over 8 devices): the checkpoint is restored
  with its own (saved) shapes, replicated on the new devices, and
  ``nanoadam.relayout(tx, restored, params_on_the_tp_mesh)`` gives a state with the
  TP state's shapes and shardings, the step counters kept and the dense leaf's state
  copied. The next update re-selects: its selection equals a fresh TP-mesh refresh of the
  same parameters, the entries selected both before and after carry the restored moments
  (Adam's moment updates of exactly those), the others start from zero, and only the
  selected entries move, each against the sign of its first moment. Before that update,
  the relaid state holds the saved moments of saved entries only, as many per new chunk
  as it holds.

The "gradient" ``sin(3 w) + 0.1`` is element-wise in the parameters, so no reduction order
differs between meshes.
"""

from __future__ import annotations

import functools
import math

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_setup import adam_of, grads_of, host, make_tx, mesh_of, on_mesh, random_params

import nanoadam_jax as nanoadam

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run pytest from the repository root (conftest.py sets XLA_FLAGS)",
)

STOP = 3
TOTAL = 6
LR, B1, B2, EPS = 1e-2, 0.9, 0.999, 1e-8
STACK = "stack"
SHAPES = {
    "qkv": (384, 384),
    "up": (384, 1536),
    "down": (1536, 384),
    STACK: (2, 384, 384),  # (layers, d_in, d_out), layers declared below
}
SPARSE = tuple(SHAPES)


@functools.cache
def host_params() -> dict:
    return random_params(SHAPES, 1818)


def param_shardings(mesh: Mesh) -> dict:
    """FSDP (``"fsdp"``: the first matrix axis) or TP (``"tp"``: the last axis)."""
    axis = mesh.axis_names[0]

    def spec(shape):
        if axis == "fsdp":
            return P(*([None] * (len(shape) - 2)), "fsdp", None)
        return P(*([None] * (len(shape) - 1)), "tp")

    out = {name: NamedSharding(mesh, spec(shape)) for name, shape in SHAPES.items()}
    out["head"] = {"kernel": NamedSharding(mesh, P(axis, None))}
    return out


def place(mesh: Mesh) -> dict:
    return jax.device_put(host_params(), param_shardings(mesh))


@functools.cache
def optimizer():
    tx = make_tx(LR)

    def step(params, state):
        updates, state = tx.update(grads_of(params), state, params)
        return optax.apply_updates(params, updates), state

    return tx, jax.jit(step)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def run(params, state, steps: int):
    _, step = optimizer()
    for _ in range(steps):
        params, state = step(params, state)
    return params, state


@functools.cache
def uninterrupted(n: int):
    """TOTAL steps on the FSDP mesh of ``n`` devices (numpy copies)."""
    tx, _ = optimizer()
    mesh = mesh_of(n, "fsdp")
    params = place(mesh)
    return host(run(params, on_mesh(tx.init(params), mesh), TOTAL))


def save(path, params, state) -> None:
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, {"params": params, "opt_state": state})
        ckptr.wait_until_finished()


def restore(path, target):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


@functools.cache
def checkpoint(n: int, root: str):
    """Save after STOP steps on the FSDP mesh of ``n`` devices; the path and host copies."""
    tx, _ = optimizer()
    mesh = mesh_of(n, "fsdp")
    params = place(mesh)
    params, state = run(params, on_mesh(tx.init(params), mesh), STOP)
    path = f"{root}/fsdp{n}_step{STOP}"
    save(path, params, state)
    return path, host(params), host(state)


@pytest.fixture(scope="module")
def ckpt_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("resume_mesh"))


def with_shardings(abstract, concrete, mesh: Mesh):
    """``abstract``'s shapes with ``concrete``'s shardings (scalars replicated on ``mesh``)."""

    def attach(a, c):
        s = c.sharding if isinstance(c.sharding, NamedSharding) else replicated(mesh)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)

    return jax.tree.map(attach, abstract, concrete)


def assert_trees_equal(got, want) -> None:
    leaves_got, tree_got = jax.tree.flatten(got)
    leaves_want, tree_want = jax.tree.flatten(want)
    assert tree_got == tree_want
    for a, b in zip(leaves_got, leaves_want, strict=True):
        assert np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def adam_state(state):
    return adam_of(state[0].sparse_inner_state)


def dense_adam_state(state):
    return adam_of(state[0].dense_inner_state)


# --------------------------------------------------------------------------------------
# FSDP -> FSDP: the usual orbax flow, bit for bit.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), [(8, 1), (8, 4), (1, 8)], ids=lambda n: f"{n}")
def test_fsdp_checkpoint_resumes_bit_identically_on_another_mesh(ckpt_root, source, target):
    path, saved_params, saved_state = checkpoint(source, ckpt_root)
    tx, _ = optimizer()
    mesh = mesh_of(target, "fsdp")
    params = place(mesh)

    # The usual flow: eval_shape of init on the new mesh's parameters, with its shardings.
    fresh = tx.init(params)
    abstract_state = jax.eval_shape(tx.init, params)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state) == jax.tree.map(
        lambda x: (x.shape, x.dtype), fresh
    )
    target_tree = {
        "params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
        ),
        "opt_state": with_shardings(abstract_state, fresh, mesh),
    }
    restored = restore(path, target_tree)
    assert_trees_equal(host(restored), {"params": saved_params, "opt_state": saved_state})
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target_tree), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (got.shape, got.sharding)

    # Same layout: relayout is an exact copy with the target's shardings.
    copied = nanoadam.relayout(tx, restored["opt_state"], params)
    assert_trees_equal(host(copied), saved_state)
    for got, want in zip(jax.tree.leaves(copied), jax.tree.leaves(fresh), strict=True):
        if got.ndim:
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), got.shape

    got = run(restored["params"], on_mesh(restored["opt_state"], mesh), TOTAL - STOP)
    want = uninterrupted(target)
    assert int(got[1][0].sparse_step) == TOTAL
    assert_trees_equal(host(got), want)
    # the resumed half crossed the refresh at step 4 and trained
    assert any(
        not np.array_equal(saved_state[0].selected[k], want[1][0].selected[k]) for k in SPARSE
    )
    assert all((want[0][k] != saved_params[k]).any() for k in SPARSE)


# --------------------------------------------------------------------------------------
# FSDP -> tensor-parallel: restore with the saved shapes, then relayout.
# --------------------------------------------------------------------------------------


def dense_map(selected: np.ndarray, values: np.ndarray, shape) -> tuple[np.ndarray, np.ndarray]:
    """A compact per-entry array as a leaf-shaped array, and the mask of its entries.

    The state's rows are the chunks of the row-major flattening (the layer axis leads, so
    no transposition): entry ``(row, slot)`` is flat index ``row * chunk + position``;
    positions equal to the chunk length are padding.
    """
    size = math.prod(shape)
    rows = math.prod(selected.shape[:-1])
    chunk = size // rows
    pos = selected.reshape(rows, -1).astype(np.int64)
    flat = np.arange(rows)[:, None] * chunk + pos
    valid = pos < chunk
    out = np.zeros(size, np.float64)
    mask = np.zeros(size, bool)
    assert len(np.unique(flat[valid])) == valid.sum()  # no position twice
    out[flat[valid]] = values.reshape(rows, -1)[valid]
    mask[flat[valid]] = True
    return out.reshape(shape), mask.reshape(shape)


@functools.cache
def tp_resume(root: str):
    """The FSDP-8 checkpoint restored with its saved shapes (replicated on the TP mesh),
    relaid for the TP mesh, and one update; plus a fresh TP refresh of the same params."""
    path, saved_params, saved_state = checkpoint(8, root)
    tx, step = optimizer()
    mesh = mesh_of(8, "tp")
    p_shard = param_shardings(mesh)
    # The saved shapes: init of the unsharded parameters (the FSDP layout), placed on the
    # TP mesh's devices, replicated.
    saved_shapes = jax.eval_shape(tx.init, host_params())
    target_tree = {
        "params": jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            host_params(),
            p_shard,
        ),
        "opt_state": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh)),
            saved_shapes,
        ),
    }
    restored = restore(path, target_tree)
    params = restored["params"]
    target = tx.init(params)
    relaid = nanoadam.relayout(tx, restored["opt_state"], params)
    after_params, after_state = step(params, on_mesh(relaid, mesh))
    fresh_params, fresh_state = step(params, on_mesh(tx.init(params), mesh))
    more = run(after_params, after_state, TOTAL - STOP - 1)
    return {
        "saved_params": saved_params,
        "saved_state": saved_state,
        "restored": restored,
        "target": target,
        "relaid": relaid,
        "after_params": host(after_params),
        "after_state": host(after_state),
        "fresh_params": host(fresh_params),
        "fresh_state": host(fresh_state),
        "more": host(more),
    }


def test_tp_restore_and_relayout_has_the_tp_state_layout(ckpt_root):
    r = tp_resume(ckpt_root)
    relaid, target, saved = r["relaid"], r["target"], r["saved_state"]
    assert_trees_equal(host(r["restored"]["params"]), r["saved_params"])
    assert jax.tree.structure(relaid) == jax.tree.structure(target)
    flat_target = jax.tree_util.tree_flatten_with_path(target)[0]
    for got, (path, want) in zip(jax.tree.leaves(relaid), flat_target, strict=True):
        where = jax.tree_util.keystr(path)
        assert (got.shape, got.dtype) == (want.shape, want.dtype), where
        if want.ndim:
            assert got.sharding.is_equivalent_to(want.sharding, got.ndim), (
                where,
                got.shape,
                got.sharding.spec,
                want.sharding.spec,
            )
    # the TP mesh really needs another chunking (else this test proves nothing)
    changed = [k for k in SPARSE if target[0].selected[k].shape != saved[0].selected[k].shape]
    assert changed, "the TP layout equals the FSDP layout for every leaf"
    # the TP state rows are sharded over the 8 devices
    for k in changed:
        assert not target[0].selected[k].sharding.is_fully_replicated
    # step counters kept
    assert int(relaid[0].sparse_step) == STOP
    assert int(adam_state(relaid).count) == int(adam_state(saved).count) == STOP
    # the dense head's full-size moments are copied exactly
    assert_trees_equal(host(dense_adam_state(relaid)), dense_adam_state(saved))


def test_tp_relayout_then_update_refreshes_like_a_fresh_tp_selection(ckpt_root):
    r = tp_resume(ckpt_root)
    after, fresh = r["after_state"], r["fresh_state"]
    assert int(after[0].sparse_step) == STOP + 1
    assert int(adam_state(after).count) == STOP + 1
    for k in SPARSE:
        np.testing.assert_array_equal(after[0].selected[k], fresh[0].selected[k], k)
    # ... and the continued run keeps going on the TP mesh
    assert int(r["more"][1][0].sparse_step) == TOTAL
    for k in SPARSE:
        assert np.isfinite(r["more"][0][k]).all()


def test_tp_relayout_moves_the_saved_moments_to_the_new_chunks(ckpt_root):
    """Before any update: every entry of the relaid selection was selected in the
    checkpoint and holds its saved moments exactly, and a new chunk holds as many of the
    saved entries that fall in it as its capacity allows."""
    r = tp_resume(ckpt_root)
    saved, relaid = r["saved_state"], host(r["relaid"])
    for k in SPARSE:
        shape = SHAPES[k]
        sel = relaid[0].selected[k]
        for field in ("mu", "nu"):
            old, was = dense_map(saved[0].selected[k], getattr(adam_state(saved), field)[k], shape)
            new, kept = dense_map(sel, getattr(adam_state(relaid), field)[k], shape)
            assert (kept <= was).all(), (k, field)  # only saved entries
            np.testing.assert_array_equal(new[kept], old[kept], f"{k} {field}")
        rows, capacity = math.prod(sel.shape[:-1]), sel.shape[-1]
        per_chunk_old = was.reshape(rows, -1).sum(axis=1)
        per_chunk_kept = kept.reshape(rows, -1).sum(axis=1)
        np.testing.assert_array_equal(per_chunk_kept, np.minimum(per_chunk_old, capacity), k)


def test_tp_relayout_carries_the_moments_of_entries_that_stay_selected(ckpt_root):
    """After the update that follows ``relayout`` (a refresh): where an entry was selected
    in the checkpoint and is selected again, ``mu = b1 mu_saved + (1 - b1) g`` and
    ``nu = b2 nu_saved + (1 - b2) g^2``, as at any refresh; an entering entry starts from
    zero moments."""
    r = tp_resume(ckpt_root)
    saved, after = r["saved_state"], r["after_state"]
    params = r["saved_params"]
    lost = {}
    for k in SPARSE:
        shape = SHAPES[k]
        g = np.sin(3.0 * params[k].astype(np.float64)) + 0.1
        mu0, was = dense_map(saved[0].selected[k], adam_state(saved).mu[k], shape)
        nu0, _ = dense_map(saved[0].selected[k], adam_state(saved).nu[k], shape)
        mu1, now = dense_map(after[0].selected[k], adam_state(after).mu[k], shape)
        nu1, _ = dense_map(after[0].selected[k], adam_state(after).nu[k], shape)
        assert now.any() and (now & was).any() and (now & ~was).any(), k
        want_mu = np.where(was, B1 * mu0, 0.0) + (1 - B1) * g
        want_nu = np.where(was, B2 * nu0, 0.0) + (1 - B2) * g * g
        bad = now & ~np.isclose(mu1, want_mu, rtol=1e-5, atol=1e-9)
        bad |= now & ~np.isclose(nu1, want_nu, rtol=1e-5, atol=1e-12)
        if bad.any():
            lost[k] = (int(bad.sum()), int((now & was).sum()))
    assert not lost, (
        "entries selected before and after whose moments were not carried "
        f"(leaf: (wrong, selected before and after)): {lost}"
    )


def test_tp_update_after_relayout_moves_only_the_selected_entries(ckpt_root):
    """The update after ``relayout`` changes exactly the newly selected entries (a sparse
    update), each against the sign of its new first moment (an Adam step of the moments in
    the new state: whatever the bias correction, its factors are positive)."""
    r = tp_resume(ckpt_root)
    after, params = r["after_state"], r["saved_params"]
    for k in SPARSE:
        mu1, now = dense_map(after[0].selected[k], adam_state(after).mu[k], SHAPES[k])
        moved = r["after_params"][k].astype(np.float64) - params[k]
        np.testing.assert_array_equal(moved[~now], 0.0, k)
        nonzero = now & (mu1 != 0)
        assert nonzero.mean() > 0.05, k
        np.testing.assert_array_equal(np.sign(moved[nonzero]), -np.sign(mu1[nonzero]), k)
