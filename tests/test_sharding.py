"""Sharded fine-tuning on 8 host devices (issue 5).

Parameters live on a ``jax.sharding.Mesh``: a 1-D FSDP mesh (every leaf split along its first
axis) or a 2-D ``data x model`` mesh (leaves split along both axes, tensor-parallel style), in
both sharding modes (``AxisType.Auto``: XLA propagates shardings; ``AxisType.Explicit``: the
shardings are part of the types). What is checked:

* the update runs under ``jax.jit`` and gives the single-device parameters (float tolerance);
* the density is a property of the whole logical tensor: the selected set does not depend on
  the mesh;
* the compiled update communicates no parameter-sized (or k-sized) array: its collectives,
  read from the optimized HLO, carry scalars or a few per-block counts only;
* the optimizer state is sharded like the parameters (the compact buffers along their rows),
  also when it is built from abstract ``jax.ShapeDtypeStruct`` inputs;
* Flax NNX: ``nnx.Optimizer`` over a model annotated with ``nnx.with_partitioning``.

Cases that do not hold yet are marked ``xfail(strict=True)`` with the root cause, so they flip
to failures (and must be unmarked) once the library is fixed. The compiled steps are cached per
(optimizer, mesh, mode), so each configuration compiles once for all tests.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import nanoadam_jax as nanoadam

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run pytest from the repository root (conftest.py sets XLA_FLAGS)",
)

DENSITY = 0.25
INTERVAL = 2  # refresh at steps 0 and 2 of the 3 steps run below
STEPS = 3
LR = 1e-2
BLOCK = 128  # scope="block": each FSDP shard of every leaf holds whole blocks
#: A collective moving more elements than this (in any operand or result) is "large". The
#: smallest k of a sparse leaf is 256 (bias) and the most blocks of a leaf is 16 (w_rows).
SMALL = 16

# --------------------------------------------------------------------------------------
# Reasons of the expected failures (root causes, see docs/sharding.md).
# --------------------------------------------------------------------------------------

CUMSUM = (
    "selection: the tie-break is a cumsum over the flattened leaf (_ties_by_index / "
    "select_global_masks) and select_mask flattens the leaf (x.reshape(-1)); XLA all-gathers "
    "both along a sharded axis"
)
EXPLICIT = (
    "explicit sharding: cumsum over a sharded axis and the flattening reshape of a leaf sharded "
    "along a later axis raise ShardingTypeError"
)
COMPACT_ROWS = (
    "compact buffers are built unsharded (jnp.full / jnp.zeros without sharding), so the "
    "gather/scatter between the sharded leaf and the replicated (rows, k_max) buffers moves "
    "k-sized arrays every step and the refresh gathers the mask"
)
LEAF_COMPACT = (
    "by design: scope='leaf' with the compact layout keeps one k-vector per leaf whose entries "
    "fall on the shards unevenly, so it cannot be sharded; use scope='block' with shard-aligned "
    "blocks or state_layout='dense' on a mesh"
)
ZEROS = (
    "state built with jnp.zeros(p.shape) instead of jnp.zeros_like(p): it does not inherit the "
    "parameters' sharding (eagerly, or in the types under explicit sharding)"
)
#: The step keeps the state where init put it (one compilation, as in a real training loop).
UNSHARDED = (
    f"{CUMSUM}; and {ZEROS}, so the step also gathers parameters and masks to update the "
    "replicated state"
)
NNX_METADATA = (
    "compact buffers are placed in the parameters' tree, so nnx.Optimizer copies each Param's "
    "sharding names onto them and shards a (rows, k_max) / (k,) array with the kernel's spec"
)


def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


# --------------------------------------------------------------------------------------
# Parameters, meshes, optimizers.
# --------------------------------------------------------------------------------------


def make_params() -> dict:
    """Host (numpy) parameters: placing them on a mesh compiles nothing."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "w_rows": normal(64, 32),
        # Multiples of 1/8: many ties at the threshold exercise the tie-break by index.
        "w_cols": np.round(normal(32, 64) * 8) / 8,
        "bias": normal(1024) * 0.1,
        "head": {"kernel": normal(32, 16)},  # dense (default labels)
    }


