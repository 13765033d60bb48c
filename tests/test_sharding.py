"""Sharded fine-tuning on 8 host devices: the default ``nanoadam(...)`` on a mesh.

Parameters live on a ``jax.sharding.Mesh``: FSDP (``P("fsdp", None)``), tensor-parallel
(``P(None, "tp")``) or 2-D (``P("fsdp", "tp")``), in both sharding modes (``AxisType.Auto``:
XLA propagates shardings; ``AxisType.Explicit``: the shardings are part of the types, set
with ``jax.set_mesh``). With a known sharding at ``init`` the chunk length is halved until
every chunk lies on one shard, so the compact state ``(*chunk_grid, capacity)`` is sharded
like the parameter rows it indexes. What is checked, for the DEFAULT configuration:

* (a) the optimizer state held by one device is at most 0.16x ``optax.adamw``'s (d = 0.1,
  float32 moments), and stays sharded through the jitted steps;
* (b) the compiled ``jit(update)`` communicates nothing above a few hundred bytes: every
  collective of the module is counted, the refresh branch of the conditional included, so
  neither an ordinary step nor a refresh moves a parameter- or k-sized array;
* (c) the parameters after several steps (two refreshes) equal a single-device run with
  the same chunk per leaf (read from the state's shape, and equal to
  ``layout.leaf_layout(..., sharding=...)``), and so does the selected set;
* (d) a leaf whose sharding no chunking fits raises a ValueError naming the leaf;
* Flax NNX: ``nnx.Optimizer`` over a model annotated with ``nnx.with_partitioning``;
* other configurations (``scope="leaf"`` / ``"global"``, the ``magnitude_mask ->
  scale_by_adam -> masked_apply`` pipeline) and abstract ``init`` (``eval_shape``, ``jit``,
  ``ShapeDtypeStruct`` inputs).

Each (layout, mode) configuration is set up, compiled and run once (cached) for all tests.
"""

from __future__ import annotations

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from mesh_setup import on_mesh

import nanoadam_jax as nanoadam
from nanoadam_jax import layout

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8,
    reason="needs 8 devices: run pytest from the repository root (conftest.py sets XLA_FLAGS)",
)

DENSITY = 0.1
INTERVAL = 2  # refresh at steps 0 and 2 of the STEPS steps run below
STEPS = 4
LR = 0.05  # large enough for the refresh at step 2 to change the selection
#: A collective whose largest array (operand or result) exceeds this many bytes is "large".
#: The smallest k-sized array of a sparse leaf is the bias's (16 chunks x 6 float32 = 384 B,
#: 48 B per device); parameter-sized ones are kilobytes to megabytes.
LIMIT_BYTES = 256
#: Optimizer-state bytes per device, as a fraction of optax.adamw's (d = 0.1: about 0.127).
STATE_RATIO = 0.16

# --------------------------------------------------------------------------------------
# Parameters, meshes, optimizers.
# --------------------------------------------------------------------------------------


def make_params() -> dict:
    """Host (numpy) parameters: placing them on a mesh compiles nothing."""
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {
        "w_big": normal(4096, 1024),
        # Multiples of 1/8: many ties at the threshold exercise the tie-break by position.
        "w_small": np.round(normal(1024, 512) * 8) / 8,
        "bias": normal(1024) * 0.1,
        "head": {"kernel": normal(512, 16)},  # dense (default labels)
    }


SPARSE = ("w_big", "w_small", "bias")

#: name -> (mesh shape, axis names, spec per leaf)
LAYOUTS = {
    "fsdp": (
        (8,),
        ("fsdp",),
        {
            "w_big": P("fsdp", None),
            "w_small": P("fsdp", None),
            "bias": P("fsdp"),
            "head": {"kernel": P("fsdp", None)},
        },
    ),
    "tp": (
        (8,),
        ("tp",),
        {
            "w_big": P(None, "tp"),
            "w_small": P(None, "tp"),
            "bias": P("tp"),
            "head": {"kernel": P(None, "tp")},
        },
    ),
    "2d": (
        (2, 4),
        ("fsdp", "tp"),
        {
            "w_big": P("fsdp", "tp"),
            "w_small": P("tp", "fsdp"),
            "bias": P("tp"),
            "head": {"kernel": P("fsdp", None)},
        },
    ),
}

