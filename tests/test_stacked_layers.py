"""Stacked (scanned) layers are selected per layer, never across layers.

A stacked kernel ``(layers, d_in, d_out)`` holds one weight matrix per layer. The paper
selects the ``k`` smallest ``|w|`` of each weight matrix (its code: of each chunk of it), so
every layer of a stack must train ``k`` entries of its own, whatever the scale of the other
layers. The layer axes come from Flax metadata (``nnx.vmap(...,
transform_metadata={nnx.PARTITION_NAME: "layers"})``, ``nn.scan(...,
metadata_params={nn.PARTITION_NAME: "layers"})``) or are declared with
``SelectionDimensionNumbers``; the tests scale layer 0 down by 0.01, so a selection over the
whole stack would take (almost) all its entries from layer 0.

What is checked, against a numpy statement of the rule (per layer, the matrix flattened
row-major and cut into chunks of ``layout.chunk_length`` entries; in each chunk the ``k``
smallest ``|w|``, ties by position):

* NNX ``nnx.vmap`` + ``nnx.scan`` model, one ``nnx.Optimizer`` step;
* Linen ``nn.scan`` with ``nn.with_partitioning`` kernels and a ``TrainState``;
* a hand-stacked plain dict tree with ``dimension_numbers`` (tree, ``params -> tree`` and
  ``(path, leaf) -> value`` forms);
* a layer axis that is not the leading one, declared with ``dimension_numbers``;
* custom ``layer_axis_names``; a metadata layer axis that is not leading is a clear error;
* ``magnitude_mask`` / ``masked_apply`` select per layer too.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import nanoadam_jax as na
from nanoadam_jax import layout

LAYERS, WIDTH = 4, 32
DENSITY = 0.1
K = na.selection.num_selected_static(WIDTH * WIDTH, DENSITY)  # one chunk per 32x32 layer


def expected_positions(matrix: np.ndarray, density: float, chunk_size=None) -> np.ndarray:
    """The rule in numpy for ONE layer: ``(chunks, k)`` sorted positions inside each chunk."""
    c = layout.chunk_length(matrix.shape, chunk_size or layout.DEFAULT_CHUNK_SIZE)
    k = na.selection.num_selected_static(c, density)
    rows = np.abs(matrix.astype(np.float32)).reshape(-1, c)
    return np.sort(np.argsort(rows, axis=1, kind="stable")[:, :k], axis=1)


def changed_per_layer(before: np.ndarray, after: np.ndarray, axis: int = 0) -> list[int]:
    diff = np.moveaxis(np.asarray(before) != np.asarray(after), axis, 0)
    return [int(d.sum()) for d in diff]


def assert_selected_per_layer(selected, stacked, axis: int = 0, chunk_size=None):
    """``selected`` (the state's positions) is the per-layer rule applied to ``stacked``."""
    stacked = np.moveaxis(np.asarray(stacked), axis, 0)
    selected = np.asarray(selected)
    assert selected.shape[0] == stacked.shape[0]
    for layer, (sel, w) in enumerate(zip(selected, stacked)):
        want = expected_positions(w, DENSITY, chunk_size)
        np.testing.assert_array_equal(sel.reshape(want.shape), want, err_msg=f"layer {layer}")


def stacked_weights(seed: int = 0, shape=(LAYERS, WIDTH, WIDTH), axis: int = 0) -> np.ndarray:
    """Normal weights with the layer at index 0 of ``axis`` scaled down by 0.01."""
    w = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    index = [slice(None)] * len(shape)
    index[axis] = 0
    w[tuple(index)] *= 0.01
    return w


# --------------------------------------------------------------------------------------
# (a) NNX: nnx.vmap-created blocks with annotated kernels, run with nnx.scan.
# --------------------------------------------------------------------------------------


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None))
        self.lin = nnx.Linear(WIDTH, WIDTH, kernel_init=init, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return jnp.tanh(self.lin(x))


class Stack(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, axis_name: str = "layers", out_axis: int = 0):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(
            in_axes=(0,), out_axes=out_axis, transform_metadata={nnx.PARTITION_NAME: axis_name}
        )
        def make(rngs):
            return Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(WIDTH, 2, rngs=rngs)
        self.out_axis = out_axis

    def __call__(self, x):
        @nnx.scan(in_axes=(self.out_axis, nnx.Carry), out_axes=nnx.Carry)
        def body(block, h):
            return block(h)

        return self.head(body(self.blocks, x))


def make_stack(**kw) -> Stack:
    # The annotation needs a mesh context; the mesh need not have a "layers" axis.
    with jax.set_mesh(jax.make_mesh((1,), ("data",))):
        model = Stack(nnx.Rngs(0), **kw)
    kernel = model.blocks.lin.kernel
    layer0 = (slice(None),) * kw.get("out_axis", 0) + (0,)
    kernel.set_value(kernel.get_value().at[layer0].multiply(0.01))
    return model


def batch():
    x = jax.random.normal(jax.random.PRNGKey(1), (16, WIDTH))
    y = jax.random.normal(jax.random.PRNGKey(2), (16, 2))
    return x, y


def nnx_step(model, optimizer):
    x, y = batch()
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)


