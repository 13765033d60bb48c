"""Printing NanoAdam's plan at the start of an example, and keeping its totals for the results.

Every example calls :func:`show_plan` with the parameters it is about to train and the selection
arguments of its NanoAdam optimizer (density, labels...), before the optimizer is created. It
prints :func:`nanoadam_jax.plan`'s per-leaf table (label, layer axes, chunking, entries trained,
state bytes against ``optax.adamw``) and returns the totals as a dict for the results JSON.
"""

from __future__ import annotations

import math
from typing import Any

import nanoadam_jax as nanoadam

__all__ = ["plan_summary", "show_plan"]


def plan_summary(plan: nanoadam.Plan) -> dict[str, Any]:
    """The totals of a :class:`nanoadam_jax.Plan`, JSON-ready.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"body": {"kernel": jax.ShapeDtypeStruct((100, 10), jnp.float32)},
      ...           "head": {"kernel": jax.ShapeDtypeStruct((10, 2), jnp.float32)}}
      >>> s = plan_summary(nanoadam.plan(params, density=0.1, show=False))
      >>> s["trained_entries"], s["total_entries"], s["sparse_leaves"], s["dense_leaves"]
      (120, 1020, 1, 1)
    """
    leaves = plan.leaves
    return {
        "state_bytes": int(plan.state_bytes),
        "adamw_bytes": int(plan.adamw_bytes),
        "state_vs_adamw": plan.state_bytes / plan.adamw_bytes if plan.adamw_bytes else None,
        "trained_entries": int(sum(leaf.trained for leaf in leaves)),
        "total_entries": int(sum(math.prod(leaf.shape) for leaf in leaves)),
        "sparse_leaves": sum(leaf.label == nanoadam.SPARSE for leaf in leaves),
        "dense_leaves": sum(leaf.label == nanoadam.DENSE for leaf in leaves),
        "frozen_leaves": sum(leaf.label == nanoadam.FROZEN for leaf in leaves),
        "notes": list(plan.notes),
    }


def show_plan(params: Any, title: str, **kwargs: Any) -> dict[str, Any]:
    """Print ``title`` and ``nanoadam.plan(params, **kwargs)``'s table; return its totals.

    ``kwargs`` are the optimizer's selection arguments (``density``, ``labels``,
    ``max_density``...), so that the table describes the optimizer the example runs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> params = {"w": jax.ShapeDtypeStruct((64,), jnp.float32)}
      >>> summary = show_plan(params, "Plan:", density=0.5)  # doctest: +ELLIPSIS
      <BLANKLINE>
      Plan:
      leaf ...
      optimizer state: ...x optax.adamw's
      ...
      >>> summary["trained_entries"]
      32
    """
    print(f"\n{title}")
    return plan_summary(nanoadam.plan(params, show=True, **kwargs))