#: The chunk each sparse leaf gets on each layout: (chunk, chunk grid).
EXPECTED_CHUNKS = {
    # FSDP: the one-device chunking (the bias: 1024 / 16 = 64 entries per chunk).
    "fsdp": {"w_big": (16384, (256,)), "w_small": (16384, (32,)), "bias": (64, (16,))},
    # The brief's example: (4096, 1024) split over 8 along its columns: 128 per chunk.
    "tp": {"w_big": (128, (4096, 8)), "w_small": (64, (1024, 8)), "bias": (64, (16,))},
    "2d": {"w_big": (256, (4096, 4)), "w_small": (256, (1024, 2)), "bias": (64, (16,))},
}

MODES = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
#: Every layout and every mode runs by default; the other three pairs are slow.
FAST = {("fsdp", "auto"), ("tp", "explicit"), ("2d", "auto")}
CONFIGS = [
    pytest.param(
        lay, mode, id=f"{lay}-{mode}", marks=[] if (lay, mode) in FAST else [pytest.mark.slow]
    )
    for lay in LAYOUTS
    for mode in MODES
]


@functools.cache
def mesh_for(name: str, mode: str) -> jax.sharding.Mesh:
    shape, names, _ = LAYOUTS[name]
    return jax.make_mesh(shape, names, axis_types=(MODES[mode],) * len(names))


def shardings(name: str, mode: str) -> dict:
    mesh = mesh_for(name, mode)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), LAYOUTS[name][2])


def default_tx(**kw):
    return nanoadam.nanoadam(LR, density=DENSITY, mask_interval=INTERVAL, **kw)


def fake_grads(params: dict, t: jax.Array) -> dict:
    """Element-wise "gradients" that change with the step (no communication of their own)."""
    return jax.tree.map(lambda p: jnp.cos(3.0 * p + t.astype(p.dtype)), params)


def train(tx):
    """A jitted step ``(params, state, t) -> (params, state)``."""

    def step(params, state, t):
        updates, state = tx.update(fake_grads(params, t), state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


def run(step, params, state, steps: int = STEPS):
    for t in range(steps):
        params, state = step(params, state, jnp.int32(t))
    return params, state


def device_bytes(tree, device) -> int:
    """Bytes of ``tree`` held by ``device``."""
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def chunk_of(selected: jax.Array, leaf) -> int:
    """The chunk length a leaf's state was built with: its size over the state's rows."""
    return int(np.prod(leaf.shape)) // math.prod(selected.shape[:-1])


class Run:
    """One configuration set up, compiled and run."""

    def __init__(self, name: str, mode: str, make_tx=default_tx):
        tx = make_tx()
        self.mesh = mesh = mesh_for(name, mode)
        with jax.set_mesh(mesh):
            params = jax.device_put(make_params(), shardings(name, mode))
            state = on_mesh(tx.init(params), mesh)
            self.init_state = state
            self.adamw_state = optax.adamw(LR).init(params)
            compiled = train(tx).lower(params, state, jnp.int32(0)).compile()
            self.hlo = compiled.as_text()
            self.in_shardings = compiled.input_shardings[0]
            self.out_shardings = compiled.output_shardings
            self.params, self.state = run(compiled, params, state)


@functools.cache
def sharded_run(name: str, mode: str, tx_name: str = "default") -> Run:
    return Run(name, mode, OTHER_OPTIMIZERS.get(tx_name, default_tx))


@functools.cache
def reference_run(chunks: tuple[tuple[str, int], ...], tx_name: str = "default"):
    """``(params, state)`` after STEPS steps on one device, leaf ``name`` with chunk_size
    ``chunk`` (``optax.partition``: the update is element-wise, so each leaf's run only
    depends on its own chunk)."""
    make = OTHER_OPTIMIZERS.get(tx_name, default_tx)
    sizes = sorted({c for _, c in chunks})
    labels = {name: f"c{c}" for name, c in chunks}
    labels["head"] = {"kernel": f"c{sizes[0]}"}
    tx = optax.partition({f"c{c}": make(chunk_size=c) for c in sizes}, labels)
    params = jax.tree.map(jnp.asarray, make_params())
    out, state = run(train(tx), params, tx.init(params))
    return jax.tree.map(np.asarray, out), state


def reference_selected(ref_state, name: str, chunk: int) -> np.ndarray:
    inner = ref_state.inner_states[f"c{chunk}"].inner_state
    return np.asarray(inner[0].selected[name])


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
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\)\s*->.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "bf16": 2, "c64": 8, "c128": 16}


