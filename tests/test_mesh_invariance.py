"""Mesh invariance (issue 18): FSDP sharding changes neither the state nor the result.

For MiniLM's and BERT-base's matrix shapes (384x384, 384x1536, 1536x384, 768x768,
768x3072, 3072x768) and a stacked ``(4, 384, 1536)`` kernel whose layer axis is declared
with ``SelectionDimensionNumbers(axes=(1, 2))``, the first matrix axis is split over 1, 2, 4
and 8 host devices (``P("fsdp", None)``; ``P(None, "fsdp", None)`` for the stack). On every
such mesh:

* the optimizer state has exactly the shapes and dtypes of the one-device state (and of
  ``jax.eval_shape(tx.init, ...)`` on unsharded parameters, the usual restore target);
* the compact state (positions and both Adam moments) is sharded along the chunk-grid
  rows like the parameter rows, not replicated;
* six jitted steps (refreshes at steps 0, 2 and 4) give bit-identical parameters and
  state; the "gradient" ``sin(3 w) + 0.1`` is element-wise in the parameters, so no
  reduction order can differ between meshes;
* ``nanoadam.plan`` reports ``mesh_independent=True`` for these leaves.

A tensor-parallel mesh (the last axis split over 8) still runs, and ``plan`` reports
``mesh_independent=False`` for every leaf whose layout differs from the one-device one.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_setup import adam_of, dims, grads_of, host, make_tx, mesh_of, on_mesh, random_params

import nanoadam_jax as nanoadam

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run pytest from the repository root (conftest.py sets XLA_FLAGS)",
)

STEPS = 6
DEVICES = (1, 2, 4, 8)
STACK = "stack"
#: The sparse matrices: MiniLM (384 / 1536) and BERT-base (768 / 3072) shapes.
SHAPES = {
    "minilm_qkv": (384, 384),
    "minilm_up": (384, 1536),
    "minilm_down": (1536, 384),
    "bert_qkv": (768, 768),
    "bert_up": (768, 3072),
    "bert_down": (3072, 768),
    STACK: (4, 384, 1536),  # (layers, d_in, d_out): each layer selected on its own
}
SPARSE = tuple(SHAPES)


@functools.cache
def host_params() -> dict:
    return random_params(SHAPES, 18)


def layer_axes(name: str) -> int:
    return 1 if name == STACK else 0


def fsdp_spec(name: str) -> P:
    """The first matrix axis over "fsdp" (after the stack's layer axis)."""
    return P(*([None] * layer_axes(name)), "fsdp", None)


def tp_spec(name: str) -> P:
    """The last axis over "tp"."""
    return P(*([None] * (len(SHAPES[name]) - 1)), "tp")


def place(mesh: Mesh, spec_of) -> dict:
    params = host_params()
    specs = {name: spec_of(name) for name in SPARSE}
    specs["head"] = {"kernel": P(mesh.axis_names[0], None)}
    return jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))


def make_step(tx):
    def step(params, state):
        updates, state = tx.update(grads_of(params), state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


@functools.cache
def optimizer():
    """One optimizer and one jitted step for every mesh (compiled once per sharding)."""
    tx = make_tx()
    return tx, make_step(tx)


class MeshRun:
    """Init, ``plan`` and STEPS jitted steps on one mesh (numpy copies of the results)."""

    def __init__(self, mesh: Mesh, spec_of, steps: int = STEPS):
        tx, step = optimizer()
        self.mesh = mesh
        params = place(mesh, spec_of)
        state = tx.init(params)
        self.init_state = state  # the device arrays, for their shardings
        self.init_host = host(state)
        self.plan = nanoadam.plan(params, density=0.1, dimension_numbers=dims, show=False)
        state = on_mesh(state, mesh)
        for _ in range(steps):
            params, state = step(params, state)
        self.state = state
        self.params_host = host(params)
        self.state_host = host(state)


@functools.cache
def fsdp_run(n: int) -> MeshRun:
    return MeshRun(mesh_of(n, "fsdp"), fsdp_spec)


def shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)


def plan_rows(plan) -> dict:
    return {row.path: row for row in plan.leaves}


def path_of(name: str) -> str:
    return jax.tree_util.keystr((jax.tree_util.DictKey(name),))


