"""What the mesh tests share (test_mesh_invariance.py, test_resume_mesh.py, test_sharding.py):
an optimizer whose stacked leaf declares its layer axis, random parameters, a gradient that is
the same on every mesh bit for bit, meshes of the first ``n`` host devices, and state helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import nanoadam_jax as nanoadam


def dims(path, leaf):
    """A 3-D leaf is a ``(layers, d_in, d_out)`` stack: its first axis is a batch axis."""
    return nanoadam.SelectionDimensionNumbers(axes=(1, 2)) if len(leaf.shape) == 3 else None


def make_tx(lr: float = 1e-2):
    return nanoadam.nanoadam(lr, density=0.1, mask_interval=2, dimension_numbers=dims)


def random_params(shapes: dict, seed: int) -> dict:
    """Host (numpy) weights of ``shapes`` and a dense ``head`` (placing them compiles
    nothing)."""
    rng = np.random.default_rng(seed)
    params = {
        name: (rng.standard_normal(shape) * 0.05).astype(np.float32)
        for name, shape in shapes.items()
    }
    params["head"] = {"kernel": (rng.standard_normal((384, 16)) * 0.05).astype(np.float32)}
    return params


def grads_of(params):
    """Element-wise in the parameters: the same on every mesh, bit for bit."""
    return jax.tree.map(lambda w: jnp.sin(3.0 * w) + 0.1, params)


def mesh_of(n: int, axis: str) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]), (axis,))


def on_mesh(tree, mesh: Mesh):
    """Arrays not yet on ``mesh`` (the scalar counters) replicated on it, so that one
    compiled program runs every step."""

    def put(x):
        s = getattr(x, "sharding", None)
        if isinstance(s, NamedSharding) and s.mesh == mesh:
            return x
        return jax.device_put(x, NamedSharding(mesh, P()))

    return jax.tree.map(put, tree)


def host(tree):
    return jax.tree.map(np.asarray, tree)


def adam_of(inner_state) -> optax.ScaleByAdamState:
    """The one ``ScaleByAdamState`` inside an inner state (sparse or dense)."""
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    found = [x for x in jax.tree.leaves(inner_state, is_leaf=is_adam) if is_adam(x)]
    assert len(found) == 1, inner_state
    return found[0]
