"""Ready-made optimizers: :func:`nanoadam` (the paper's Algorithm 1) and :func:`nanoadamw`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from nanoadam_jax.labels import Labels
from nanoadam_jax.layout import LAYER_AXIS_NAMES
from nanoadam_jax.transform import STEP_ARG, Density, DimensionNumbers, sparse_update

__all__ = ["nanoadam", "nanoadamw"]


def _scale_by_adam_uncorrected(
    b1: float, b2: float, eps: float, mu_dtype: Any | None
) -> optax.GradientTransformation:
    """``optax.scale_by_adam`` without bias correction: ``m / (sqrt(v) + eps)``.

    Same state (``optax.ScaleByAdamState``: count, mu, nu) and the same moment updates
    as ``optax.scale_by_adam``; only the ``1 / (1 - b**t)`` factors are left out. A fresh
    entry's first step is then ``(1 - b1) / sqrt(1 - b2)`` (3.16 with the default betas)
    times ``lr * sign(g)``, instead of ``lr * sign(g)``.
    """
    base = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)

    def update_fn(updates, state, params=None):
        del params
        mu = jax.tree.map(lambda g, m: b1 * m + (1 - b1) * g, updates, state.mu)
        nu = jax.tree.map(lambda g, v: b2 * v + (1 - b2) * jnp.square(g), updates, state.nu)
        out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu, nu)
        mu = jax.tree.map(lambda m, s: m.astype(s.dtype), mu, state.mu)
        count = optax.safe_increment(state.count)
        return out, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(base.init, update_fn)


def _adam(
    b1: float, b2: float, eps: float, mu_dtype: Any | None, bias_correction: bool
) -> optax.GradientTransformation:
    if not isinstance(bias_correction, bool):
        raise ValueError(f"`bias_correction` must be True or False, got {bias_correction!r}")
    if bias_correction:
        return optax.scale_by_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    return _scale_by_adam_uncorrected(b1, b2, eps, mu_dtype)


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


def nanoadam(
    learning_rate: optax.ScalarOrSchedule,
    density: Density = 0.1,
    mask_interval: int = 100,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    bias_correction: bool = True,
    mu_dtype: Any | None = None,
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

    The same updates as ``optax.chain(sparse_update(optax.scale_by_adam(b1, b2, eps),
    ...), optax.scale_by_learning_rate(learning_rate))``, with the learning rate applied
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
    :func:`~nanoadam_jax.default_labels`). With ``density=1.0`` it is ``optax.adam``,
    step for step.

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
      b1, b2, eps: Adam's hyperparameters.
      bias_correction: Adam's ``1 / (1 - b**t)`` correction of the moments (default,
        as in ``optax.adam``), with the running count: an entry that enters the
        selection late takes a first step of up to ``(1 - b1) / sqrt(1 - b2) = 3.16``
        times ``lr`` (``refresh_policy="reset"`` restarts the count at every refresh, so
        every first step is ``lr * sign(g)``). ``False`` drops the correction.
      mu_dtype: dtype of the first moment (as in ``optax.adam``).
      scope, chunk_size, criterion, labels, dimension_numbers, layer_axis_names,
      refresh_policy, max_density, moment_dtype, seed: see
        :func:`~nanoadam_jax.sparse_update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    inner = _with_learning_rate(_adam(b1, b2, eps, mu_dtype, bias_correction), learning_rate)
    return optax.chain(
        sparse_update(
            inner,
            density,
            mask_interval,
            scope=scope,
            chunk_size=chunk_size,
            criterion=criterion,
            labels=labels,
            dimension_numbers=dimension_numbers,
            layer_axis_names=layer_axis_names,
            refresh_policy=refresh_policy,
            max_density=max_density,
            moment_dtype=moment_dtype,
            seed=seed,
        ),
    )


def nanoadamw(
    learning_rate: optax.ScalarOrSchedule,
    density: Density = 0.1,
    mask_interval: int = 100,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    *,
    bias_correction: bool = True,
    mu_dtype: Any | None = None,
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
    the decay is scaled by the learning rate. The default ``weight_decay`` matches
    ``optax.adamw``'s.

    Example:
      >>> import jax.numpy as jnp, nanoadam_jax as nanoadam
      >>> params = {"w": jnp.array([0.1, -2.0, 0.3, 4.0])}
      >>> tx = nanoadam.nanoadamw(learning_rate=0.1, density=0.5, weight_decay=0.5)
      >>> updates, _ = tx.update({"w": jnp.zeros(4)}, tx.init(params), params)
      >>> [round(u, 3) + 0.0 for u in updates["w"].tolist()]
      [-0.005, 0.0, -0.015, 0.0]

    Args:
      learning_rate, density, mask_interval, b1, b2, eps, bias_correction, mu_dtype: see
        :func:`nanoadam`.
      weight_decay: decoupled weight decay rate (non-negative float).
      scope, chunk_size, criterion, labels, dimension_numbers, layer_axis_names,
      refresh_policy, max_density, moment_dtype, seed: see
        :func:`~nanoadam_jax.sparse_update`.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    if not isinstance(weight_decay, jax.core.Tracer):
        try:
            bad = float(weight_decay) < 0
        except TypeError:
            bad = True
        if bad:
            raise ValueError(f"`weight_decay` must be a non-negative float, got {weight_decay!r}")
    inner = _with_learning_rate(
        optax.chain(
            _adam(b1, b2, eps, mu_dtype, bias_correction),
            optax.add_decayed_weights(weight_decay),
        ),
        learning_rate,
    )
    return optax.chain(
        sparse_update(
            inner,
            density,
            mask_interval,
            scope=scope,
            chunk_size=chunk_size,
            criterion=criterion,
            labels=labels,
            dimension_numbers=dimension_numbers,
            layer_axis_names=layer_axis_names,
            refresh_policy=refresh_policy,
            max_density=max_density,
            moment_dtype=moment_dtype,
            seed=seed,
        ),
    )
