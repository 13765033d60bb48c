"""Ready-made optimizers: :func:`nanoadam` (the paper's Algorithm 1) and :func:`nanoadamw`.

Both are :func:`~nanoadam_jax.sparse_update` around the Adam written here
(:func:`_scale_by_adam`: ``optax.scale_by_adam``'s state and arithmetic, with a choice of
bias correction for entries that enter the selection late) followed by the learning rate;
``nanoadamw`` adds optax's decoupled weight decay, with its ``mask`` and schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nanoadam_jax import transform
from nanoadam_jax.config import Density, DimensionNumbers, selection_args
from nanoadam_jax.labels import Labels
from nanoadam_jax.layout import LAYER_AXIS_NAMES
from nanoadam_jax.transform import STEP_ARG, sparse_update

__all__ = ["BIAS_CORRECTIONS", "nanoadam", "nanoadamw"]

#: Accepted values of ``bias_correction`` (``True`` means ``"per_entry"``).
BIAS_CORRECTIONS = (True, False, "per_entry", "global", "gradient")
#: Extra argument carrying ``nanoadamw``'s resolved weight-decay mask (a bool per leaf).
_DECAY_MASK_ARG = "nanoadam_decay_mask"


def _check_bias_correction(value: Any) -> str | bool:
    if isinstance(value, bool):
        return "per_entry" if value else False
    if isinstance(value, str) and value in BIAS_CORRECTIONS:
        return value
    raise ValueError(f"`bias_correction` must be one of {BIAS_CORRECTIONS}, got {value!r}")


def _bias_correction(moment: Any, decay: float, count: Any) -> Any:
    """``optax.tree.bias_correction`` with a count per leaf (a tree of arrays shaped like
    ``moment``'s leaves, or of scalars)."""
    return jax.tree.map(lambda m, c: m / (1 - decay**c).astype(m.dtype), moment, count)


def _scale_by_adam(
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
    mu_dtype: Any | None,
    nesterov: bool,
    bias_correction: str | bool,
) -> optax.GradientTransformationExtraArgs:
    """``optax.scale_by_adam`` (its state, its arithmetic in its order) with a choice of
    how an entry that enters the selection late is corrected (``bias_correction``):

    * ``"per_entry"``: its ``1 / (1 - b**t)`` uses ``t = age + 1``, its own number of
      updates (the extra argument :data:`~nanoadam_jax.transform.AGE_ARG`). Leaves updated
      without it (dense leaves, always selected) use the running count, their age.
    * ``"global"``: the running count for every entry.
    * ``"gradient"``: the running count ``c``, and an entry whose second moment is exactly
      zero (entered at this step) first takes ``m = (1 - b1**c) g``, ``v = (1 - b2**c) g**2``:
      the moments a constant gradient would have built (zero extra bytes; the first step
      is ``lr * sign(g)``).
    * ``False``: no correction, ``m / (sqrt(v + eps_root) + eps)``.
    """
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype)

    def warm_start(updates: Any, state: optax.ScaleByAdamState) -> tuple[Any, Any]:
        c = state.count

        def start(g, m, v, decay, sq):
            fresh = v == 0
            value = (1 - decay**c) * (jnp.square(g) if sq else g)
            return jnp.where(fresh, value.astype(m.dtype), m)

        mu = jax.tree.map(lambda g, m, v: start(g, m, v, b1, False), updates, state.mu, state.nu)
        nu = jax.tree.map(lambda g, v: start(g, v, v, b2, True), updates, state.nu)
        return mu, nu

    def update_fn(updates, state, params=None, **extra_args):
        del params
        mu, nu = state.mu, state.nu
        if bias_correction == "gradient":
            mu, nu = warm_start(updates, state)
        mu = optax.tree.update_moment(updates, mu, b1, 1)
        nu = optax.tree.update_moment_per_elem_norm(updates, nu, b2, 2)
        count_inc = optax.safe_increment(state.count)
        ages = extra_args.get(transform.AGE_ARG) if bias_correction == "per_entry" else None
        if ages is not None:
            t = jax.tree.map(lambda a: a.astype(jnp.int32) + 1, ages)
        else:
            t = jax.tree.map(lambda _: count_inc, updates)
        if bias_correction is False:
            mu_hat, nu_hat = mu, nu
            if nesterov:
                mu_hat = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, mu, updates)
        else:
            mu_hat = _bias_correction(mu, b1, t)
            if nesterov:
                t_next = jax.tree.map(optax.safe_increment, t)
                mu_hat = jax.tree.map(
                    lambda m, g: b1 * m + (1 - b1) * g,
                    _bias_correction(mu, b1, t_next),
                    _bias_correction(updates, b1, t),
                )
            nu_hat = _bias_correction(nu, b2, t)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v + eps_root) + eps), mu_hat, nu_hat)
        mu = optax.tree.cast(mu, mu_dtype)
        nu = optax.tree.cast_like(nu, state.nu)
        return out, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(base.init, update_fn)


