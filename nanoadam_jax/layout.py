"""The compact state layout: how a sparse leaf is cut into chunks and rows of state.

NanoAdam selects the ``k`` smallest weights **per chunk** of each weight matrix, as the
paper's code does (Zhou et al. 2025, Sec. 6 / App. G: "flatten the matrix and divide it
into subgroups (chunks), then apply bottom-k selection within each subgroup"; the chunk
size follows MicroAdam, Modoranu et al. 2024). This module decides, from a leaf's shape
alone, how it is cut:

* **Layer axes.** Leading axes of a stacked (scanned) tensor are *batch* axes: each
  layer is selected on its own. They are found from Flax metadata (an axis named
  ``"layers"`` by ``nnx.vmap``/``nnx.scan(transform_metadata=...)`` or ``nn.scan
  (metadata_params=...)``; the recognised names are configurable), or declared per leaf
  with :class:`SelectionDimensionNumbers` (optax's ``MuonDimensionNumbers`` convention:
  the axes *not* named are batch axes).
* **Chunks.** A layer's matrix, flattened row-major, is cut into equal chunks of ``C``
  consecutive entries, ``C <= chunk_size``: the trailing axes that fit whole, times a
  divisor of the next axis that still fits (:func:`chunk_length`). A chunk never
  crosses a layer, and each chunk's positions fit in ``uint16``.
* **The same on every mesh.** When the first axis of the matrix is the one divided,
  the divisor is one that keeps every chunk inside one shard for *every* even split of
  that axis over up to :data:`MESH_DEVICES` (16) devices (FSDP), when such a divisor
  gives chunks of at least ``chunk_size / 16`` entries. So the state's shape, the
  selection and the updates are the same on one device and on any such mesh, and a
  checkpoint moves between them as is (:func:`fsdp_invariant` tells, per matrix;
  :func:`~nanoadam_jax.plan` shows it). A 384x384 kernel is cut into chunks of 8 rows
  (3,072 entries), a 768x3072 one into chunks of 4 rows (12,288 entries).
* **State rows.** A leaf's compact state is one row of ``capacity`` slots per chunk,
  shaped ``(*layer_axes, *chunk_grid, capacity)``; the chunk grid keeps the leaf's leading
  axes, so a parameter sharded along those axes has its state sharded the same way (see
  :func:`leaf_layout`: the chunk length is halved until every chunk lies on one shard).

``DEFAULT_CHUNK_SIZE`` (16384): measured with ``python benchmarks/run.py --sections chunk``
(2-core CPU, 16.8M parameters, d=0.1; ``benchmarks/results/results.md``), chunks of 1024,
4096 and 16384 entries cost the same ordinary step (1.37-1.39x an AdamW step there) and the
same refresh (16-17 AdamW steps), while 65536 needs ``int32`` positions (state 0.15x instead
of 0.125x AdamW's) and refreshes slower. Among the equal ones the largest keeps ``k`` per
chunk closest to the exact per-tensor ``k`` (rounding error at most 0.5 / 16384 of the
density) and sits in the range of the paper's chunks (about 20-29k entries on A100/H100).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nanoadam_jax import selection
from nanoadam_jax._rows import mode as _mode
from nanoadam_jax._sharding import explicit_sharding, known_sharding

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "LAYER_AXIS_NAMES",
    "LeafLayout",
    "SelectionDimensionNumbers",
    "chunk_length",
    "fsdp_invariant",
    "leaf_layout",
    "select_mask",
    "selection_mask",
    "state_array",
]

#: Default target chunk length (entries); see the module docstring for the measurement.
DEFAULT_CHUNK_SIZE = 16384
#: Axis names that mark a stacked-layer axis in Flax sharding metadata.
LAYER_AXIS_NAMES = ("layers",)
#: A chunk shorter than ``target // _MIN_FRACTION`` (an awkward axis length) is not used;
#: the whole axis (and the axes after it) becomes the chunk instead.
_MIN_FRACTION = 16
#: The chunking is chosen to be the same on one device and on a mesh that splits the
#: chunked axis evenly over up to this many devices (see :func:`_split_point`).
MESH_DEVICES = 16
_UINT16_MAX = 0xFFFF
_INT32_MAX = 2**31 - 1


class SelectionDimensionNumbers(NamedTuple):
    """Which axes of a leaf form one weight matrix (selected on its own).

    The axes *not* listed are batch axes (stacked layers, experts...): every index of
    them is selected independently, with its own ``k``. This follows optax's
    ``optax.contrib.MuonDimensionNumbers`` convention (unnamed axes are batch axes).

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> # a (layers, d_in, d_out) kernel: one selection per layer
      >>> nanoadam.SelectionDimensionNumbers(axes=(1, 2))
      SelectionDimensionNumbers(axes=(1, 2))

    Attributes:
      axes: the selection axes (negative values count from the end).
    """

    axes: Sequence[int] = ()


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How one sparse leaf is selected and stored (static; computed from its shape).

    Attributes:
      shape: the leaf's shape.
      batch_axes: the layer (batch) axes, each selected independently.
      chunk: entries per chunk ``C``.
      grid: the state's leading shape: batch axis sizes, then the chunk grid.
      capacity: state slots per chunk (``k`` of the largest density the run uses).
      index_dtype: dtype of the stored positions (``uint16`` when ``C < 65536``).
      spec: the state rows' ``PartitionSpec`` entries (one per ``grid`` axis) when the
        leaf's sharding is known, else None.
    """

    shape: tuple[int, ...]
    batch_axes: tuple[int, ...]
    chunk: int
    grid: tuple[int, ...]
    capacity: int
    index_dtype: Any
    spec: tuple[Any, ...] | None = None

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def chunks(self) -> int:
        return math.prod(self.grid)

    @property
    def state_shape(self) -> tuple[int, ...]:
        return (*self.grid, self.capacity)

    @property
    def permutation(self) -> tuple[int, ...] | None:
        """Axis order that puts the batch axes first (None when they already are)."""
        rest = [a for a in range(len(self.shape)) if a not in self.batch_axes]
        perm = (*self.batch_axes, *rest)
        return None if perm == tuple(range(len(self.shape))) else perm

    def view_spec(self, spec: Sequence[Any]) -> tuple[Any, ...] | None:
        """The view's ``PartitionSpec`` entries for a leaf sharded as ``spec``, or None if
        its chunks are split across shards (then the view is replicated)."""
        full = tuple(spec) + (None,) * (len(self.shape) - len(spec))
        bspec = tuple(full[a] for a in self.batch_axes)
        mspec = tuple(full[a] for a in range(len(self.shape)) if a not in self.batch_axes)
        j = len(self.grid) - len(self.batch_axes) - 1
        if any(e is not None for e in mspec[j + 1 :]):
            return None
        return (*bspec, *mspec[: j + 1], None)

    def view(self, x: jax.Array) -> jax.Array:
        """``x`` as ``(*grid, chunk)``: one row per chunk."""
        if self.permutation is not None:
            x = jnp.transpose(x, self.permutation)
        return jax.lax.reshape(x, (*self.grid, self.chunk), out_sharding=_explicit(x, self))

    def unview(self, v: jax.Array, like: jax.Array | None = None) -> jax.Array:
        """Inverse of :meth:`view` (``like``: the parameter, for its explicit sharding)."""
        perm = self.permutation
        shape = self.shape if perm is None else tuple(self.shape[a] for a in perm)
        sharding = None
        if like is not None:
            sharding = explicit_sharding(like)
            if sharding is not None and perm is not None:
                spec = tuple(sharding.spec) + (None,) * (len(self.shape) - len(sharding.spec))
                sharding = jax.sharding.NamedSharding(
                    sharding.mesh, jax.sharding.PartitionSpec(*(spec[a] for a in perm))
                )
        x = jax.lax.reshape(v, shape, out_sharding=sharding)
        return x if perm is None else jnp.transpose(x, np.argsort(perm))