def test_nnx_vmap_scan_model_selects_k_in_each_layer():
    model = make_stack()
    kernel = model.blocks.lin.kernel
    assert kernel.shape == (LAYERS, WIDTH, WIDTH)
    assert kernel.get_metadata()["out_sharding"] == ("layers", None, None)
    before = np.asarray(kernel.get_value())
    optimizer = nnx.Optimizer(model, na.nanoadam(1e-2, density=DENSITY), wrt=nnx.Param)
    nnx.jit(nnx_step)(model, optimizer)

    selected = optimizer.opt_state[0].selected["blocks"]["lin"]["kernel"]
    assert selected.shape == (LAYERS, K) == (4, 102)  # (layers, capacity): one chunk/layer
    assert_selected_per_layer(selected.get_value(), before)
    # Exactly k entries of EACH layer move (not most of them in the small layer 0).
    assert changed_per_layer(before, kernel.get_value()) == [K] * LAYERS
    # The head is dense.
    assert optimizer.opt_state[0].selected["head"]["kernel"] is None


def test_nnx_later_steps_read_the_layout_back_from_the_state():
    """``nnx.Optimizer.update`` passes plain arrays (no metadata): later steps and refreshes
    still select per layer, with the chunking read from the state."""
    model = make_stack()
    optimizer = nnx.Optimizer(
        model, na.nanoadam(3e-2, density=DENSITY, mask_interval=2), wrt=nnx.Param
    )
    step = nnx.jit(nnx_step)
    for _ in range(2):
        step(model, optimizer)
    before = np.asarray(model.blocks.lin.kernel.get_value())
    step(model, optimizer)  # step 2: a refresh on the current weights
    selected = optimizer.opt_state[0].selected["blocks"]["lin"]["kernel"].get_value()
    assert_selected_per_layer(selected, before)
    assert changed_per_layer(before, model.blocks.lin.kernel.get_value()) == [K] * LAYERS


# --------------------------------------------------------------------------------------
# (b) Linen: nn.scan with metadata_params, nn.with_partitioning kernels, a TrainState.
# --------------------------------------------------------------------------------------


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, None))
        return jnp.tanh(nn.Dense(WIDTH, use_bias=False, kernel_init=init)(h)), None


class LinenStack(nn.Module):
    axis_name: str = "layers"

    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(
            LinenBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=LAYERS,
            metadata_params={nn.PARTITION_NAME: self.axis_name},
        )
        x, _ = scanned(name="blocks")(x, None)
        return nn.Dense(2, name="head")(x)