#: name -> (mesh shape, axis names, spec per leaf)
LAYOUTS = {
    # FSDP: every leaf split along its first axis over all 8 devices.
    "fsdp": (
        (8,),
        ("fsdp",),
        {
            "w_rows": P("fsdp", None),
            "w_cols": P("fsdp", None),
            "bias": P("fsdp"),
            "head": {"kernel": P("fsdp", None)},
        },
    ),
    # 2-D data x model: leaves split along both axes (and the flattening order crosses shards).
    "2d": (
        (2, 4),
        ("data", "model"),
        {
            "w_rows": P("data", "model"),
            "w_cols": P("model", "data"),
            "bias": P("model"),
            "head": {"kernel": P(None, "model")},
        },
    ),
    # 2-D mesh, FSDP over both axes (first axis split 8 ways), model axis replicated elsewhere.
    "2d_rows": (
        (2, 4),
        ("data", "model"),
        {
            "w_rows": P(("data", "model"), None),
            "w_cols": P("model", None),
            "bias": P(("data", "model")),
            "head": {"kernel": P(None, "model")},
        },
    ),
}

MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}


@functools.cache
def mesh_for(layout: str, mode: str) -> jax.sharding.Mesh:
    shape, names, _ = LAYOUTS[layout]
    return jax.make_mesh(shape, names, axis_types=(MODES[mode],) * len(names))


def shardings(layout: str, mode: str) -> dict:
    mesh = mesh_for(layout, mode)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), LAYOUTS[layout][2])


def pipeline(**kw):
    return optax.chain(
        nanoadam.magnitude_mask(**kw),
        optax.scale_by_adam(),
        nanoadam.masked_apply(**kw),
        optax.scale_by_learning_rate(LR),
    )


OPTIMIZERS = {
    # nanoadam's defaults: per-leaf selection, compact state.
    "compact": lambda: nanoadam.nanoadam(LR, density=DENSITY, mask_interval=INTERVAL),
    "dense": lambda: nanoadam.nanoadam(
        LR, density=DENSITY, mask_interval=INTERVAL, state_layout="dense"
    ),
    "block": lambda: nanoadam.nanoadam(
        LR, density=DENSITY, mask_interval=INTERVAL, scope="block", block_size=BLOCK
    ),
    # sparse_update around another inner transformation, one threshold over all sparse leaves.
    "global": lambda: optax.chain(
        nanoadam.sparse_update(
            optax.scale_by_lion(),
            DENSITY,
            INTERVAL,
            scope="global",
            state_layout="dense",
        ),
        optax.scale(-LR),
    ),
    "pipeline": lambda: pipeline(density=DENSITY, mask_interval=INTERVAL),
}


def fake_grads(params: dict, t: jax.Array) -> dict:
    """Element-wise "gradients" that change with the step (no communication of their own)."""
    return jax.tree.map(lambda p: jnp.cos(3.0 * p + t.astype(p.dtype)), params)


def train(tx, out_shardings=None):
    """A jitted step ``(params, state, t) -> (params, state)``."""

    def step(params, state, t):
        updates, state = tx.update(fake_grads(params, t), state, params)
        return optax.apply_updates(params, updates), state

    if out_shardings is None:
        return jax.jit(step)
    return jax.jit(step, out_shardings=out_shardings)


def pin(tree, mesh):
    """Leaves not yet on ``mesh`` (scalar counters, unsharded buffers) replicated on it."""

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(put, tree)