def _decayed_weights(
    weight_decay: optax.ScalarOrSchedule, masked: bool
) -> optax.GradientTransformationExtraArgs:
    """``optax.add_decayed_weights`` for use inside :func:`~nanoadam_jax.sparse_update`:
    a schedule is evaluated at the never-reset step counter
    (:data:`~nanoadam_jax.transform.STEP_ARG`, the value optax's own count has), and, when
    ``masked``, the mask resolved on the full parameters (:func:`_with_decay_mask`) is
    applied per parameter leaf (:data:`~nanoadam_jax.transform.LEAVES_ARG`)."""

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        rate = weight_decay(extra_args[STEP_ARG]) if callable(weight_decay) else weight_decay
        flat_u, treedef = jax.tree.flatten(updates)
        flat_p = treedef.flatten_up_to(params)
        on = [True] * len(flat_u)
        if masked:
            decay_mask = extra_args[_DECAY_MASK_ARG]
            on = [decay_mask[i] for i in extra_args[transform.LEAVES_ARG]]
        out = [u + rate * p if o else u for u, p, o in zip(flat_u, flat_p, on, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update_fn)


def _resolve_decay_mask(mask: Any, params: Any) -> tuple[bool, ...]:
    """optax's weight-decay ``mask`` (a tree of bools with the parameters' structure or a
    prefix of it, or a callable ``params -> tree``) as one Python bool per leaf."""
    tree = mask(params) if callable(mask) else mask
    flat: list[bool] = []

    def expand(m, sub):
        if not isinstance(m, (bool, np.bool_)):
            raise ValueError(f"the weight-decay `mask` must hold Python bools, got {m!r}")
        flat.extend([bool(m)] * len(jax.tree.leaves(sub)))

    try:
        jax.tree.map(expand, tree, params)
    except ValueError as e:
        if "`mask`" in str(e):
            raise
        raise ValueError(
            "the weight-decay `mask` must be a tree of bools with the parameters' structure "
            f"(or a prefix of it), or a callable returning one: {e}"
        ) from e
    return tuple(flat)


def _with_decay_mask(
    tx: optax.GradientTransformationExtraArgs, mask: Any
) -> optax.GradientTransformationExtraArgs:
    """``tx`` (same state) with the weight-decay mask resolved on the parameters at every
    update and passed down as an extra argument."""

    def update_fn(updates, state, params=None, **extra_args):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        extra_args[_DECAY_MASK_ARG] = _resolve_decay_mask(mask, params)
        return tx.update(updates, state, params, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


def _with_learning_rate(
    inner: optax.GradientTransformation, learning_rate: optax.ScalarOrSchedule
) -> optax.GradientTransformationExtraArgs:
    """``inner`` followed by ``optax.scale_by_learning_rate(learning_rate)``, with
    ``inner``'s state unchanged (the learning rate adds none).

    For use inside :func:`~nanoadam_jax.sparse_update`: a schedule is evaluated at
    ``sparse_update``'s step counter (the extra argument
    :data:`~nanoadam_jax.transform.STEP_ARG`, the number of earlier updates, like
    optax's own count), so a ``"reset"`` refresh, which re-initialises the inner state,
    does not restart it. Scaling inside ``sparse_update`` (on the ``k`` selected values,
    before the scatter) lets XLA turn ``params + update`` into an in-place scatter-add
    into the parameters when the update is applied in the same jitted step.
    """
    inner = optax.with_extra_args_support(inner)

    def update_fn(updates, state, params=None, **extra_args):
        updates, state = inner.update(updates, state, params, **extra_args)
        if callable(learning_rate):
            lr = learning_rate(extra_args[STEP_ARG])
            updates = jax.tree.map(lambda u: jnp.array(-lr, dtype=u.dtype) * u, updates)
        else:
            updates = jax.tree.map(lambda u: u * -learning_rate, updates)
        return updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def _sparse_adam(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    bias_correction: str | bool,
    **selection: Any,
) -> optax.GradientTransformationExtraArgs:
    """``inner`` with the learning rate, made sparse; the state is a one-element chain
    (``state[0]`` is the :class:`~nanoadam_jax.SparseUpdateState`)."""
    return optax.chain(
        sparse_update(
            _with_learning_rate(inner, learning_rate),
            entry_age=bias_correction == "per_entry",
            **selection,
        )
    )


def nanoadam(
    learning_rate: optax.ScalarOrSchedule,
    density: Density = 0.1,
    mask_interval: int = 100,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    eps_root: float = 0.0,
    bias_correction: bool | str = True,
    mu_dtype: Any | None = None,
    nesterov: bool = False,
    scope: str = "chunk",
    chunk_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    dimension_numbers: DimensionNumbers = None,
    layer_axis_names: Sequence[str] = LAYER_AXIS_NAMES,
    refresh_policy: str = "keep",
    max_density: float | None = None,
    moment_dtype: Any | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """NanoAdam: Adam on the smallest-magnitude weights of each weight matrix only.

    The same updates as ``optax.chain(sparse_update(scale_by_adam(b1, b2, eps), ...),
    optax.scale_by_learning_rate(learning_rate))``, with the learning rate applied
    inside :func:`~nanoadam_jax.sparse_update` (to the ``k`` selected values, before the
    scatter, so that XLA can apply the update in place; the state is a one-element
    chain whose ``state[0]`` is the :class:`~nanoadam_jax.SparseUpdateState`, and a
    learning-rate schedule follows its never-reset ``sparse_step``): at step 0, every
    ``mask_interval`` steps and whenever the density changes, the
    ``k = round(density * C)`` smallest-``|w|`` entries of every chunk of ``C`` entries of
    each sparse leaf (per layer of a stacked leaf) are selected (exactly ``k``, ties by
    position); Adam runs on those entries only, with moments stored only for them;
    every other entry of a sparse leaf gets an update of exactly ``0.0``. The output head
    and normalisation layers are updated densely (see
    :func:`~nanoadam_jax.default_labels`).

    **Every selected entry steps like Adam** (``bias_correction=True``, the default):
    its bias correction ``1 / (1 - b**t)`` counts ``t`` from when it entered the
    selection (a ``uint16`` age per selected entry, 2 bytes, saturating at 65535 updates,
    where ``1 - b2**t`` is 1 in float32 for ``b2 <= 0.9998``). An entry that enters late
    starts at zero moments and age 0, so its first step is ``lr * sign(g)`` and a
    constant gradient moves it ``lr`` per step at any step count, as ``optax.adam`` does
    for every entry. Entries that stay keep their moments and age. With
    ``density=1.0`` it is ``optax.adam``, step for step.
    ``"global"`` corrects every entry with the running count (torch's ``SparseAdam``
    and RigL-style mask updates do this): an entry entering at step ``t`` then takes a
    first step of ``(1-b1)/(1-b1^t) / sqrt((1-b2)/(1-b2^t))`` times ``lr`` (3.2x late in
    training, up to 6x over its first 20 steps). ``"gradient"`` keeps the running count
    but starts an entering entry's moments from its gradient as if it had been constant
    (no extra bytes; first step ``lr * sign(g)``; it also applies to an entry whose
    gradient was exactly zero at every earlier step, e.g. an embedding row not yet seen).
    ``False`` drops the correction. Why the default: in 3000-step runs with 29 refreshes
    (E3-long of ``python -m benchmarks.evidence``, MNIST CNN, 3 seeds, each at its best
    learning rate) every choice was within one standard error (test accuracy per-entry
    96.4, ``"global"`` 96.1, ``"gradient"`` 96.8, ``refresh_policy="reset"`` 96.3), so the
    default is the one that is exactly Adam for every selected entry.

    See :func:`~nanoadam_jax.sparse_update` for the chunking, refresh-policy, stacked-layer
    and state-sizing arguments, and :func:`~nanoadam_jax.plan` for the table of what it
    will train.

    Example:
      >>> import jax, jax.numpy as jnp, optax, nanoadam_jax as nanoadam
      >>> params = {"w": jnp.linspace(-1.0, 1.0, 10)}
      >>> tx = nanoadam.nanoadam(learning_rate=0.1, density=0.2, mask_interval=5)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum((p["w"] - 2.0) ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> int(jnp.sum(updates["w"] != 0))
      2

    Args:
      learning_rate: a float or an optax schedule.
      density: fraction in ``(0, 1]`` or a schedule ``step -> density``
        (e.g. :func:`~nanoadam_jax.linear_density_decay`).
      mask_interval: refresh the selection every this many steps.
      b1, b2, eps, eps_root, mu_dtype, nesterov: as in ``optax.adam``.
      bias_correction: ``True`` (= ``"per_entry"``), ``"global"``, ``"gradient"`` or
        ``False``; see above.
      scope, chunk_size, criterion, labels, dimension_numbers, layer_axis_names,
      refresh_policy, max_density, moment_dtype, seed: see
        :func:`~nanoadam_jax.sparse_update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    correction = _check_bias_correction(bias_correction)
    inner = _scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov, correction)
    return _sparse_adam(
        inner,
        learning_rate,
        correction,
        **selection_args(locals()),
        refresh_policy=refresh_policy,
        moment_dtype=moment_dtype,
    )


def nanoadamw(
    learning_rate: optax.ScalarOrSchedule,
    density: Density = 0.1,
    mask_interval: int = 100,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 1e-4,
    *,
    mask: Any | None = None,
    eps_root: float = 0.0,
    bias_correction: bool | str = True,
    mu_dtype: Any | None = None,
    nesterov: bool = False,
    scope: str = "chunk",
    chunk_size: int | None = None,
    criterion: str = "smallest",
    labels: Labels = None,
    dimension_numbers: DimensionNumbers = None,
    layer_axis_names: Sequence[str] = LAYER_AXIS_NAMES,
    refresh_policy: str = "keep",
    max_density: float | None = None,
    moment_dtype: Any | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """NanoAdam with decoupled weight decay (like ``optax.adamw``), on updated entries only.

    The decay ``weight_decay * w`` is added inside the sparse update, so it applies
    to the selected entries of sparse leaves and to dense leaves, and never to
    unselected entries (their update stays exactly ``0.0``). As in ``optax.adamw``
    the decay is scaled by the learning rate, ``weight_decay`` may be a schedule
    (evaluated at the step count, as optax does), and ``mask`` (optax's: a tree of bools
    with the parameters' structure or a prefix of it, or a callable ``params -> tree``;
    ``True`` where decay applies) keeps decay off e.g. biases and norms. With
    ``density=1.0`` it is ``optax.adamw``, step for step. The default ``weight_decay``
    matches ``optax.adamw``'s.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> params = {"w": jnp.array([0.1, -2.0, 0.3, 4.0])}
      >>> tx = nanoadam.nanoadamw(learning_rate=0.1, density=0.5, weight_decay=0.5)
      >>> updates, _ = tx.update({"w": jnp.zeros(4)}, tx.init(params), params)
      >>> [round(u, 3) + 0.0 for u in updates["w"].tolist()]
      [-0.005, 0.0, -0.015, 0.0]

    Args:
      learning_rate, density, mask_interval, b1, b2, eps, eps_root, bias_correction,
      mu_dtype, nesterov: see :func:`nanoadam`.
      weight_decay: decoupled weight decay rate (non-negative float) or a schedule.
      mask: where weight decay applies, as in ``optax.adamw`` (None: everywhere).
      scope, chunk_size, criterion, labels, dimension_numbers, layer_axis_names,
      refresh_policy, max_density, moment_dtype, seed: see
        :func:`~nanoadam_jax.sparse_update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    if not callable(weight_decay) and not isinstance(weight_decay, jax.core.Tracer):
        try:
            bad = float(weight_decay) < 0
        except TypeError:
            bad = True
        if bad:
            raise ValueError(
                f"`weight_decay` must be a non-negative float or a schedule, got {weight_decay!r}"
            )
    correction = _check_bias_correction(bias_correction)
    inner = optax.chain(
        _scale_by_adam(b1, b2, eps, eps_root, mu_dtype, nesterov, correction),
        _decayed_weights(weight_decay, masked=mask is not None),
    )
    tx = _sparse_adam(
        inner,
        learning_rate,
        correction,
        **selection_args(locals()),
        refresh_policy=refresh_policy,
        moment_dtype=moment_dtype,
    )
    return tx if mask is None else _with_decay_mask(tx, mask)
