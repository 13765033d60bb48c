"""Work-arounds that let the benchmarks run on library versions with known problems.

Each work-around is applied only when a probe shows that the problem is present, and is
recorded (in the results' ``machine.library_workarounds``) so that a reader knows what was
measured. None changes what the optimizer computes.

1. ``sparse_update(state_layout="compact")`` sizes its buffers with
   ``int(selection.num_selected(...))`` inside ``update``. ``num_selected`` uses ``jnp``
   ops, which are staged out under ``jax.jit`` even on constant inputs, so ``int()`` of
   the result raises ``ConcretizationTypeError``: ``nanoadam(...).update`` cannot be
   jitted. The work-around evaluates that static size under
   ``jax.ensure_compile_time_eval()`` (the value is the same).
2. ``select_mask(..., method="top_k")`` needs a concrete ``k``, but computes it with
   ``jnp`` ops, so it fails under ``jax.jit``. The selection benchmark therefore traces
   every method (not only ``top_k``, for a fair comparison) inside
   ``jax.ensure_compile_time_eval()``, which folds ``k`` to a constant.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import nanoadam_jax as nanoadam
from nanoadam_jax import transform as _transform

_APPLIED: list[str] = []


def _compact_update_jits() -> bool:
    params = {"w": jnp.ones((4, 4), jnp.float32)}
    tx = nanoadam.nanoadam(1e-3, density=0.5, mask_interval=10)
    state = tx.init(params)
    try:
        jax.eval_shape(lambda p, s: tx.update(p, s, p), params, state)
    except jax.errors.ConcretizationTypeError:
        return False
    return True


def _top_k_jits() -> bool:
    try:
        jax.eval_shape(lambda x: nanoadam.select_mask(x, 0.5, method="top_k"), jnp.ones((8,)))
    except (ValueError, jax.errors.ConcretizationTypeError):
        return False
    return True


def apply() -> list[str]:
    """Apply the needed work-arounds (once) and describe them."""
    if _APPLIED:
        return list(_APPLIED)
    if not _compact_update_jits():
        original = _transform._Selector.layout

        def layout(self, n):
            with jax.ensure_compile_time_eval():
                return original(self, n)

        _transform._Selector.layout = layout
        if not _compact_update_jits():  # pragma: no cover - a different problem
            raise RuntimeError("nanoadam(...).update still cannot be jitted")
        _APPLIED.append(
            "transform._Selector.layout evaluated under jax.ensure_compile_time_eval() "
            "(compact buffers could not be sized under jax.jit)"
        )
    if not _top_k_jits():
        _APPLIED.append(
            "select_mask traced under jax.ensure_compile_time_eval() in the selection "
            "benchmark (method='top_k' needs a concrete k under jax.jit)"
        )
    if not _APPLIED:
        _APPLIED.append("none")
    return list(_APPLIED)