def _bytes(shape_text: str) -> list[int]:
    """Byte sizes of every array type in an HLO type string (tuples included)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape_text):
        itemsize = _ITEMSIZE.get(dtype) or max(1, int(dtype[1:]) // 8)
        out.append(itemsize * int(np.prod([int(d) for d in dims.split(",") if d])))
    return out


def collectives(hlo_text: str) -> list[tuple[str, str, str, int]]:
    """``(computation, op, result type, largest array in bytes)`` of every collective in
    the module: all computations are read, so both branches of a conditional count.

    Counts each asynchronous pair once (``*-start``); operands are included in the size, so
    an all-gather is judged by its gathered result and a reduce-scatter by its input.
    """
    out = []
    computation = ""
    for line in hlo_text.splitlines():
        c = _COMPUTATION.match(line)
        if c:
            computation = c.group(1)
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        result, op, rest = m.groups()
        base = op.removesuffix("-start")
        if base not in _COLLECTIVES or op.endswith("-done"):
            continue
        sizes = _bytes(result) + _bytes(rest.split("),")[0])
        out.append((computation, base, result, max(sizes, default=1)))
    return out


def large_collectives(hlo_text: str) -> list[tuple[str, str, str, int]]:
    return [c for c in collectives(hlo_text) if c[3] > LIMIT_BYTES]


def branch_computations(hlo_text: str) -> set[str]:
    """Names of the computations that are branches of a ``conditional``."""
    names = set()
    for found in re.findall(r"branch_computations=\{([^}]*)\}", hlo_text):
        names |= {n.strip().lstrip("%") for n in found.split(",")}
    for found in re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", hlo_text):
        names.add(found)
    return names


def test_collective_parser_on_a_known_module():
    """The HLO reader sees a parameter-sized all-gather where one is forced (also inside a
    conditional's branch), and none in an element-wise function of sharded inputs."""
    mesh = mesh_for("fsdp", "auto")
    x = jax.device_put(jnp.ones((64, 32)), NamedSharding(mesh, P("fsdp", None)))
    gathered = jax.jit(lambda a: a * 2, out_shardings=NamedSharding(mesh, P()))
    text = gathered.lower(x).compile().as_text()
    assert [(op, size) for _, op, _, size in collectives(text)] == [("all-gather", 64 * 32 * 4)]
    local = jax.jit(lambda a: jnp.sin(a) * 2).lower(x).compile().as_text()
    assert collectives(local) == []
    reduced = jax.jit(lambda a: jnp.sum(a > 0)).lower(x).compile().as_text()
    assert [op for _, op, _, _ in collectives(reduced)] == ["all-reduce"]
    assert large_collectives(reduced) == []

    def branchy(p, a):
        flat = lambda a: jnp.cumsum(a.reshape(-1)).reshape(a.shape)  # needs the whole leaf
        return jax.lax.cond(p, flat, lambda a: a * 2, a)

    text = jax.jit(branchy).lower(True, x).compile().as_text()
    large = large_collectives(text)
    assert large and all(c in branch_computations(text) for c, *_ in large), large


# --------------------------------------------------------------------------------------
# The default configuration: state layout and size.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,mode", CONFIGS)
def test_default_state_is_sharded_like_the_parameter_rows(name, mode):
    r = sharded_run(name, mode)
    params = make_params()
    sh = shardings(name, mode)
    for state in (r.init_state, r.state):  # after init, and after the jitted steps
        inner = state[0]
        for leaf in SPARSE:
            lay = layout.leaf_layout(
                params[leaf].shape, max_density=DENSITY, sharding=sh[leaf], path=leaf
            )
            assert (lay.chunk, lay.grid) == EXPECTED_CHUNKS[name][leaf]
            assert lay.spec is not None
            want = NamedSharding(r.mesh, P(*lay.spec, None))
            for buf in (
                inner.selected[leaf],
                inner.sparse_inner_state.mu[leaf],
                inner.sparse_inner_state.nu[leaf],
            ):
                chex.assert_shape(buf, lay.state_shape)
                assert buf.sharding.is_equivalent_to(want, buf.ndim), (leaf, buf.sharding)
                assert not buf.sharding.is_fully_replicated
            assert inner.selected[leaf].dtype == jnp.uint16
        # The dense head's moments are laid out like the head.
        head_mu = inner.dense_inner_state.mu["head"]["kernel"]
        assert head_mu.sharding.is_equivalent_to(sh["head"]["kernel"], 2)
    # The compiled step returns the state where it takes it (one program for every step).
    for got, want in zip(jax.tree.leaves(r.out_shardings[1]), jax.tree.leaves(r.in_shardings[1])):
        assert got.is_equivalent_to(want, len(got.spec)), (got, want)
    # The parameters stay sharded as they were.
    for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(sh)):
        assert got.sharding.is_equivalent_to(want, got.ndim)


