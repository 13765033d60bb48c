"""End-to-end use from Flax: nnx.Optimizer and Linen's TrainState.

Each step moves exactly ``k`` entries of every chunk of each sparse kernel (``k`` of the
chunk, ``num_selected(chunk, density)``), the dense head and norm move entirely, and the
compact state has the chunked shape ``(*chunk_grid, capacity)``. Stacked layers are
covered in ``test_stacked_layers.py``, meshes in ``test_sharding.py``.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.training import train_state

import nanoadam_jax as nanoadam


class Mlp(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(8, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.head = nnx.Linear(32, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.norm(jax.nn.relu(self.hidden(x))))


def batch(i):
    x = jax.random.normal(jax.random.PRNGKey(i), (16, 8))
    y = (x[:, 0] > 0).astype(jnp.int32)
    return x, y


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def count_changed(before, after):
    return {
        "/".join(nanoadam.path_names(p)): int(np.sum(np.asarray(a) != np.asarray(b)))
        for (p, a), b in zip(
            jax.tree_util.tree_leaves_with_path(after), jax.tree.leaves(before), strict=True
        )
    }


def changed_per_chunk(before, after, chunk):
    """Changed entries of each chunk of ``chunk`` consecutive (row-major) entries."""
    return (np.asarray(before) != np.asarray(after)).reshape(-1, chunk).sum(axis=1)


def test_nnx_optimizer_changes_exactly_k_entries_per_step():
    model = Mlp(nnx.Rngs(0))
    optimizer = nnx.Optimizer(
        model, nanoadam.nanoadam(1e-2, density=0.1, mask_interval=5), wrt=nnx.Param
    )

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads = nnx.value_and_grad(lambda m: xent(m(x), y))(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    for i in range(20):
        before = nnx.state(model, nnx.Param)
        before = jax.tree.map(np.asarray, before)
        losses.append(float(train_step(model, optimizer, *batch(i))))
        changed = count_changed(before, nnx.state(model, nnx.Param))
        assert changed["hidden/kernel/value"] == nanoadam.num_selected(8 * 32, 0.1) == 26
        assert changed["hidden/bias/value"] == 3
        assert changed["head/kernel/value"] == 64  # dense head
        assert changed["norm/scale/value"] == 32  # dense norm
    assert np.mean(losses[-5:]) < np.mean(losses[:5])


def test_linen_train_state_changes_exactly_k_entries_per_step():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jax.nn.relu(nn.Dense(32)(x))
            return nn.Dense(2, name="head")(x)

    net = Net()
    params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))["params"]
    state = train_state.TrainState.create(
        apply_fn=net.apply,
        params=params,
        tx=nanoadam.nanoadamw(1e-2, density=0.25, mask_interval=3, weight_decay=1e-2),
    )

    @jax.jit
    def train_step(state, x, y):
        grads = jax.grad(lambda p: xent(state.apply_fn({"params": p}, x), y))(state.params)
        return state.apply_gradients(grads=grads)

    for i in range(9):
        before = jax.tree.map(np.asarray, state.params)
        state = train_step(state, *batch(i))
        changed = count_changed(before, state.params)
        assert changed["dense_0/kernel"] == 64
        assert changed["dense_0/bias"] == 8
        assert changed["head/kernel"] == 64
    assert int(state.step) == 9


def test_nnx_optimizer_changes_exactly_k_entries_per_chunk():
    """Kernels of several chunks (``chunk_size=64``: chunks of one row of 32, since 8 rows
    split over 8 devices leave one per shard): every chunk moves exactly
    ``k = round(0.1 * 32) = 3`` entries per step, across refreshes."""
    model = Mlp(nnx.Rngs(0))
    tx = nanoadam.nanoadamw(1e-2, density=0.1, mask_interval=3, chunk_size=64)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    state = optimizer.opt_state[0]
    chex.assert_shape(state.selected["hidden"]["kernel"].get_value(), (8, 3))
    chex.assert_shape(state.sparse_inner_state[0].mu["hidden"]["kernel"].get_value(), (8, 3))
    assert state.selected["hidden"]["kernel"].get_value().dtype == jnp.uint16
    chex.assert_shape(state.selected["hidden"]["bias"].get_value(), (3,))  # one chunk of 32
    assert state.selected["head"]["kernel"] is None  # dense

    @nnx.jit
    def train_step(model, optimizer, x, y):
        grads = nnx.grad(lambda m: xent(m(x), y))(model)
        optimizer.update(model, grads)

    for i in range(7):  # refreshes at steps 0, 3 and 6
        before = np.asarray(model.hidden.kernel.get_value())
        train_step(model, optimizer, *batch(i))
        counts = changed_per_chunk(before, model.hidden.kernel.get_value(), 32)
        np.testing.assert_array_equal(counts, [3] * 8)
    assert int(optimizer.opt_state[0].sparse_step.get_value()) == 7


def test_linen_train_state_changes_exactly_k_entries_per_chunk():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = jax.nn.relu(nn.Dense(64)(x))
            return nn.Dense(2, name="head")(x)

    net = Net()
    params = net.init(jax.random.PRNGKey(0), jnp.ones((1, 8)))["params"]
    tx = nanoadam.nanoadam(1e-2, density=0.25, mask_interval=2, chunk_size=128)
    state = train_state.TrainState.create(apply_fn=net.apply, params=params, tx=tx)
    # 8 chunks of one 64-entry row (8 rows over 8 devices: one per shard), k = 16 each
    chex.assert_shape(state.opt_state[0].selected["Dense_0"]["kernel"], (8, 16))

    @jax.jit
    def train_step(state, x, y):
        grads = jax.grad(lambda p: xent(state.apply_fn({"params": p}, x), y))(state.params)
        return state.apply_gradients(grads=grads)

    for i in range(5):
        before = jax.tree.map(np.asarray, state.params)
        state = train_step(state, *batch(i))
        counts = changed_per_chunk(
            before["Dense_0"]["kernel"], state.params["Dense_0"]["kernel"], 64
        )
        np.testing.assert_array_equal(counts, [16] * 8)
        assert count_changed(before, state.params)["head/kernel"] == 128
