"""Pytree helpers shared by the transformations: leaf positions by label, trees built
from a few leaves, and the box-level structure of Flax parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["box_tree", "is_box", "positions", "require_params", "subtree", "zero_update"]


def positions(labels: list[str], label: str) -> list[int]:
    """Flat positions of the leaves with ``label``."""
    return [i for i, lab in enumerate(labels) if lab == label]


def subtree(treedef: Any, n_leaves: int, items: Sequence[tuple[int, Any]]) -> Any:
    """A tree with the given leaves at their positions and ``None`` elsewhere."""
    leaves: list[Any] = [None] * n_leaves
    for i, x in items:
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def is_box(x: Any) -> bool:
    """A metadata box around one array (``flax.nnx.Variable``, ``flax.linen.Partitioned``)."""
    return (hasattr(x, "get_metadata") and hasattr(x, "get_value")) or hasattr(x, "unbox")


def box_tree(params: Any) -> tuple[Any, list[Any]]:
    """``params``' structure and leaves with Flax metadata boxes (``nnx.Variable``,
    ``nn.Partitioned``) kept whole.

    The compact state's trees (``SparseUpdateState.selected``, the sparse inner state)
    are built on this structure, so they do not inherit e.g. a box's sharding names, and
    ``treedef.flatten_up_to(state.selected)`` lines up with the leaves.

    Example:
      >>> import jax.numpy as jnp
      >>> treedef, leaves = box_tree({"a": jnp.zeros(2), "b": jnp.ones(3)})
      >>> treedef.num_leaves, [x.shape for x in leaves]
      (2, [(2,), (3,)])
    """
    leaves, boxed = jax.tree.flatten(params, is_leaf=is_box)
    if len(leaves) != jax.tree.structure(params).num_leaves:
        return jax.tree.structure(params), jax.tree.leaves(params)
    return boxed, leaves


def zero_update(u: Any) -> Any:
    """A zero update shaped like ``u`` (``None`` and ``float0`` pass through)."""
    if u is None or getattr(u, "dtype", None) == jax.dtypes.float0:
        return u
    return jnp.zeros_like(u)


def require_params(params: Any, name: str) -> None:
    """Raise unless ``params`` were given (selection reads their magnitudes)."""
    if params is None:
        raise ValueError(
            f"{name} selects entries by the magnitude of the parameters: call "
            "`update(updates, state, params)` with the current parameters"
        )