@pytest.mark.parametrize("name,mode", CONFIGS)
def test_default_state_per_device_is_a_fraction_of_adamw(name, mode):
    r = sharded_run(name, mode)
    device = r.mesh.devices.flat[0]
    ours = device_bytes(r.state, device)
    adamw = device_bytes(r.adamw_state, device)
    # The adamw state itself is sharded: 2 float32 moments of each leaf's shard.
    shards = [
        math.prod(s.shard_shape(p.shape))
        for p, s in zip(jax.tree.leaves(make_params()), jax.tree.leaves(shardings(name, mode)))
    ]
    assert adamw == pytest.approx(2 * 4 * sum(shards), rel=1e-3)
    assert ours <= STATE_RATIO * adamw, (ours, adamw, ours / adamw)


# --------------------------------------------------------------------------------------
# The default configuration: no communication in an update or a refresh.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,mode", CONFIGS)
def test_default_update_has_no_large_collectives(name, mode):
    """Every collective of the compiled step, refresh branch included, is scalar-sized."""
    hlo = sharded_run(name, mode).hlo
    assert "conditional(" in hlo  # the refresh is a real branch of the compiled program
    assert large_collectives(hlo) == []


def test_adamw_reference_has_no_collectives():
    """Sanity check of the measure: element-wise AdamW on the same sharding communicates nothing."""
    tx = optax.adamw(LR)
    with jax.set_mesh(mesh_for("2d", "auto")):
        params = jax.device_put(make_params(), shardings("2d", "auto"))
        text = train(tx).lower(params, tx.init(params), jnp.int32(0)).compile().as_text()
    assert collectives(text) == []


# --------------------------------------------------------------------------------------
# The default configuration: the same parameters as on one device with the same chunks.
# --------------------------------------------------------------------------------------


def chunks_used(state, params) -> tuple[tuple[str, int], ...]:
    return tuple((leaf, chunk_of(state[0].selected[leaf], params[leaf])) for leaf in SPARSE)


@pytest.mark.parametrize("name,mode", CONFIGS)
def test_default_matches_single_device_with_the_same_chunks(name, mode):
    r = sharded_run(name, mode)
    params = make_params()
    chunks = chunks_used(r.state, params)
    assert chunks == tuple((leaf, c) for leaf, (c, _) in EXPECTED_CHUNKS[name].items())
    ref_params, ref_state = reference_run(chunks)
    for leaf, chunk in chunks:
        want = reference_selected(ref_state, leaf, chunk)
        np.testing.assert_array_equal(np.asarray(r.state[0].selected[leaf]), want, err_msg=leaf)
    got = jax.tree.map(np.asarray, r.params)
    chex.assert_trees_all_close(got, ref_params, rtol=1e-6, atol=1e-7)
    # The refresh at step 2 changed the selection: more than k entries moved, but only
    # entries of the two selections.
    for leaf in SPARSE:
        moved = int(np.sum(got[leaf] != params[leaf]))
        k = math.prod(r.state[0].selected[leaf].shape)
        assert k < moved <= 2 * k, leaf  # two selections (steps 0-1 and 2-3)


