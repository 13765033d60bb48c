"""``nanoadamw`` takes what ``optax.adamw`` takes, and at ``density=1.0`` is it."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nanoadam_jax as nanoadam


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)},
        "dense_bias": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
        "out": {"kernel": jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)},
    }


def _run(tx, params, steps=10):
    state = tx.init(params)
    update = jax.jit(tx.update)  # one compilation instead of eager per-op dispatch
    out = []
    for t in range(steps):
        g = jax.tree.map(lambda x: jnp.sin(x * (t + 1.0)) + 0.05 * t, params)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out


def _not_bias(p):
    return jax.tree.map(lambda x: x.ndim > 1, p)


CASES = {
    "mask-callable": dict(weight_decay=0.1, mask=_not_bias),
    "mask-prefix-tree": dict(
        weight_decay=0.1, mask={"dense": True, "dense_bias": False, "out": False}
    ),
    "schedule": dict(weight_decay=optax.linear_schedule(0.2, 0.0, 10)),
    "eps-root-nesterov": dict(weight_decay=0.05, eps_root=1e-6, nesterov=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_nanoadamw_density_one_is_optax_adamw(case):
    kw = CASES[case]
    ours = nanoadam.nanoadamw(1e-2, density=1.0, mask_interval=3, **kw)
    theirs = optax.adamw(1e-2, **kw)
    for u1, u2 in zip(_run(ours, _params()), _run(theirs, _params())):
        chex.assert_trees_all_close(u1, u2, rtol=1e-6, atol=1e-9)


def test_weight_decay_mask_is_applied_and_checked():
    params = _params()
    tx = nanoadam.nanoadamw(1e-2, density=0.5, weight_decay=1.0, mask=_not_bias)
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    assert float(jnp.abs(u["dense_bias"]).max()) == 0.0  # masked out: no decay
    assert float(jnp.abs(u["dense"]["kernel"]).max()) > 0.0  # decayed (selected entries)
    bad = nanoadam.nanoadamw(1e-2, weight_decay=1.0, mask={"dense": "yes"})
    with pytest.raises(ValueError, match="mask"):
        bad.update(zeros, bad.init(params), params)