def _explicit(x: jax.Array, lay: LeafLayout) -> Any:
    """The view's sharding under explicit sharding (None otherwise)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        return None
    spec = tuple(sharding.spec)
    if lay.permutation is not None:  # x is already transposed: map back to leaf axes
        spec = tuple(spec[list(lay.permutation).index(a)] for a in range(len(spec)))
    view = lay.view_spec(spec)
    entries = view if view is not None else (None,) * (len(lay.grid) + 1)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*entries))


def leaf_coords(lay: LeafLayout, pos: jax.Array, padded: bool) -> jax.Array:
    """Leaf coordinates of the chunk positions ``pos``: int32 ``(*grid, capacity, ndim)``.

    Computed with divisions by the static axis lengths (no index normalisation), so the
    gather and the scatter that use them compile to small kernels. Padding positions
    (``== chunk``) get an out-of-range first coordinate.
    """
    row = jnp.arange(math.prod(lay.grid), dtype=jnp.int32).reshape((*lay.grid, 1))
    p32 = pos.astype(jnp.int32)
    flat = row * jnp.int32(lay.chunk) + p32
    perm = lay.permutation
    order = tuple(range(len(lay.shape))) if perm is None else perm
    coords: list[Any] = [None] * len(lay.shape)
    rest = flat
    for axis in reversed(order[1:]):
        size = jnp.int32(lay.shape[axis])
        coords[axis] = rest % size
        rest = rest // size
    coords[order[0]] = rest
    if padded:
        coords[0] = jnp.where(p32 < lay.chunk, coords[0], jnp.int32(lay.shape[0]))
    return jnp.stack(coords, axis=-1)


def _point_dnums(ndim: int) -> tuple[Any, Any]:
    axes = tuple(range(ndim))
    gather = jax.lax.GatherDimensionNumbers(
        offset_dims=(), collapsed_slice_dims=axes, start_index_map=axes
    )
    scatter = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=axes, scatter_dims_to_operand_dims=axes
    )
    return gather, scatter


def take_coords(lay: LeafLayout, x: jax.Array, coords: jax.Array, padded: bool) -> jax.Array:
    """``x`` at ``coords`` (see :func:`leaf_coords`); padding reads zero."""
    dnums, _ = _point_dnums(x.ndim)
    return jax.lax.gather(
        x,
        coords,
        dnums,
        slice_sizes=(1,) * x.ndim,
        indices_are_sorted=lay.permutation is None,
        unique_indices=not padded,
        mode=_mode(padded, jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS),
        fill_value=0,
    )


def scatter_into_zeros(
    lay: LeafLayout, like: jax.Array, coords: jax.Array, values: jax.Array, padded: bool
) -> jax.Array:
    """Zeros shaped like ``like`` with ``values`` added at ``coords``.

    Indexes the leaf's own axes, so that XLA fuses ``params + result`` into an in-place
    scatter-add into the parameters. Padding positions are dropped.
    """
    _, dnums = _point_dnums(like.ndim)
    return jax.lax.scatter_add(
        jnp.zeros_like(like),
        coords,
        values.astype(like.dtype),
        dnums,
        indices_are_sorted=lay.permutation is None,
        unique_indices=not padded,
        mode=_mode(padded, jax.lax.GatherScatterMode.PROMISE_IN_BOUNDS),
    )


def _divisors(s: int) -> list[int]:
    """The divisors of ``s``, largest first."""
    small = [d for d in range(1, math.isqrt(s) + 1) if s % d == 0]
    return sorted({*small, *(s // d for d in small)}, reverse=True)


def _divisors_up_to(s: int, limit: int) -> int:
    """The largest divisor of ``s`` that is ``<= limit`` (at least 1)."""
    return next((d for d in _divisors(s) if d <= limit), 1)


def shard_counts(s: int) -> list[int]:
    """The device counts ``D <= MESH_DEVICES`` that split an axis of length ``s`` evenly."""
    return [d for d in range(1, MESH_DEVICES + 1) if s % d == 0]


def _split_point(shape: Sequence[int], target: int) -> tuple[int, int]:
    """``(j, C)``: chunks of ``C`` entries are a divisor ``C / P`` of axis ``j`` times the
    product ``P`` of the axes after ``j`` (``j = -1``: the whole shape is one chunk).

    When ``j`` is the first axis, the divisor is taken, when one is long enough, among
    those of ``s / L`` with ``L`` the least common multiple of :func:`shard_counts` of
    ``s``: then a chunk never crosses a shard when the first axis is split over any of
    those device counts (FSDP), so the chunking is the same on one device and on every
    such mesh."""
    n = math.prod(shape)
    if n <= target:
        return -1, n
    p = 1
    for j in range(len(shape) - 1, -1, -1):
        s = shape[j]
        if p * s <= target:
            p *= s
            continue
        shortest = max(1, target // _MIN_FRACTION)
        # FSDP splits the first axis: only there does the divisor choose between meshes.
        robust = s // math.lcm(*shard_counts(s)) if j == 0 else s
        c = _divisors_up_to(robust, target // p) * p
        if c < shortest:
            c = _divisors_up_to(s, target // p) * p  # no mesh-robust chunk long enough
        if c < shortest:
            c = s * p  # an awkward length: take the whole axis
        return j, c
    raise AssertionError("unreachable")  # pragma: no cover


def fsdp_invariant(shape: Sequence[int], chunk: int) -> bool:
    """True when chunks of ``chunk`` entries of a matrix of ``shape`` lie within shards
    for every even split of its first axis over ``D <= MESH_DEVICES`` devices (FSDP): the
    layout is then the same on one device and on every such mesh.

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> nanoadam.layout.fsdp_invariant((384, 384), nanoadam.layout.chunk_length((384, 384)))
      True
    """
    shape = tuple(int(s) for s in shape)
    if not shape or math.prod(shape) == 0:
        return True
    rows_per_chunk = chunk / math.prod(shape[1:])  # < 1: chunks inside one row
    if rows_per_chunk <= 1:
        return True
    return all((shape[0] // d) % int(rows_per_chunk) == 0 for d in shard_counts(shape[0]))


def chunk_length(shape: Sequence[int], target: int = DEFAULT_CHUNK_SIZE) -> int:
    """Entries per chunk for a weight matrix of ``shape`` (one layer) and a target length.

    The whole matrix if it has at most ``target`` entries; otherwise the trailing axes
    that fit whole times the largest divisor of the next axis that keeps the chunk
    ``<= target``; when that axis is the first one, the largest such divisor of
    ``s / L`` (``L``: the least common multiple of the device counts up to 16 that divide
    the axis length ``s``), so that the chunking is the same on every FSDP mesh, unless
    that gives chunks below ``target / 16``. If the chunk is still below ``target / 16``
    (an axis length with no useful divisor, e.g. a prime), the whole axis and the axes
    after it form the chunk. So every chunk of a matrix has the same length and consists
    of whole trailing sub-rows.

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> nanoadam.layout.chunk_length((4096, 1024)), nanoadam.layout.chunk_length((300, 20))
      (16384, 6000)
      >>> nanoadam.layout.chunk_length((384, 384))  # 8 rows: 384 / 8 is a multiple of 48
      3072

    Args:
      shape: the shape of one weight matrix (no layer axes).
      target: the largest chunk length wanted (positive int).

    Returns:
      The chunk length ``C``; it divides ``prod(shape)``.
    """
    return _split_point(tuple(int(s) for s in shape), int(target))[1]


def _grid(shape: tuple[int, ...], j: int, c: int) -> tuple[int, ...]:
    """Chunk-grid shape: the axes before ``j``, then axis ``j`` divided by its chunk part."""
    if j < 0:
        return ()
    rest = math.prod(shape[j + 1 :])
    return (*shape[:j], shape[j] * rest // c)


def _mesh_axis_size(mesh: Any, entry: Any) -> int:
    if entry is None:
        return 1
    names = entry if isinstance(entry, tuple) else (entry,)
    return math.prod(mesh.shape[name] for name in names)


def _aligned_spec(
    matrix_shape: tuple[int, ...], j: int, c: int, spec: tuple[Any, ...], mesh: Any
) -> tuple[Any, ...] | None:
    """The chunk grid's spec entries when every chunk lies on one shard, else None."""
    split = [e is not None and _mesh_axis_size(mesh, e) > 1 for e in spec]
    if j < 0:
        # One chunk per matrix: aligned only if the matrix itself is not split.
        return () if not any(split) else None
    if any(split[j + 1 :]):
        return None
    grid = _grid(matrix_shape, j, c)
    if grid[-1] % _mesh_axis_size(mesh, spec[j]):
        return None
    return tuple(spec[: j + 1])