def test_chunk_size_default_is_16384_and_a_single_device_run_reproduces_a_mesh_chunk():
    """Without a mesh the default chunk is 16384; ``chunk_size`` reproduces the mesh's."""
    params = make_params()
    assert layout.chunk_length(params["w_big"].shape) == layout.DEFAULT_CHUNK_SIZE == 16384
    state = jax.eval_shape(default_tx().init, params)
    chex.assert_shape(state[0].selected["w_big"], (256, 1638))
    state = jax.eval_shape(default_tx(chunk_size=128).init, params)
    chex.assert_shape(state[0].selected["w_big"], (4096, 8, 13))


# --------------------------------------------------------------------------------------
# (d) A sharding that no chunking fits.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_unalignable_sharding_is_an_error_naming_the_leaf(mode):
    """A leaf split unevenly (a ShapeDtypeStruct may say so; a placed array cannot): no
    chunk lies on one shard."""
    mesh = mesh_for("fsdp", mode)
    odd = NamedSharding(mesh, P(None, "fsdp"))
    params = {
        "encoder": {"w": jax.ShapeDtypeStruct((16, 10), jnp.float32, sharding=odd)},
        "ok": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(mesh, P("fsdp"))),
    }
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"\['encoder'\]\['w'\].*\(16, 10\)"):
        default_tx().init(params)
    with pytest.raises(ValueError, match=r"blk/w.*no chunking"):
        layout.leaf_layout((16, 10), sharding=odd, path="blk/w")
    # scope="leaf" never adapts (one chunk per matrix, replicated state): no error.
    lay = layout.leaf_layout((16, 10), scope="leaf", sharding=odd)
    assert lay.spec is None and lay.grid == ()


# --------------------------------------------------------------------------------------
# Other configurations on a mesh.
# --------------------------------------------------------------------------------------


def pipeline(**kw):
    return optax.chain(
        nanoadam.magnitude_mask(**kw),
        optax.scale_by_adam(),
        nanoadam.masked_apply(**kw),
        optax.scale_by_learning_rate(LR),
    )


OTHER_OPTIMIZERS = {
    "default": default_tx,
    # One chunk per layer matrix: its state is replicated on a mesh (documented cost).
    "leaf": lambda chunk_size=None: default_tx(scope="leaf"),
    # One threshold over all sparse leaves, full-size state, another inner transformation.
    "global": lambda chunk_size=None: optax.chain(
        nanoadam.sparse_update(optax.scale_by_lion(), DENSITY, INTERVAL, scope="global"),
        optax.scale(-LR),
    ),
    "pipeline": lambda **kw: pipeline(density=DENSITY, mask_interval=INTERVAL, **kw),
}


def mask_chunks(state, params):
    """The chunk per sparse leaf of a ``magnitude_mask`` state (from its ``chunk_grid``)."""
    grids = state[0].chunk_grid
    return tuple((leaf, chunk_of(grids[leaf], params[leaf])) for leaf in SPARSE)


