"""Which leaves are sparse (masked), dense (fully updated) or frozen (never updated).

The paper selects small weights inside every weight tensor except the final
classifier / language-model head and the normalisation layers, which it updates
densely (not frozen). :func:`default_labels` does that on common Flax models by
name; pass your own ``labels`` to any transformation to change it.

``labels`` may be:

* ``None``: use :func:`default_labels`;
* a callable ``(path, leaf) -> label`` (``path`` is a ``jax.tree_util`` key path);
* a pytree of labels with the structure of the parameters (like
  ``optax.multi_transform``'s ``param_labels``), or a callable ``params -> pytree``.

Labels are the strings :data:`SPARSE`, :data:`DENSE` and :data:`FROZEN`. Leaves
that are not floating point (integer counters, booleans) are always frozen: their
update is zero. Complex leaves are refused (selection by magnitude of a complex
number is not defined by the paper).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = [
    "DENSE",
    "DENSE_NAMES",
    "FROZEN",
    "LABELS",
    "SPARSE",
    "default_labels",
    "label_params",
    "path_names",
]

SPARSE = "sparse"
DENSE = "dense"
FROZEN = "frozen"
LABELS = (SPARSE, DENSE, FROZEN)

#: Path components (lower-cased, compared as substrings of each component) whose
#: leaves :func:`default_labels` updates densely: output heads and normalisation.
DENSE_NAMES = ("head", "classifier", "norm", "ln_", "logits")

Labels = None | Callable[..., Any] | Any


def path_names(path: tuple[Any, ...]) -> list[str]:
    """The components of a key path as lower-case strings.

    Example:
      >>> import jax, nanoadam_jax as nanoadam
      >>> path = jax.tree_util.tree_flatten_with_path({"Dense_0": {"kernel": 1.0}})[0][0][0]
      >>> nanoadam.path_names(path)
      ['dense_0', 'kernel']
    """
    out = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                out.append(str(getattr(p, attr)).lower())
                break
        else:
            out.append(str(p).lower())
    return out


def _is_norm_or_head(name: str) -> bool:
    if name in ("ln", "lm_head"):
        return True
    return any(part in name for part in DENSE_NAMES)


def default_labels(path: tuple[Any, ...], leaf: Any) -> str:
    """The paper's choice on common Flax (NNX and Linen) models.

    * non-floating-point leaves: ``"frozen"``;
    * a leaf whose path has a component containing ``head``, ``classifier``,
      ``norm`` (``LayerNorm_0``, ``attention_norm``, ``BatchNorm``, ``RMSNorm``...),
      ``logits`` or ``ln_``, or equal to ``ln``: ``"dense"``;
    * everything else (kernels, embeddings, biases, convolutions): ``"sparse"``.

    Biases and embeddings are sparse: the paper's rule covers "every other weight
    tensor" and does not discuss them. A Linen model's last ``Dense_3`` cannot be
    recognised by name: name the head (``nn.Dense(..., name="head")``) or pass a
    predicate.

    Example:
      >>> import jax, jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> params = {"encoder": {"kernel": jnp.ones((2, 2))}, "head": {"kernel": jnp.ones((2, 1))}}
      >>> jax.tree.leaves(nanoadam.label_params(params))
      ['sparse', 'dense']

    Args:
      path: the leaf's key path.
      leaf: the leaf (array or ``jax.ShapeDtypeStruct``).

    Returns:
      One of :data:`LABELS`.
    """
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
        return FROZEN
    if any(_is_norm_or_head(name) for name in path_names(path)):
        return DENSE
    return SPARSE


def label_params(params: Any, labels: Labels = None) -> Any:
    """A pytree of labels (``"sparse"``, ``"dense"``, ``"frozen"``) for ``params``.

    Uses only shapes and dtypes, so it works on ``jax.ShapeDtypeStruct`` trees.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> params = {"w": jnp.ones((3, 3)), "step": jnp.zeros((), jnp.int32)}
      >>> nanoadam.label_params(params)
      {'step': 'frozen', 'w': 'sparse'}

    Args:
      params: the parameter pytree.
      labels: see the module docstring.

    Returns:
      A pytree of strings with the structure of ``params``.

    Raises:
      ValueError: a label is not one of :data:`LABELS`, the label tree does not
        match ``params``, or a leaf is complex.
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    if labels is None:
        labels = default_labels
    if callable(labels) and _num_positional(labels) == 1:
        out = _flatten_labels(labels(params), treedef)
    elif callable(labels):
        out = [labels(path, leaf) for path, leaf in leaves_with_path]
    else:
        out = _flatten_labels(labels, treedef)
    for (path, leaf), label in zip(leaves_with_path, out):
        if label not in LABELS:
            raise ValueError(
                f"labels must return one of {LABELS}; got {label!r} for the leaf at "
                f"{jax.tree_util.keystr(path)}"
            )
        if jnp.issubdtype(leaf.dtype, jnp.complexfloating):
            raise ValueError(
                f"complex parameters are not supported (leaf at {jax.tree_util.keystr(path)} "
                f"has dtype {leaf.dtype}), whatever their label: split them into real and "
                "imaginary parts, or keep them out of the optimizer (e.g. optax.masked)"
            )
    # Non-float leaves are never updated, whatever the predicate said.
    out = [
        label if jnp.issubdtype(leaf.dtype, jnp.floating) else FROZEN
        for (_, leaf), label in zip(leaves_with_path, out)
    ]
    return jax.tree_util.tree_unflatten(treedef, out)


def _num_positional(fn: Callable[..., Any]) -> int:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values()):
        return 2
    return sum(p.kind in kinds for p in sig.parameters.values())


def _flatten_labels(tree: Any, treedef: Any) -> list[Any]:
    try:
        return treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"the `labels` tree must have the structure of the parameters ({treedef}); {e}"
        ) from e
