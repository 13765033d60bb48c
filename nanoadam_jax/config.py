"""The selection arguments, validated once: :class:`SelectionConfig`, and the per-leaf
layouts it decides (:func:`init_layouts` at ``init``, :func:`stored_layouts` at
``update``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nanoadam_jax import _checks, layout, schedules, selection
from nanoadam_jax._sharding import known_sharding
from nanoadam_jax._tree import box_tree
from nanoadam_jax.labels import Labels, num_positional
from nanoadam_jax.layout import LeafLayout, SelectionDimensionNumbers

__all__ = [
    "SCOPES",
    "SELECTION_ARGS",
    "Density",
    "DimensionNumbers",
    "SelectionConfig",
    "init_layouts",
    "selection_args",
    "stored_layouts",
]

#: Accepted values of ``scope``: ``k`` per chunk (default; the paper's code), per layer of
#: a leaf (exact per-tensor ``k``), or one threshold over all sparse leaves.
SCOPES = ("chunk", "leaf", "global")

Density = float | jax.Array | Callable[[jax.Array], jax.Array]
#: The selection arguments every selecting factory takes (the fields of SelectionConfig).
SELECTION_ARGS = (
    "density",
    "mask_interval",
    "scope",
    "chunk_size",
    "criterion",
    "labels",
    "seed",
    "max_density",
    "dimension_numbers",
    "layer_axis_names",
)


def selection_args(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """The selection arguments among a factory's ``locals()``, by name: how the factories
    hand their (documented, spelled-out) keywords on without writing them out again.

    Example:
      >>> selection_args({"density": 0.1, "learning_rate": 1e-3})
      {'density': 0.1}
    """
    return {k: namespace[k] for k in SELECTION_ARGS if k in namespace}


DimensionNumbers = layout.DimensionNumbers


class SelectionConfig:
    """The selection arguments, validated once, and the per-leaf decisions built on them.

    Built by keyword by every factory (:func:`~nanoadam_jax.sparse_update`, the masking
    transformations) and by :func:`~nanoadam_jax.plan`, so they validate and decide alike.
    Each argument is documented on :func:`~nanoadam_jax.sparse_update`.

    Example:
      >>> from nanoadam_jax.config import SelectionConfig
      >>> SelectionConfig(density=0.1).scope
      'chunk'
    """

    def __init__(
        self,
        *,
        density: Density,
        mask_interval: Any = 100,
        scope: str = "chunk",
        chunk_size: Any = None,
        criterion: str = "smallest",
        labels: Labels = None,
        seed: Any = 0,
        max_density: Any = None,
        dimension_numbers: DimensionNumbers = None,
        layer_axis_names: Sequence[str] = layout.LAYER_AXIS_NAMES,
    ):
        _checks.check_positive_int("mask_interval", mask_interval)
        if scope == "block":
            raise ValueError(
                "`scope`='block' was replaced by the default scope='chunk' (exactly k per "
                "chunk of `chunk_size` entries); pass chunk_size=... to set the length"
            )
        _checks.check_choice("scope", scope, SCOPES)
        if scope != "chunk" and chunk_size is not None:
            raise ValueError(f"`chunk_size` applies to scope='chunk' only, got scope={scope!r}")
        _checks.check_choice("criterion", criterion, selection.CRITERIA)
        if chunk_size is not None and _checks.is_concrete(chunk_size):
            chunk_size = _checks.check_static_positive_int("chunk_size", chunk_size)
        # (A traced chunk_size is refused at init, where it would size the state; update
        # reads the chunking from the state.)
        if max_density is not None and _checks.is_concrete(max_density):
            _checks.check_density("max_density", max_density)
            max_density = float(np.asarray(max_density))
        if isinstance(seed, bool) or (
            _checks.is_concrete(seed) and not np.issubdtype(np.asarray(seed).dtype, np.integer)
        ):
            raise ValueError(f"`seed` must be an integer, got {seed!r}")
        if (
            layer_axis_names is None
            or isinstance(layer_axis_names, str)
            or not hasattr(layer_axis_names, "__iter__")
        ) or not all(isinstance(n, str) for n in layer_axis_names):
            raise ValueError(
                f"`layer_axis_names` must be a sequence of axis names, got {layer_axis_names!r}"
            )
        if callable(density):
            self.density_fn = lambda step: jnp.asarray(density(step), jnp.float32)
        else:
            _checks.check_density("density", density)
            self.density_fn = lambda step: jnp.asarray(density, jnp.float32)
        self.density = density
        self.max_density = max_density
        self.mask_interval = mask_interval
        self.scope = scope
        self.chunk_size = chunk_size
        self.criterion = criterion
        self.labels = labels
        self.seed = seed
        self.dimension_numbers = dimension_numbers
        self.layer_axis_names = tuple(layer_axis_names)

    # -- sizing (init) ----------------------------------------------------------------

    def init_max_density(self) -> float:
        """The largest density the state must hold, decided at ``init``."""
        if self.chunk_size is not None and not _checks.is_concrete(self.chunk_size):
            raise ValueError(
                "`chunk_size` is traced when the state is created (it sizes the state): "
                "with optax.inject_hyperparams pass static_args=('chunk_size',)"
            )
        given = self.max_density
        if given is not None and not _checks.is_concrete(given):
            raise ValueError(
                "`max_density` is traced at init: it must be a number known when the "
                "state is created (it sizes the state). Under jax.jit of "
                "optax.inject_hyperparams(...).init, keep it static: "
                "optax.inject_hyperparams(nanoadam.nanoadam, static_args=('max_density',))"
            )
        density = self.density
        if callable(density):
            largest = schedules.schedule_max(density)
        elif _checks.is_concrete(density):
            largest = float(np.asarray(density))
        elif given is None:
            raise ValueError(
                "`density` is traced when the optimizer state is created, so the state "
                "cannot be sized from it. This happens with init under jax.vmap over "
                "densities, and with jax.jit(optax.inject_hyperparams(nanoadam.nanoadam)"
                "(..., density=0.1).init), where optax turns the density into a traced "
                "array. Either pass `max_density` (a Python float, the largest density "
                "the run will use; with inject_hyperparams also "
                "static_args=('max_density',)), or keep the density static: "
                "optax.inject_hyperparams(nanoadam.nanoadam, static_args=('density',))"
            )
        else:
            largest = given
        if given is not None:
            if largest > given + 1e-7:
                raise ValueError(
                    f"`max_density`={given} is below the density's largest value {largest}"
                )
            largest = given
        return largest

    def batch_axes(self, params: Any, boxes: list[Any], at_init: bool) -> list[tuple[int, ...]]:
        """The layer axes of every leaf: declared, else (at init) from Flax metadata."""
        leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
        dims = self.dimension_numbers
        if dims is None:
            declared = [None] * len(leaves_with_path)
        elif isinstance(dims, SelectionDimensionNumbers):
            declared = [dims] * len(leaves_with_path)
        elif callable(dims) and num_positional(dims) == 2:
            declared = [dims(path, leaf) for path, leaf in leaves_with_path]
        else:
            tree = dims(params) if callable(dims) else dims
            try:
                declared = treedef.flatten_up_to(tree)
            except (ValueError, TypeError) as e:
                raise ValueError(
                    "`dimension_numbers` must be a SelectionDimensionNumbers, a tree of them "
                    f"(None for the default) with the structure of the parameters, or a "
                    f"callable returning one; {e}"
                ) from e
        out = []
        for (path, leaf), dn, box in zip(leaves_with_path, declared, boxes):
            ndim = len(leaf.shape)
            where = jax.tree_util.keystr(path)
            if dn is not None:
                if not isinstance(dn, SelectionDimensionNumbers):
                    raise ValueError(
                        f"`dimension_numbers` for {where} must be a "
                        f"SelectionDimensionNumbers or None, got {dn!r}"
                    )
                try:
                    axes = {int(a) % ndim for a in dn.axes} if ndim else set()
                except (TypeError, ZeroDivisionError) as e:
                    raise ValueError(f"bad `dimension_numbers` for {where}: {dn!r}") from e
                if any(not -ndim <= int(a) < ndim for a in dn.axes) or not axes:
                    raise ValueError(
                        f"`dimension_numbers` for {where} (shape {tuple(leaf.shape)}) must "
                        f"name at least one valid axis, got {dn!r}"
                    )
                out.append(tuple(a for a in range(ndim) if a not in axes))
                continue
            found = layout.layer_axes_from_metadata(box, self.layer_axis_names) if at_init else ()
            if found and found != tuple(range(len(found))):
                raise ValueError(
                    f"{where}: the layer axes {found} found in its metadata are not the leading "
                    "axes; declare them with `dimension_numbers` (SelectionDimensionNumbers)"
                )
            out.append(found)
        return out

    def key(self, step: jax.Array, seed: Any) -> jax.Array | None:
        if self.criterion != "random":
            return None
        return jax.random.fold_in(jax.random.PRNGKey(seed), step)

    def padded(self) -> bool:
        """True when fewer than ``capacity`` entries may be selected (padding slots): the
        density is not one fixed number that sized the state."""
        return not (isinstance(self.density, (int, float)) and self.max_density is None)

    def chunk_k(self, lay: LeafLayout, density: jax.Array) -> Any:
        """Entries selected per chunk: the rounding rule, capped at the capacity."""
        if not self.padded():
            return lay.capacity  # static: the capacity is exactly k
        k = selection.num_selected(lay.chunk, density)
        return jnp.minimum(k, jnp.int32(lay.capacity))


def init_layouts(config: SelectionConfig, params: Any, sparse: list[int]) -> dict[int, LeafLayout]:
    """Per sparse leaf (by flat position in ``jax.tree.leaves(params)``), its layout
    decided from shapes, Flax metadata and known shardings (at ``init``)."""
    _, boxes = box_tree(params)
    leaves_with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    axes = config.batch_axes(params, boxes, at_init=True)
    max_density = config.init_max_density()
    out = {}
    for i in sparse:
        path, p = leaves_with_path[i]
        out[i] = layout.leaf_layout(
            p.shape,
            batch_axes=axes[i],
            scope=config.scope,
            chunk_size=config.chunk_size,
            max_density=max_density,
            sharding=known_sharding(p),
            path=jax.tree_util.keystr(path),
        )
    return out


def stored_layouts(
    config: SelectionConfig, params: Any, sparse: list[int], stored: list[Any]
) -> dict[int, LeafLayout]:
    """Per sparse leaf, its layout read back from its stored positions (``stored``, one per
    leaf), as ``update`` must: the parameters it sees may carry no metadata or sharding."""
    _, boxes = box_tree(params)
    leaves = jax.tree.leaves(params)
    axes = config.batch_axes(params, boxes, at_init=False)
    return {
        i: layout.layout_from_state(leaves[i].shape, axes[i], stored[i].shape, stored[i].dtype)
        for i in sparse
    }