def test_linen_scan_train_state_selects_k_in_each_layer():
    net = LinenStack()
    x, y = batch()
    params = net.init(jax.random.PRNGKey(0), x)["params"]
    boxed = params["blocks"]["Dense_0"]["kernel"]
    assert isinstance(boxed, nn.Partitioned) and boxed.names == ("layers", None, None)
    params["blocks"]["Dense_0"]["kernel"] = boxed.replace_boxed(boxed.value.at[0].multiply(0.01))
    state = train_state.TrainState.create(
        apply_fn=net.apply, params=params, tx=na.nanoadamw(1e-2, density=DENSITY)
    )
    selected = state.opt_state[0].selected["blocks"]["Dense_0"]["kernel"]
    assert selected.shape == (LAYERS, K)

    @jax.jit
    def train_step(state):
        loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
        return state.apply_gradients(grads=jax.grad(loss)(state.params))

    before = np.asarray(state.params["blocks"]["Dense_0"]["kernel"].value)
    state = train_step(state)
    after = state.params["blocks"]["Dense_0"]["kernel"].value
    assert_selected_per_layer(state.opt_state[0].selected["blocks"]["Dense_0"]["kernel"], before)
    assert changed_per_layer(before, after) == [K] * LAYERS
    assert int(state.step) == 1


# --------------------------------------------------------------------------------------
# (c) Plain dict trees: the layer axes declared with dimension_numbers.
# --------------------------------------------------------------------------------------


def plain_params(axis: int = 0) -> dict:
    shape = [WIDTH, WIDTH]
    shape.insert(axis, LAYERS)
    return {
        "blocks": {"kernel": jnp.asarray(stacked_weights(shape=tuple(shape), axis=axis))},
        "head": {"kernel": jnp.asarray(np.random.default_rng(3).standard_normal((WIDTH, 2)))},
    }


def one_update(tx, params):
    grads = jax.tree.map(lambda p: jnp.cos(3.0 * p), params)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return updates, state


MATRIX = na.SelectionDimensionNumbers(axes=(1, 2))
DIMENSION_NUMBERS = {
    "tree": {"blocks": {"kernel": MATRIX}, "head": {"kernel": None}},
    "params -> tree": lambda p: {"blocks": {"kernel": MATRIX}, "head": {"kernel": None}},
    "(path, leaf) -> value": lambda path, leaf: MATRIX if leaf.ndim == 3 else None,
    "negative axes": {
        "blocks": {"kernel": na.SelectionDimensionNumbers((-2, -1))},
        "head": {"kernel": None},
    },
}


@pytest.mark.parametrize("form", list(DIMENSION_NUMBERS))
def test_plain_tree_with_dimension_numbers_selects_per_layer(form):
    params = plain_params()
    tx = na.nanoadam(1e-2, density=DENSITY, dimension_numbers=DIMENSION_NUMBERS[form])
    updates, state = one_update(tx, params)
    selected = state[0].selected["blocks"]["kernel"]
    chex.assert_shape(selected, (LAYERS, K))
    assert_selected_per_layer(selected, params["blocks"]["kernel"])
    assert (
        changed_per_layer(np.zeros(updates["blocks"]["kernel"].shape), updates["blocks"]["kernel"])
        == [K] * LAYERS
    )


def test_plain_tree_without_declared_axes_selects_over_the_whole_stack():
    """The contrast: with no metadata and no dimension_numbers the stack is one matrix, and
    the selection concentrates on the small layer 0."""
    params = plain_params()
    updates, state = one_update(na.nanoadam(1e-2, density=DENSITY), params)
    n = LAYERS * WIDTH * WIDTH
    k_all = na.selection.num_selected_static(n, DENSITY)
    chex.assert_shape(state[0].selected["blocks"]["kernel"], (k_all,))
    counts = changed_per_layer(
        np.zeros(n).reshape(LAYERS, WIDTH, WIDTH), updates["blocks"]["kernel"]
    )
    assert sum(counts) == k_all and counts[0] > 0.9 * k_all  # nearly all from layer 0