def sparse_arrays(state, name: str) -> dict:
    """The compact per-leaf arrays of ``nanoadam``'s state: positions, mu, nu and the
    per-entry age (sharded like the moments)."""
    s = state[0]
    adam = adam_of(s.sparse_inner_state)
    return {
        "selected": s.selected[name],
        "mu": adam.mu[name],
        "nu": adam.nu[name],
        "age": s.sparse_age[name],
    }


# --------------------------------------------------------------------------------------
# FSDP over 1 / 2 / 4 / 8 devices.
# --------------------------------------------------------------------------------------


def test_one_device_state_is_the_unsharded_state():
    """The reference: a one-device mesh gives the state of plain, unsharded arrays, and
    ``eval_shape`` of ``init`` (the usual restore target) agrees."""
    tx = make_tx()
    plain = tx.init(jax.tree.map(jnp.asarray, host_params()))
    abstract = jax.eval_shape(tx.init, host_params())
    assert shapes(fsdp_run(1).init_host) == shapes(plain) == shapes(abstract)
    for name in SPARSE:
        sel = fsdp_run(1).init_host[0].selected[name]
        # (layers, chunk grid..., capacity) for the stack, (chunk grid..., capacity) else
        assert sel.ndim >= 2 + layer_axes(name), (name, sel.shape)
        if name == STACK:
            assert sel.shape[0] == 4


@pytest.mark.parametrize("n", DEVICES[1:])
def test_fsdp_state_shapes_equal_the_one_device_state(n):
    got, want = fsdp_run(n).init_host, fsdp_run(1).init_host
    for name in SPARSE:
        assert shapes(sparse_arrays(got, name)) == shapes(sparse_arrays(want, name)), name
    assert shapes(got) == shapes(want)
    # Positions start as padding (the chunk length) everywhere: the same chunk length.
    for name in SPARSE:
        np.testing.assert_array_equal(got[0].selected[name], want[0].selected[name])


@pytest.mark.parametrize("n", DEVICES[1:])
def test_fsdp_state_is_sharded_along_the_chunk_grid_rows(n):
    run = fsdp_run(n)
    for when, state in (("init", run.init_state), ("after steps", run.state)):
        for name in SPARSE:
            for what, x in sparse_arrays(state, name).items():
                s = x.sharding
                assert isinstance(s, NamedSharding), (when, name, what, s)
                assert len(s.device_set) == n, (when, name, what, s)
                assert not s.is_fully_replicated, (when, name, what, s)
                rows = layer_axes(name)  # the first chunk-grid axis after the layer axes
                want = NamedSharding(
                    run.mesh, P(*([None] * rows), "fsdp", *([None] * (x.ndim - rows - 1)))
                )
                assert s.is_equivalent_to(want, x.ndim), (when, name, what, s.spec)
                # each device holds 1/n of the rows
                shard = x.addressable_shards[0].data.shape
                assert shard[rows] * n == x.shape[rows], (when, name, what, shard, x.shape)