def _shard_split(
    matrix: tuple[int, ...], target: int, mspec: tuple[Any, ...], mesh: Any, where: str
) -> tuple[int, int]:
    """``(j, C)`` for a matrix whose sharding the one-device chunking does not fit (a later
    axis split, e.g. tensor-parallel, or a matrix small enough to be one chunk): the
    longest chunking of the one-device rule, for a smaller target, whose chunks lie inside
    the shards. So ``chunk_size=`` that target on one device reproduces it."""
    a = max(i for i, e in enumerate(mspec) if e is not None and _mesh_axis_size(mesh, e) > 1)
    devices = _mesh_axis_size(mesh, mspec[a])
    if matrix[a] % devices:
        raise ValueError(
            f"{where}: no chunking keeps each chunk on one shard (axis length "
            f"{matrix[a]} over {devices} devices). Shard it along axes whose length divides "
            "evenly, mark its layer axes (SelectionDimensionNumbers), or label it 'dense'."
        )
    p = math.prod(matrix[a + 1 :])
    for r in _divisors(matrix[a] // devices):
        if r * p > target:
            continue
        j, c = _split_point(matrix, r * p)
        if _aligned_spec(matrix, j, c, mspec, mesh) is not None:
            return j, c
    raise AssertionError("unreachable: one entry per chunk always fits")  # pragma: no cover


def leaf_layout(
    shape: Sequence[int],
    *,
    batch_axes: Sequence[int] = (),
    scope: str = "chunk",
    chunk_size: int | None = None,
    max_density: float = 1.0,
    sharding: Any = None,
    path: str = "",
) -> LeafLayout:
    """The layout of one sparse leaf (see the module docstring).

    With a known ``NamedSharding`` (a concrete array's, a ``ShapeDtypeStruct``'s), the
    state rows are sharded exactly like the parameter rows they index; the state then
    carries that ``spec``. The one-device chunking already keeps chunks inside shards for
    even FSDP splits of the first matrix axis over up to 16 devices (see
    :func:`chunk_length`); for other shardings (tensor-parallel: a later axis split) the
    chunks are the one-device rule's for the longest smaller ``chunk_size`` whose chunks
    lie inside the shards, so the layout, and the selection with it, differs from one
    device's (:func:`~nanoadam_jax.plan` marks such
    leaves; :func:`~nanoadam_jax.relayout` moves a state between meshes). A sharding
    that no chunking fits raises an error naming the leaf. ``scope="leaf"`` (one chunk
    per layer) never adapts: its state is replicated over the sharded axes (documented
    cost).

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> lay = nanoadam.layout.leaf_layout((4, 64, 512), batch_axes=(0,), max_density=0.1)
      >>> lay.grid, lay.chunk, lay.capacity
      ((4, 16), 2048, 205)

    Args:
      shape: the leaf's shape.
      batch_axes: the layer axes (each index selected on its own).
      scope: ``"chunk"`` or ``"leaf"``.
      chunk_size: target chunk length (None: :data:`DEFAULT_CHUNK_SIZE`).
      max_density: the largest density to hold (sizes ``capacity``).
      sharding: the leaf's sharding, if known.
      path: the leaf's path, for error messages.

    Returns:
      A :class:`LeafLayout`.
    """
    shape = tuple(int(s) for s in shape)
    batch_axes = tuple(sorted(a % len(shape) for a in batch_axes)) if shape else ()
    matrix_axes = [a for a in range(len(shape)) if a not in batch_axes]
    matrix = tuple(shape[a] for a in matrix_axes)
    batch = tuple(shape[a] for a in batch_axes)
    target = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
    if scope == "leaf":
        target = max(1, math.prod(matrix))
    spec = None
    mesh = getattr(sharding, "mesh", None)
    raw_spec = getattr(sharding, "spec", None)
    if raw_spec is not None and mesh is not None and getattr(mesh, "shape", None):
        full = tuple(raw_spec) + (None,) * (len(shape) - len(raw_spec))
        mspec = tuple(full[a] for a in matrix_axes)
        bspec = tuple(full[a] for a in batch_axes)
        j, c = _split_point(matrix, target)
        grid_spec = _aligned_spec(matrix, j, c, mspec, mesh)
        if grid_spec is None and scope != "leaf":
            j, c = _shard_split(
                matrix,
                target,
                mspec,
                mesh,
                f"leaf {path or '<root>'} of shape {shape} is sharded as {tuple(raw_spec)}",
            )
            grid_spec = _aligned_spec(matrix, j, c, mspec, mesh)
        if grid_spec is not None:
            spec = (*bspec, *grid_spec)
    else:
        j, c = _split_point(matrix, target)
    grid = (*batch, *_grid(matrix, j, c))
    capacity = selection.num_selected_static(c, max_density) if math.prod(shape) else 0
    if c > _INT32_MAX:
        raise ValueError(
            f"leaf {path or '<root>'} of shape {shape}: a chunk of {c} entries is above the "
            f"int32 range of positions; use scope='chunk' with a chunk_size that divides its "
            "trailing axes, or declare its layer axes (SelectionDimensionNumbers)"
        )
    index_dtype = jnp.uint16 if c <= _UINT16_MAX else jnp.int32
    return LeafLayout(
        shape=shape,
        batch_axes=batch_axes,
        chunk=c,
        grid=grid,
        capacity=capacity,
        index_dtype=index_dtype,
        spec=spec,
    )


def state_array(lay: LeafLayout, fill: int, dtype: Any, like: Any) -> jax.Array:
    """A ``(*grid, capacity)`` array filled with ``fill``, sharded like the rows of the
    leaf ``like`` when that is known (its state rows are laid out like its chunks)."""
    sharding = None
    ps = known_sharding(like)
    if lay.spec is not None and ps is not None:
        sharding = jax.sharding.NamedSharding(ps.mesh, jax.sharding.PartitionSpec(*lay.spec, None))
    if isinstance(like, jax.core.Tracer):
        # Under jit/eval_shape the sharding is known only in explicit mode (then set it).
        return jnp.full(lay.state_shape, fill, dtype, out_sharding=sharding)
    return jnp.full(lay.state_shape, fill, dtype, device=sharding)


def layout_from_state(
    shape: Sequence[int], batch_axes: Sequence[int], state_shape: Sequence[int], dtype: Any
) -> LeafLayout:
    """Recover a leaf's layout from its stored positions' shape (inside ``update``).

    ``update`` may see parameters without their metadata or sharding (``nnx.Optimizer``
    passes plain arrays), so the chunking chosen at ``init`` is read back from the state.
    """
    shape = tuple(int(s) for s in shape)
    grid = tuple(int(s) for s in state_shape[:-1])
    n = math.prod(shape)
    rows = math.prod(grid)
    if n == 0 or rows == 0:
        # An empty leaf (or an empty layer axis): nothing is ever selected.
        return LeafLayout(
            shape=shape,
            batch_axes=tuple(sorted(a % len(shape) for a in batch_axes)) if shape else (),
            chunk=n // rows if rows else 0,
            grid=grid,
            capacity=int(state_shape[-1]),
            index_dtype=jnp.dtype(dtype),
        )
    if n % rows:
        raise ValueError(
            f"the optimizer state (positions of shape {tuple(state_shape)}) does not fit a "
            f"parameter of shape {shape}: was the state made by `init` for these parameters?"
        )
    return LeafLayout(
        shape=shape,
        batch_axes=tuple(sorted(a % len(shape) for a in batch_axes)) if shape else (),
        chunk=n // rows,
        grid=grid,
        capacity=int(state_shape[-1]),
        index_dtype=jnp.dtype(dtype),
    )


def layer_axes_from_metadata(leaf: Any, names: Sequence[str]) -> tuple[int, ...]:
    """Axes of a Flax-boxed leaf whose sharding name is a layer-axis name.

    Reads ``nnx.Variable`` metadata (``out_sharding``; older Flax: ``sharding_names`` /
    ``sharding``), into which ``nnx.vmap/scan(..., transform_metadata={nnx.PARTITION_NAME:
    "layers"})`` inserts the layer axis for variables that carry a sharding annotation
    (``nnx.with_partitioning``; an unannotated variable gets none: declare its layer axes
    with ``dimension_numbers``), and
    ``nn.Partitioned.names`` (``nn.scan(metadata_params={nn.PARTITION_NAME: "layers"})``).
    """
    spec = None
    if hasattr(leaf, "get_metadata"):
        meta = leaf.get_metadata()
        for key in ("out_sharding", "sharding_names", "sharding"):
            if meta.get(key) is not None:
                spec = meta[key]
                break
    elif hasattr(leaf, "names") and hasattr(leaf, "unbox"):
        spec = leaf.names
    if spec is None or isinstance(spec, jax.sharding.Sharding):
        spec = getattr(spec, "spec", None)
    if spec is None:
        return ()
    wanted = set(names)
    return tuple(
        i
        for i, entry in enumerate(tuple(spec))
        if entry is not None
        and (entry in wanted if isinstance(entry, str) else any(e in wanted for e in entry))
    )


DimensionNumbers = (
    None | SelectionDimensionNumbers | Any | Callable[[Any], Any]
)  # a tree or params -> tree


# -- masks of a leaf's selection (the rule of :mod:`nanoadam_jax.selection`, cut into chunks) --


def selection_mask(
    lay: LeafLayout,
    x: jax.Array,
    density: jax.typing.ArrayLike,
    criterion: str = "smallest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask of ``x``'s selected entries for a :class:`LeafLayout`: exactly
    ``num_selected(lay.chunk, density)`` per chunk, ties by position.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> w = jnp.array([[0.3, -0.01], [2.0, 0.02]])
      >>> lay = nanoadam.layout.leaf_layout(w.shape)
      >>> nanoadam.layout.selection_mask(lay, w, 0.5).tolist()
      [[False, True], [False, True]]

    Args:
      lay: how ``x`` is cut into chunks (:func:`leaf_layout`).
      x: the weights.
      density: fraction in ``(0, 1]`` (may be traced).
      criterion: one of :data:`nanoadam_jax.selection.CRITERIA`.
      key: PRNG key for ``criterion="random"``.

    Returns:
      A bool array with the shape of ``x``.
    """
    if x.size == 0:
        return jnp.zeros(x.shape, bool)
    keys = selection.selection_keys(lay.view(x), criterion, key)
    return lay.unview(selection.chunk_mask(keys, selection.num_selected(lay.chunk, density)), x)


def select_mask(
    x: jax.Array,
    density: jax.typing.ArrayLike,
    *,
    scope: str = "chunk",
    chunk_size: int | None = None,
    layer_axes: Sequence[int] = (),
    criterion: str = "smallest",
    key: jax.Array | None = None,
) -> jax.Array:
    """Boolean mask of the selected entries of one weight tensor (the optimizer's rule).

    Exactly :func:`~nanoadam_jax.selection.num_selected` entries per chunk
    (``scope="chunk"``, chunks as in :func:`leaf_layout`) or per layer matrix
    (``scope="leaf"``); ``layer_axes`` are selected independently. Exported as
    ``nanoadam.select_mask``.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> w = jnp.array([[0.3, -0.01], [2.0, 0.02]])
      >>> nanoadam.select_mask(w, 0.5).tolist()
      [[False, True], [False, True]]

    Args:
      x: the weights.
      density: fraction in ``(0, 1]`` (may be traced).
      scope: ``"chunk"`` or ``"leaf"`` (use
        :func:`~nanoadam_jax.selection.select_global_masks` for global).
      chunk_size: target chunk length (None: the default).
      layer_axes: axes whose every index is selected on its own.
      criterion: one of :data:`nanoadam_jax.selection.CRITERIA`.
      key: PRNG key for ``criterion="random"``.

    Returns:
      A bool array with the shape of ``x``.
    """
    if scope not in ("chunk", "leaf"):
        raise ValueError(f"select_mask handles scope 'chunk' or 'leaf', got {scope!r}")
    lay = leaf_layout(x.shape, batch_axes=layer_axes, scope=scope, chunk_size=chunk_size)
    return selection_mask(lay, x, density, criterion, key)