def sharding_tree(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def run(step, params, state, steps: int = STEPS):
    for t in range(steps):
        params, state = step(params, state, jnp.int32(t))
    return params, state


@functools.cache
def reference_run(name: str):
    """``(params, state)`` after ``STEPS`` steps on one device (no mesh)."""
    tx = OPTIMIZERS[name]()
    params = jax.tree.map(jnp.asarray, make_params())
    return run(train(tx), params, tx.init(params))


def reference(name: str) -> dict:
    return jax.tree.map(np.asarray, reference_run(name)[0])


@functools.cache
def sharded_run(name: str, layout: str, mode: str):
    """``(params, state, compiled HLO text, error)`` after ``STEPS`` steps of one configuration.

    Errors are kept (and re-raised by the tests that need the run), so a configuration that
    fails to trace is attempted once per session.
    """
    tx = OPTIMIZERS[name]()
    mesh = mesh_for(layout, mode)
    try:
        with jax.set_mesh(mesh):
            params = jax.device_put(make_params(), shardings(layout, mode))
            state = tx.init(params)
            if mode == "auto":
                # The state keeps the shardings init gave it: one compilation per configuration.
                state = pin(state, mesh)
                step = train(tx, (sharding_tree(params), sharding_tree(state)))
            else:
                step = train(tx)  # the types fix the shardings
            text = step.lower(params, state, jnp.int32(0)).compile().as_text()
            out, state = run(step, params, state)
        return out, state, text, None
    except Exception as e:  # reported by the tests that need this run
        return None, None, None, e


def get_run(name: str, layout: str, mode: str):
    out, state, text, err = sharded_run(name, layout, mode)
    if err is not None:
        raise err
    return out, state, text


# --------------------------------------------------------------------------------------
# Reading collectives out of optimized HLO text.
# --------------------------------------------------------------------------------------

_COLLECTIVES = (
    "all-gather",
    "all-reduce",
    "all-to-all",
    "collective-permute",
    "reduce-scatter",
    "collective-broadcast",
    "ragged-all-to-all",
)
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(?:pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")


def _elements(shape_text: str) -> list[int]:
    """Element counts of every array type in an HLO type string (tuples included)."""
    return [
        int(np.prod([int(d) for d in dims.split(",") if d])) for dims in _ARRAY.findall(shape_text)
    ]


def collectives(hlo_text: str) -> list[tuple[str, str, int]]:
    """``(op, result type, largest array in elements)`` of every collective in the module.

    Counts each asynchronous pair once (``*-start``); operands are included in the size, so
    an all-gather is judged by its gathered result and a reduce-scatter by its input.
    """
    out = []
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        base = op.removesuffix("-start")
        if base not in _COLLECTIVES or op.endswith("-done"):
            continue
        sizes = _elements(result) + _elements(rest.split("),")[0])
        out.append((base, result, max(sizes, default=1)))
    return out


def large_collectives(hlo_text: str) -> list[tuple[str, str, int]]:
    return [c for c in collectives(hlo_text) if c[2] > SMALL]


def test_collective_parser_on_a_known_module():
    """The HLO reader sees a parameter-sized all-gather where one is forced, and none in an
    element-wise function of sharded inputs."""
    mesh = mesh_for("fsdp", "auto")
    x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp", None)))
    gathered = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))
    text = gathered.lower(x).compile().as_text()
    assert [(op, size) for op, _, size in collectives(text)] == [("all-gather", 64 * 32)]
    local = jax.jit(lambda a: jnp.sin(a) * 2).lower(x).compile().as_text()
    assert collectives(local) == []
    reduced = jax.jit(lambda a: jnp.sum(a > 0)).lower(x).compile().as_text()
    assert [op for op, _, _ in collectives(reduced)] == ["all-reduce"]
    assert large_collectives(reduced) == []


# --------------------------------------------------------------------------------------
# Same parameters as on one device.
# --------------------------------------------------------------------------------------

#: (optimizer, layout, mode, why the update differs, why it communicates large arrays);
#: None: holds now. Each configuration compiles once for both tests.
CASES = [
    ("compact", "fsdp", "auto", None, LEAF_COMPACT),
    ("compact", "2d", "explicit", None, LEAF_COMPACT),
    ("dense", "2d", "auto", None, None),
    ("dense", "fsdp", "explicit", None, None),
    ("block", "fsdp", "auto", None, None),
    ("block", "2d_rows", "explicit", None, None),
    ("global", "2d", "auto", None, None),
    ("pipeline", "fsdp", "auto", None, None),
    ("pipeline", "2d", "explicit", None, None),
]