@pytest.mark.parametrize("n", DEVICES[1:])
def test_six_fsdp_steps_are_bit_identical_to_one_device(n):
    got, want = fsdp_run(n), fsdp_run(1)
    assert int(got.state_host[0].sparse_step) == STEPS
    for name in SPARSE:
        np.testing.assert_array_equal(got.params_host[name], want.params_host[name], name)
    np.testing.assert_array_equal(
        got.params_host["head"]["kernel"], want.params_host["head"]["kernel"], "head"
    )
    for name in SPARSE:
        g, w = sparse_arrays(got.state_host, name), sparse_arrays(want.state_host, name)
        for what in g:
            np.testing.assert_array_equal(g[what], w[what], f"{name} {what}")
    leaves_got, tree_got = jax.tree.flatten(got.state_host)
    leaves_want, tree_want = jax.tree.flatten(want.state_host)
    assert tree_got == tree_want
    for a, b in zip(leaves_got, leaves_want, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_fsdp_runs_trained_and_crossed_refreshes():
    """Guards the comparison above: the steps changed the parameters, the selection is
    exactly ``k`` of each chunk, and the refreshes at steps 2 and 4 moved it."""
    run = fsdp_run(1)
    params = host_params()
    for name in SPARSE:
        changed = run.params_host[name] != params[name]
        assert changed.any(), name
        # at most the entries selected at 3 refreshes changed: a sparse update
        assert changed.mean() <= 3 * 0.1 + 0.01, (name, changed.mean())
        sel = run.state_host[0].selected[name]
        chunk = params[name].size // int(np.prod(sel.shape[:-1]))
        assert (sel < chunk).all(), name  # k = capacity: no padding at a constant density
    # a step-by-step run of 3 steps selects something else than the 6-step run
    three = MeshRun(mesh_of(1, "fsdp"), fsdp_spec, steps=3)
    assert any(
        not np.array_equal(three.state_host[0].selected[name], run.state_host[0].selected[name])
        for name in SPARSE
    )


@pytest.mark.parametrize("n", DEVICES)
def test_plan_reports_fsdp_leaves_as_mesh_independent(n):
    run = fsdp_run(n)
    rows = plan_rows(run.plan)
    for name in SPARSE:
        row = rows[path_of(name)]
        assert row.label == "sparse"
        assert row.mesh_independent is True, (n, name, row)
        sel = run.init_host[0].selected[name]
        assert row.chunk == host_params()[name].size // int(np.prod(sel.shape[:-1]))
    assert "mesh" in str(run.plan).lower()  # the table shows the new column


def test_small_sharded_leaves_are_flagged_and_replicated_ones_keep_the_promise():
    """A leaf that fits in one chunk (a bias: sparse by default) is one chunk on one
    device. Split across devices anyway, it must be re-chunked to fit the shards, so
    ``plan`` flags it (``mesh_independent`` False: an FSDP split changes its layout).
    Replicated, as docs/sharding.md's FSDP helper leaves small leaves, it keeps the
    one-device layout on every mesh."""
    tx = nanoadam.nanoadam(1e-2, density=0.1, mask_interval=2)
    params = {"bias_384": np.linspace(-1, 1, 384, dtype=np.float32),
              "bias_3072": np.linspace(-1, 1, 3072, dtype=np.float32)}  # fmt: skip
    one = {k: v[0] for k, v in shapes(tx.init(params)[0].selected).items()}
    for n in DEVICES:
        mesh = mesh_of(n, "fsdp")
        for spec in (P("fsdp"), P()):
            placed = jax.device_put(params, NamedSharding(mesh, spec))
            got = {k: v[0] for k, v in shapes(tx.init(placed)[0].selected).items()}
            rows = plan_rows(nanoadam.plan(placed, density=0.1, show=False))
            for k in params:
                same = got[k] == one[k]
                # An FSDP split would re-chunk it: flagged on every mesh, this one included.
                assert rows[path_of(k)].mesh_independent is False, (n, spec, k)
                assert same is (spec == P() or n == 1), (n, spec, k, got[k])


# --------------------------------------------------------------------------------------
# Tensor parallelism: the last axis over 8 devices.
# --------------------------------------------------------------------------------------


def test_tensor_parallel_runs_and_plan_flags_mesh_dependent_leaves():
    """Every leaf's last axis over 8 devices: ``plan`` says ``mesh_independent`` exactly
    where the layout is the FSDP / one-device one; the BERT up-projection (3072 columns,
    384 per device: whole-row chunks cannot fit) is re-chunked, flagged, and trains."""
    tx, step = optimizer()
    mesh = mesh_of(8, "tp")
    params = place(mesh, tp_spec)
    state = host(tx.init(params))
    rows = plan_rows(nanoadam.plan(params, density=0.1, dimension_numbers=dims, show=False))
    one = fsdp_run(1).init_host
    differs = {}
    for name in SPARSE:
        got = shapes(sparse_arrays(state, name))
        differs[name] = got != shapes(sparse_arrays(one, name))
        # mesh_independent is True exactly when this mesh's layout is the FSDP one
        assert rows[path_of(name)].mesh_independent is (not differs[name]), (name, got)
    assert differs["bert_up"]
    assert rows[path_of("bert_up")].mesh_independent is False
    # that leaf still trains on the TP mesh (2 jitted steps), its state sharded
    leaf = {"bert_up": params["bert_up"]}
    leaf_state = on_mesh(tx.init(leaf), mesh)
    for _ in range(2):
        leaf, leaf_state = step(leaf, leaf_state)
    assert int(leaf_state[0].sparse_step) == 2
    out = np.asarray(leaf["bert_up"])
    assert np.isfinite(out).all()
    changed = out != host_params()["bert_up"]
    assert 0 < changed.mean() <= 0.2 + 0.01
    for what, x in sparse_arrays(leaf_state, "bert_up").items():
        assert len(x.sharding.device_set) == 8 and not x.sharding.is_fully_replicated, what