def test_chunks_stay_inside_one_layer():
    """Several chunks per layer: chunks never cross a layer boundary, k per chunk."""
    params = plain_params()
    tx = na.nanoadam(
        1e-2, density=DENSITY, chunk_size=256, dimension_numbers=DIMENSION_NUMBERS["tree"]
    )
    _, state = one_update(tx, params)
    selected = state[0].selected["blocks"]["kernel"]
    # 16 chunks of 2 rows x 32 per layer (32 rows over 16 devices: 2 rows per shard).
    k = na.selection.num_selected_static(64, DENSITY)
    chex.assert_shape(selected, (LAYERS, 16, k))
    assert_selected_per_layer(selected, params["blocks"]["kernel"], chunk_size=256)


# --------------------------------------------------------------------------------------
# (d) A layer axis that is not the leading one.
# --------------------------------------------------------------------------------------


def test_non_leading_layer_axis_declared_with_dimension_numbers():
    params = plain_params(axis=1)  # (32, layers, 32)
    dims = {
        "blocks": {"kernel": na.SelectionDimensionNumbers(axes=(0, 2))},
        "head": {"kernel": None},
    }
    tx = na.nanoadam(1e-2, density=DENSITY, mask_interval=2, dimension_numbers=dims)
    updates, state = one_update(tx, params)
    selected = state[0].selected["blocks"]["kernel"]
    chex.assert_shape(selected, (LAYERS, K))  # the layer axis first in the state
    assert_selected_per_layer(selected, params["blocks"]["kernel"], axis=1)
    counts = changed_per_layer(
        np.zeros((WIDTH, LAYERS, WIDTH)), updates["blocks"]["kernel"], axis=1
    )
    assert counts == [K] * LAYERS
    chex.assert_shape(updates["blocks"]["kernel"], (WIDTH, LAYERS, WIDTH))

    # Several steps with a refresh: the transposed layout round-trips.
    step = jax.jit(lambda p, s, g: tx.update(g, s, p))
    p, s = params, tx.init(params)
    for t in range(3):
        before = jax.tree.map(np.asarray, p)
        g = jax.tree.map(lambda x: jnp.cos(3.0 * x + t), p)
        u, s = step(p, s, g)
        p = optax.apply_updates(p, u)
    assert_selected_per_layer(s[0].selected["blocks"]["kernel"], before["blocks"]["kernel"], axis=1)
    counts = changed_per_layer(before["blocks"]["kernel"], p["blocks"]["kernel"], axis=1)
    assert counts == [K] * LAYERS


# --------------------------------------------------------------------------------------
# (e) Custom layer axis names; (f) a non-leading metadata layer axis is an error.
# --------------------------------------------------------------------------------------


def test_custom_layer_axis_names():
    model = make_stack(axis_name="stack")
    kernel = model.blocks.lin.kernel
    assert kernel.get_metadata()["out_sharding"] == ("stack", None, None)
    before = np.asarray(kernel.get_value())

    # Not a recognised name by default: the stack is one matrix.
    default = nnx.Optimizer(model, na.nanoadam(1e-2, density=DENSITY), wrt=nnx.Param)
    k_all = na.selection.num_selected_static(LAYERS * WIDTH * WIDTH, DENSITY)
    assert default.opt_state[0].selected["blocks"]["lin"]["kernel"].shape == (k_all,)

    tx = na.nanoadam(1e-2, density=DENSITY, layer_axis_names=("stack",))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    nnx.jit(nnx_step)(model, optimizer)
    selected = optimizer.opt_state[0].selected["blocks"]["lin"]["kernel"].get_value()
    assert selected.shape == (LAYERS, K)
    assert_selected_per_layer(selected, before)
    assert changed_per_layer(before, kernel.get_value()) == [K] * LAYERS

    # Linen too.
    net = LinenStack(axis_name="depth")
    params = net.init(jax.random.PRNGKey(0), batch()[0])["params"]
    state = na.nanoadam(1e-2, density=DENSITY, layer_axis_names=["depth", "layers"]).init(params)
    assert state[0].selected["blocks"]["Dense_0"]["kernel"].shape == (LAYERS, K)


def test_layer_axis_names_must_be_a_sequence_of_names():
    with pytest.raises(ValueError, match="layer_axis_names"):
        na.nanoadam(1e-2, layer_axis_names="layers")