def cases(column: int):
    return [
        pytest.param(
            c[0], c[1], c[2], marks=[xfail(c[column])] if c[column] else [], id="-".join(c[:3])
        )
        for c in CASES
    ]


@pytest.mark.parametrize("name,layout,mode", cases(3))
def test_sharded_update_matches_single_device(name, layout, mode):
    out, _, _ = get_run(name, layout, mode)
    ref = reference(name)
    for path, got in jax.tree_util.tree_leaves_with_path(out):
        want = functools.reduce(lambda t, k: t[k.key], path, ref)
        np.testing.assert_allclose(
            np.asarray(got), want, rtol=1e-6, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        )
    # The parameters stay sharded as they were.
    for got, sharding in zip(jax.tree.leaves(out), jax.tree.leaves(shardings(layout, mode))):
        assert got.sharding.is_equivalent_to(sharding, got.ndim)


# --------------------------------------------------------------------------------------
# The density is a property of the logical tensor.
# --------------------------------------------------------------------------------------


def test_selection_does_not_depend_on_the_mesh():
    """The same entries move on every mesh, and exactly k of each whole tensor (not per shard)."""
    tx = nanoadam.magnitude_mask(DENSITY, INTERVAL)
    grads = jax.tree.map(np.ones_like, make_params())
    masks = {}
    for layout in ("fsdp", "2d"):
        with jax.set_mesh(mesh_for(layout, "auto")):
            params = jax.device_put(make_params(), shardings(layout, "auto"))
            grads_s = jax.device_put(grads, shardings(layout, "auto"))
            updates, _ = jax.jit(tx.update)(grads_s, tx.init(params), params)
        masks[layout] = jax.tree.map(lambda u: np.asarray(u) != 0, updates)
    params = jax.tree.map(jnp.asarray, make_params())
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    masks["single"] = jax.tree.map(lambda u: np.asarray(u) != 0, updates)
    for name in ("w_rows", "w_cols", "bias"):
        n = make_params()[name].size
        for layout in ("fsdp", "2d"):
            np.testing.assert_array_equal(masks[layout][name], masks["single"][name])
        assert masks["single"][name].sum() == nanoadam.num_selected(n, DENSITY)
    assert masks["single"]["head"]["kernel"].all()  # the head is dense


@pytest.mark.parametrize(
    "layout,mode",
    [
        pytest.param("fsdp", "auto", id="fsdp-auto"),
        pytest.param("2d_rows", "explicit", id="2d_rows-explicit"),
    ],
)
def test_block_selection_does_not_depend_on_the_mesh(layout, mode):
    """Blocks are fixed slices of the flattened logical tensor: the compact positions agree."""
    _, state, _ = get_run("block", layout, mode)
    _, ref_state = reference_run("block")
    for got, want in zip(
        jax.tree.leaves(state[0].selected), jax.tree.leaves(ref_state[0].selected)
    ):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --------------------------------------------------------------------------------------
# No parameter-sized (or k-sized) communication in the compiled update.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,layout,mode", cases(4))
def test_compiled_update_has_no_large_collectives(name, layout, mode):
    """Every collective of the step (refresh branch included) moves at most SMALL elements."""
    _, _, text = get_run(name, layout, mode)
    assert large_collectives(text) == []


def test_adamw_reference_has_no_collectives():
    """Sanity check of the measure: element-wise AdamW on the same sharding communicates nothing."""
    tx = optax.adamw(LR)
    with jax.set_mesh(mesh_for("2d", "auto")):
        params = jax.device_put(make_params(), shardings("2d", "auto"))
        text = train(tx).lower(params, tx.init(params), jnp.int32(0)).compile().as_text()
    assert collectives(text) == []


# --------------------------------------------------------------------------------------
# The optimizer state is sharded like the parameters.
# --------------------------------------------------------------------------------------