OTHER_CASES = [
    pytest.param("leaf", "fsdp", "auto", id="leaf-fsdp-auto", marks=pytest.mark.slow),
    pytest.param("global", "2d", "auto", id="global-2d-auto"),
    pytest.param("global", "tp", "explicit", id="global-tp-explicit"),
    pytest.param("pipeline", "fsdp", "auto", id="pipeline-fsdp-auto", marks=pytest.mark.slow),
    pytest.param("pipeline", "2d", "auto", id="pipeline-2d-auto"),
    pytest.param("pipeline", "fsdp", "explicit", id="pipeline-fsdp-explicit"),
    pytest.param("leaf", "tp", "explicit", id="leaf-tp-explicit", marks=pytest.mark.slow),
    pytest.param("pipeline", "tp", "explicit", id="pipeline-tp-explicit", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("tx_name,name,mode", OTHER_CASES)
def test_other_configurations_match_single_device(tx_name, name, mode):
    r = sharded_run(name, mode, tx_name)
    params = make_params()
    if tx_name == "global":
        chunks = tuple((leaf, 1) for leaf in SPARSE)  # no chunks: any chunk_size
    elif tx_name == "pipeline":
        chunks = mask_chunks(r.state, params)
    else:
        chunks = chunks_used(r.state, params)
    if tx_name == "leaf":  # one chunk per matrix, state replicated (documented)
        assert chunks == tuple((leaf, params[leaf].size) for leaf in SPARSE)
        assert r.state[0].selected["w_big"].sharding.is_fully_replicated
    ref_params, _ = reference_run(chunks, tx_name)
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, r.params), ref_params, rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("tx_name,name,mode", [c for c in OTHER_CASES if "leaf" not in c.values[0]])
def test_other_configurations_have_no_large_collectives(tx_name, name, mode):
    """``"global"`` reduces a few counts per selection pass; the mask pipeline selects per
    chunk like the default and must not communicate more."""
    assert large_collectives(sharded_run(name, mode, tx_name).hlo) == []


@pytest.mark.parametrize("policy", ["keep", "reset"])
def test_refresh_policies_under_explicit_sharding(policy):
    """Both refresh policies build their new inner state sharded like the old one (the
    refresh is a conditional, whose branches must agree on the shardings in explicit mode)."""
    mesh = mesh_for("fsdp", "explicit")
    host = {"w": make_params()["w_small"][:256, :128].copy()}
    tx = default_tx(refresh_policy=policy)
    with jax.set_mesh(mesh):
        params = jax.device_put(host, NamedSharding(mesh, P("fsdp", None)))
        out, state = run(train(tx), params, tx.init(params))
    chunk = chunk_of(state[0].selected["w"], host["w"])
    # 16 rows per chunk: the one-device chunking (256 rows over up to 16 devices).
    assert chunk == 16 * 128
    ref_tx = default_tx(refresh_policy=policy, chunk_size=chunk)
    params = jax.tree.map(jnp.asarray, host)
    ref, ref_state = run(train(ref_tx), params, ref_tx.init(params))
    np.testing.assert_array_equal(np.asarray(state[0].selected["w"]), ref_state[0].selected["w"])
    chex.assert_trees_all_close(jax.tree.map(np.asarray, out), ref, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------
# Abstract init: ShapeDtypeStructs, eval_shape, jit.
# --------------------------------------------------------------------------------------


def abstract_params(name: str, mode: str) -> dict:
    return jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s),
        make_params(),
        shardings(name, mode),
    )


def assert_same_state(got, want):
    """Same structure, shapes, dtypes and shardings (``got`` may be abstract)."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert (g.shape, g.dtype) == (w.shape, w.dtype)
        if w.ndim:
            # eval_shape under explicit sharding reports an AbstractMesh: compare the
            # mesh's axes and the spec rather than the device assignment.
            assert g.sharding is not None, g.shape
            same_mesh = dict(g.sharding.mesh.shape) == dict(w.sharding.mesh.shape)
            same_spec = g.sharding.is_equivalent_to(w.sharding, w.ndim) or (
                same_mesh
                and jax.sharding.PartitionSpec(*g.sharding.spec)
                == jax.sharding.PartitionSpec(*w.sharding.spec)
            )
            assert same_spec, (g.shape, g.sharding, w.sharding)


@pytest.mark.parametrize("how", ["eval_shape", "jit"])
def test_abstract_init_under_explicit_sharding_matches_the_eager_state(how):
    """Under explicit sharding the traced parameters carry their sharding, so ``init`` under
    ``jax.eval_shape`` (a restore target) or ``jax.jit`` builds the eager state's layout."""
    mesh = mesh_for("tp", "explicit")
    tx = default_tx()
    with jax.set_mesh(mesh):
        eager = tx.init(jax.device_put(make_params(), shardings("tp", "explicit")))
        if how == "eval_shape":
            got = jax.eval_shape(tx.init, abstract_params("tp", "explicit"))
        else:
            got = jax.jit(tx.init)(jax.device_put(make_params(), shardings("tp", "explicit")))
    assert_same_state(got, eager)


