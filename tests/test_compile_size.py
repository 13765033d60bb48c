"""Compile size, deterministically: what the optimized program holds per leaf.

Timed compile ratios live in ``benchmarks/bench_compile.py`` and
``benchmarks/diag_compile.py``; here the structure of the optimized HLO is asserted, which
does not depend on the machine: same-shaped leaves share one selection program (its loops
do not multiply with the number of leaves), and each sparse leaf costs one scatter-add.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import nanoadam_jax as nanoadam


def _optimized_hlo(n_leaves: int, shape=(256, 256)) -> str:
    params = {f"layer_{i:03d}": {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}
              for i in range(n_leaves)}  # fmt: skip
    tx = nanoadam.nanoadam(1e-3, density=0.1, mask_interval=100)
    state = jax.eval_shape(tx.init, params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params)
    return lowered.compile().as_text()


def _count(op: str, text: str, result: str = r"\S+") -> int:
    """Instructions ``op`` in every computation (tuple-shaped results included)."""
    return len(re.findall(rf"= (?:{result}|\([^=]*\)) {op}\(", text))


@pytest.fixture(scope="module")
def programs():
    return {n: _optimized_hlo(n) for n in (8, 32)}


def test_same_shaped_leaves_share_one_selection_program(programs):
    loops = {n: _count("while", text) for n, text in programs.items()}
    assert loops[8] > 0
    assert loops[32] == loops[8], loops  # 4x the leaves, the same selection loops


def test_one_refresh_conditional_and_one_update_scatter_per_sparse_leaf(programs):
    extra = set()
    for n, text in programs.items():
        assert _count("conditional", text) == 1, n
        # The update: one float32 scatter-add per leaf (into the leaf on one device, into
        # its chunk view on several; the selection's scatters are integer).
        leaf_scatters = _count("scatter", text, result=r"f32\[[0-9,]+\]\{[0-9,]+\}")
        assert leaf_scatters == n, (n, leaf_scatters)
        extra.add(_count("scatter", text) - leaf_scatters)
    assert len(extra) == 1, extra  # the selection's own scatters do not grow with the leaves