def _param_shaped(state, params):
    """``(state leaf, parameter)`` for every state leaf shaped like its parameter."""
    out = []
    by_shape = {p.shape: p for p in jax.tree.leaves(params)}
    for leaf in jax.tree.leaves(state):
        if leaf.ndim and leaf.shape in by_shape:
            out.append((leaf, by_shape[leaf.shape]))
    return out


@pytest.mark.parametrize("name", ["dense", "pipeline", "global"])
def test_eager_init_shards_param_shaped_state_like_params(name):
    tx = OPTIMIZERS[name]()
    with jax.set_mesh(mesh_for("2d", "auto")):
        params = jax.device_put(make_params(), shardings("2d", "auto"))
        state = tx.init(params)
    pairs = _param_shaped(state, params)
    assert len(pairs) >= 6
    for leaf, p in pairs:
        assert leaf.sharding.is_equivalent_to(p.sharding, p.ndim), (leaf.shape, leaf.sharding)


def test_compact_block_buffers_are_sharded_along_rows():
    tx = OPTIMIZERS["block"]()
    mesh = mesh_for("fsdp", "auto")
    with jax.set_mesh(mesh):
        params = jax.device_put(make_params(), shardings("fsdp", "auto"))
        state = tx.init(params)
    sel = state[0].selected
    mu = state[0].sparse_inner_state.mu
    for name in ("w_rows", "w_cols", "bias"):
        rows = params[name].size // BLOCK
        assert sel[name].shape[0] == rows
        assert sel[name].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp", None)), 2)
        assert mu[name].sharding.is_equivalent_to(NamedSharding(mesh, P("fsdp")), 1)
        assert sel[name].addressable_shards[0].data.shape == (rows // 8, sel[name].shape[1])


def abstract_params(layout: str, mode: str) -> dict:
    return jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
        make_params(),
        shardings(layout, mode),
    )


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("mode", list(MODES))
def test_init_traces_on_abstract_sharded_inputs(name, mode):
    """``jax.eval_shape(tx.init, ShapeDtypeStructs)``: the state's shapes, nothing allocated."""
    tx = OPTIMIZERS[name]()
    with jax.set_mesh(mesh_for("fsdp", mode)):
        abstract = jax.eval_shape(tx.init, abstract_params("fsdp", mode))
        concrete = tx.init(jax.tree.map(jnp.asarray, make_params()))
    assert jax.tree.structure(abstract) == jax.tree.structure(concrete)
    for a, c in zip(jax.tree.leaves(abstract), jax.tree.leaves(concrete)):
        assert isinstance(a, jax.ShapeDtypeStruct)
        assert (a.shape, a.dtype) == (c.shape, c.dtype)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("dense"),
        pytest.param("pipeline"),
        pytest.param("block"),
    ],
)
def test_abstract_init_under_explicit_sharding_carries_shardings(name):
    """Under explicit sharding the abstract state already says where each buffer lives."""
    tx = OPTIMIZERS[name]()
    mesh = mesh_for("fsdp", "explicit")
    with jax.set_mesh(mesh):
        abstract = jax.eval_shape(tx.init, abstract_params("fsdp", "explicit"))
    big = [a for a in jax.tree.leaves(abstract) if a.size >= 64]
    assert big
    for a in big:
        assert a.sharding is not None and a.sharding.spec[0] == "fsdp", (a.shape, a.sharding)


def state_shardings(tx, params_sharding_tree, shapes_tree):
    """The user recipe of docs/sharding.md for automatic sharding: trace ``tx.init`` once on an
    explicit abstract mesh to learn where each state buffer goes, then use those shardings."""
    mesh = jax.tree.leaves(params_sharding_tree)[0].mesh
    explicit = jax.sharding.AbstractMesh(
        mesh.axis_sizes, mesh.axis_names, axis_types=(AxisType.Explicit,) * len(mesh.axis_names)
    )
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(explicit, s.spec)
        ),
        shapes_tree,
        params_sharding_tree,
    )
    with jax.sharding.use_abstract_mesh(explicit):
        state = jax.eval_shape(tx.init, abstract)
    return jax.tree.map(
        lambda a: NamedSharding(mesh, a.sharding.spec if a.sharding is not None else P()), state
    )