def test_init_on_sharded_shape_dtype_structs_matches_the_eager_state():
    """``init`` on ``ShapeDtypeStruct``s with shardings (automatic mode): the same chunking,
    and the state placed like the eager one (as optax places the dense leaves' moments)."""
    mesh = mesh_for("tp", "auto")
    tx = default_tx()
    with jax.set_mesh(mesh):
        eager = tx.init(jax.device_put(make_params(), shardings("tp", "auto")))
        got = tx.init(abstract_params("tp", "auto"))
    for leaf in SPARSE:
        chex.assert_equal_shape([got[0].selected[leaf], eager[0].selected[leaf]])
    assert_same_state(got, eager)


def test_eval_shape_of_init_without_shardings_is_the_single_device_layout():
    """Automatic mode hides shardings from traced values: ``eval_shape`` then sees no mesh
    and gives the default chunking (the same as ``init`` on one device)."""
    tx = default_tx()
    with jax.set_mesh(mesh_for("fsdp", "auto")):
        abstract = jax.eval_shape(tx.init, abstract_params("fsdp", "auto"))
    concrete = tx.init(jax.tree.map(jnp.asarray, make_params()))
    chex.assert_trees_all_equal_shapes_and_dtypes(abstract, concrete)


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
            bias_init=nnx.with_partitioning(nnx.initializers.normal(0.1), ("model",)),
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


NNX_SPARSE = (("up", "kernel"), ("up", "bias"), ("down", "kernel"), ("down", "bias"))


def _nnx_train(model, tx, steps: int = 3):
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
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


def _nnx_tx(**kw):
    return nanoadam.nanoadam(1e-2, density=0.25, mask_interval=2, **kw)


@functools.cache
def _nnx_reference(chunks: tuple[tuple[tuple[str, str], int], ...]) -> dict:
    with nnx.use_eager_sharding(False):
        model = Mlp(nnx.Rngs(0))
    by_path = dict(chunks)
    sizes = sorted(set(by_path.values()))

    def labels(params):
        def label(path, _):
            names = tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)
            return f"c{by_path.get(names[:2], sizes[0])}"

        return jax.tree_util.tree_map_with_path(
            label, params, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )

    tx = optax.partition({f"c{c}": _nnx_tx(chunk_size=c) for c in sizes}, labels)
    _nnx_train(model, tx)
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("mode", ["auto", pytest.param("explicit", marks=pytest.mark.slow)])
def test_nnx_optimizer_over_partitioned_model(mode):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(MODES[mode],) * 2)
    with jax.set_mesh(mesh):
        model = Mlp(nnx.Rngs(0), explicit=mode == "explicit")
        kernel = model.up.kernel[...]
        assert kernel.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "model")), 2)
        optimizer = _nnx_train(model, _nnx_tx())
    selected = optimizer.opt_state[0].selected
    mu = optimizer.opt_state[0].sparse_inner_state.mu
    chunks = []
    for module, name in NNX_SPARSE:
        var = getattr(getattr(model, module), name)
        sel = selected[module][name]
        lay = layout.leaf_layout(
            var.shape, max_density=0.25, sharding=var[...].sharding, path=f"{module}.{name}"
        )
        chex.assert_shape(sel.get_value(), lay.state_shape)
        # Sharded like the parameter rows (no metadata copied from the kernel onto it).
        spec = P(*lay.spec, None) if lay.spec is not None else P()
        for buf in (sel, mu[module][name]):
            got = buf.get_value().sharding
            assert got.is_equivalent_to(NamedSharding(mesh, spec), len(lay.state_shape)), (
                module,
                name,
                got,
            )
        chunks.append(((module, name), chunk_of(sel.get_value(), var)))
    # up.kernel (32, 64) split over 4 along its columns: chunks of 16, state (32, 4, 4).
    assert dict(chunks)[("up", "kernel")] == 16
    assert selected["up"]["kernel"].shape == (32, 4, 4)
    assert not selected["up"]["kernel"].get_value().sharding.is_fully_replicated
    got = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    chex.assert_trees_all_close(got, _nnx_reference(tuple(chunks)), rtol=1e-5, atol=1e-6)
    # Parameters keep their sharding.
    assert model.up.kernel[...].sharding.is_equivalent_to(kernel.sharding, 2)