def test_non_leading_metadata_layer_axis_is_a_clear_error():
    model = make_stack(out_axis=1)
    kernel = model.blocks.lin.kernel
    assert kernel.shape == (WIDTH, LAYERS, WIDTH)
    assert kernel.get_metadata()["out_sharding"] == (None, "layers", None)
    with pytest.raises(
        ValueError, match=r"blocks.*lin.*kernel.*not the leading axes.*dimension_numbers"
    ):
        nnx.Optimizer(model, na.nanoadam(1e-2, density=DENSITY), wrt=nnx.Param)

    # Linen boxes, by hand.
    params = {"w": nn.Partitioned(jnp.ones((WIDTH, LAYERS, WIDTH)), names=(None, "layers", None))}
    with pytest.raises(ValueError, match=r"'w'.*not the leading axes"):
        na.nanoadam(1e-2).init(params)

    # Declaring the axes resolves it.
    dims = lambda path, leaf: na.SelectionDimensionNumbers((0, 2)) if leaf.ndim == 3 else None
    optimizer = nnx.Optimizer(
        model, na.nanoadam(1e-2, density=DENSITY, dimension_numbers=dims), wrt=nnx.Param
    )
    before = np.asarray(kernel.get_value())
    assert optimizer.opt_state[0].selected["blocks"]["lin"]["kernel"].shape == (LAYERS, K)
    nnx.jit(nnx_step)(model, optimizer)
    selected = optimizer.opt_state[0].selected["blocks"]["lin"]["kernel"].get_value()
    assert_selected_per_layer(selected, before, axis=1)
    assert changed_per_layer(before, kernel.get_value(), axis=1) == [K] * LAYERS


# --------------------------------------------------------------------------------------
# (g) magnitude_mask and masked_apply select per layer too.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["dimension_numbers", "metadata"])
def test_mask_and_masked_apply_select_per_layer(source):
    stacked = stacked_weights()
    if source == "metadata":
        params = {
            "blocks": {
                "kernel": nn.Partitioned(jnp.asarray(stacked), names=("layers", None, None))
            },
            "head": {"kernel": jnp.ones((WIDTH, 2))},
        }
        kw = {}
    else:
        params = {
            "blocks": {"kernel": jnp.asarray(stacked)},
            "head": {"kernel": jnp.ones((WIDTH, 2))},
        }
        kw = {"dimension_numbers": DIMENSION_NUMBERS["tree"]}
    grads = jax.tree.map(jnp.ones_like, params)
    for factory in (na.magnitude_mask, na.masked_apply):
        tx = factory(density=DENSITY, mask_interval=5, **kw)
        state = tx.init(params)
        chex.assert_shape(state.chunk_grid["blocks"]["kernel"], (LAYERS, 0))
        updates, state = jax.jit(tx.update)(grads, state, params)
        kernel_updates = nn.unbox(updates)["blocks"]["kernel"]
        counts = changed_per_layer(np.zeros(stacked.shape), kernel_updates)
        assert counts == [K] * LAYERS, factory.__name__
        mask = np.asarray(nn.unbox(state[2])["blocks"]["kernel"])
        for layer in range(LAYERS):
            want = np.zeros(WIDTH * WIDTH, bool)
            want[expected_positions(stacked[layer], DENSITY)[0]] = True
            np.testing.assert_array_equal(mask[layer].reshape(-1), want)

    # The spelled-out pipeline moves the same entries as nanoadam.
    pipeline = optax.chain(
        na.magnitude_mask(DENSITY, 5, **kw),
        optax.scale_by_adam(),
        na.masked_apply(DENSITY, 5, **kw),
        optax.scale_by_learning_rate(1e-2),
    )
    u_pipe, _ = jax.jit(pipeline.update)(grads, pipeline.init(params), params)
    tx = na.nanoadam(1e-2, density=DENSITY, **kw)
    u_nano, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    chex.assert_trees_all_close(nn.unbox(u_pipe), nn.unbox(u_nano), rtol=1e-6)