@pytest.mark.parametrize(
    "name",
    [pytest.param("dense"), pytest.param("block")],
)
def test_sharded_state_from_abstract_params_under_automatic_sharding(name):
    """Build the sharded state directly (``jit(init, out_shardings=...)``) and train with it."""
    tx = OPTIMIZERS[name]()
    mesh = mesh_for("fsdp", "auto")
    sh = shardings("fsdp", "auto")
    with jax.set_mesh(mesh):
        out_sh = state_shardings(tx, sh, make_params())
        params = jax.device_put(make_params(), sh)
        state = jax.jit(tx.init, out_shardings=out_sh)(params)
        for leaf in jax.tree.leaves(state):
            if leaf.size >= 64:
                assert not leaf.sharding.is_fully_replicated, leaf.shape
        out, _ = run(train(tx), params, state)
    for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(reference(name))):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------
# Flax NNX: nnx.Optimizer over a model annotated with nnx.with_partitioning.
# --------------------------------------------------------------------------------------

nnx = pytest.importorskip("flax.nnx")


class Mlp(nnx.Module):
    """Kernels split along the model axis (Megatron style: column- then row-parallel)."""

    def __init__(self, rngs, explicit: bool = False):
        init = nnx.initializers.lecun_normal()
        self.up = nnx.Linear(
            32,
            64,
            kernel_init=nnx.with_partitioning(init, (None, "model")),
            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("model",)),
            rngs=rngs,
        )
        self.down = nnx.Linear(
            64, 32, kernel_init=nnx.with_partitioning(init, ("model", None)), rngs=rngs
        )
        self.head = nnx.Linear(32, 4, rngs=rngs)
        self.explicit = explicit

    def __call__(self, x):
        h = jax.nn.relu(self.up(x))
        # The row-parallel product sums over the sharded axis: explicit mode asks where to.
        h = self.down(h, out_sharding=P()) if self.explicit else self.down(h)
        return self.head(h)


def _nnx_train(model, tx, mesh=None, steps: int = 2):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    if mesh is not None:  # counters and unsharded buffers onto the mesh: one compilation
        nnx.update(optimizer, pin(nnx.state(optimizer), mesh))
    x = jax.random.normal(jax.random.PRNGKey(1), (16, 32))
    y = jax.random.normal(jax.random.PRNGKey(2), (16, 4))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(steps):
        step(model, optimizer)
    return optimizer


@functools.cache
def _nnx_reference(name: str) -> dict:
    with nnx.use_eager_sharding(False):
        model = Mlp(nnx.Rngs(0))
    _nnx_train(model, OPTIMIZERS[name]())
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize(
    "name,mode",
    [
        pytest.param("dense", "auto", id="dense-auto"),
        pytest.param("dense", "explicit", id="dense-explicit"),
        pytest.param("compact", "auto", id="compact-auto"),
    ],
)
def test_nnx_optimizer_over_partitioned_model(name, mode):
    mesh = mesh_for("2d", mode)
    with jax.set_mesh(mesh):
        model = Mlp(nnx.Rngs(0), explicit=mode == "explicit")
        kernel = model.up.kernel[...]
        assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
        optimizer = _nnx_train(model, OPTIMIZERS[name](), mesh if mode == "auto" else None)
    got = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(_nnx_reference(name))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    # Parameters keep their sharding; the parameter-shaped state (dense layout) follows it.
    assert model.up.kernel[...].sharding.is_equivalent_to(kernel.sharding, 2)
    opt_state = jax.tree.leaves(nnx.to_pure_dict(nnx.state(optimizer.opt_state)))
    shaped = [s for s in opt_state if getattr(s, "shape", None) == kernel.shape]
    if name == "dense":
        assert len(shaped) == 3  # mask, mu, nu of up.kernel
    else:
        assert not shaped and any(s.shape == (1, 32 * 64 // 4) for s in opt_state)
    for s in shaped:
        assert s.sharding.is_equivalent_to(kernel.sharding, 2), s.sharding
