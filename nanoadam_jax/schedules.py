"""Density schedules: the fraction of entries that is trainable, as a function of the step.

A density schedule is any callable ``step -> density`` (like an optax schedule).
The transformations re-select the mask whenever the value it returns changes,
so a piecewise-constant schedule (the paper's "update the density every ``d``
steps") costs one refresh per change, not one per step.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nanoadam_jax._checks import check_density, check_positive_int

__all__ = ["DensitySchedule", "constant_density", "linear_density_decay", "schedule_max"]

DensitySchedule = Callable[[jax.typing.ArrayLike], jax.Array]


def constant_density(density: float) -> DensitySchedule:
    """A schedule that always returns ``density``.

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> float(nanoadam.constant_density(0.1)(1000))
      0.10000000149011612

    Args:
      density: fraction in ``(0, 1]``.

    Returns:
      A callable ``step -> float32 scalar``.
    """
    check_density("density", density)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        del step
        return jnp.asarray(density, jnp.float32)

    schedule.max_density = float(density)  # type: ignore[attr-defined]
    return schedule


def linear_density_decay(
    init_density: float,
    end_density: float,
    decay_steps: int,
    density_interval: int = 1,
) -> DensitySchedule:
    """The paper's linear density decay, updated every ``density_interval`` steps.

    ``density(t) = init + (end - init) * min(s / decay_steps, 1)`` with
    ``s = density_interval * floor(t / density_interval)``: the value is held
    constant between updates, so with ``density_interval = d`` the mask refreshes
    because of the schedule at most once every ``d`` steps (the paper's GLUE runs
    use 10% -> 4% over training with ``d`` about ``T / 40``).

    The returned callable carries ``max_density`` (the largest value it returns),
    which the compact state uses to size its buffers.

    Example:
      >>> import nanoadam_jax as nanoadam
      >>> sched = nanoadam.linear_density_decay(0.1, 0.04, decay_steps=100, density_interval=50)
      >>> [round(float(sched(t)), 3) for t in (0, 49, 50, 100, 500)]
      [0.1, 0.1, 0.07, 0.04, 0.04]

    Args:
      init_density: density at step 0, in ``(0, 1]``.
      end_density: density from ``decay_steps`` on, in ``(0, 1]``.
      decay_steps: number of steps of the decay (positive integer).
      density_interval: the density changes only every this many steps.

    Returns:
      A callable ``step -> float32 scalar``.
    """
    check_density("init_density", init_density)
    check_density("end_density", end_density)
    check_positive_int("decay_steps", decay_steps)
    check_positive_int("density_interval", density_interval)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        held = (step // density_interval) * density_interval
        frac = jnp.minimum(held.astype(jnp.float32) / decay_steps, 1.0)
        return jnp.asarray(init_density + (end_density - init_density) * frac, jnp.float32)

    schedule.max_density = float(max(init_density, end_density))  # type: ignore[attr-defined]
    return schedule


#: Steps at which :func:`schedule_max` probes a schedule without a ``max_density``.
PROBE_STEPS = (
    *range(0, 1001),
    *range(1000, 100_001, 100),
    *range(100_000, 10_000_001, 10_000),
)


def schedule_max(schedule: DensitySchedule) -> float:
    """The largest density a schedule returns, to size the state for it.

    A schedule with a ``max_density`` attribute (:func:`constant_density`,
    :func:`linear_density_decay`) gives it. Any other callable (``lambda s: 0.1``, an
    ``optax`` schedule) is evaluated at every step up to 1000, every 100th up to 10**5
    and every 10,000th up to 10**7, and the largest value is used; a later larger value
    is capped at it (see :func:`~nanoadam_jax.sparse_update`). Pass ``max_density`` to
    the optimizer to size the state for a schedule that peaks elsewhere.

    Example:
      >>> import optax, nanoadam_jax as nanoadam
      >>> round(nanoadam.schedules.schedule_max(optax.linear_schedule(0.1, 0.05, 100)), 4)
      0.1

    Args:
      schedule: a callable ``step -> density``.

    Returns:
      The largest density (a Python float in ``(0, 1]``).

    Raises:
      ValueError: the schedule cannot be evaluated eagerly or leaves ``(0, 1]``.
    """
    static = getattr(schedule, "max_density", None)
    if static is not None:
        return float(static)
    try:
        steps = jnp.asarray(np.asarray(PROBE_STEPS, np.int32))
        values = np.asarray(jax.vmap(lambda s: jnp.asarray(schedule(s), jnp.float32))(steps))
    except Exception as e:
        raise ValueError(
            "the `density` schedule could not be evaluated at init to size the optimizer "
            "state; pass `max_density` (the largest density it returns)"
        ) from e
    if values.shape != (len(PROBE_STEPS),):
        raise ValueError(
            f"the `density` schedule must return a scalar, got shape {values.shape[1:]}"
        )
    bad = ~((values > 0) & (values <= 1))
    if bad.any():
        step = PROBE_STEPS[int(np.argmax(bad))]
        raise ValueError(
            f"the `density` schedule must return a scalar in (0, 1]; at step {step} it "
            f"returned {float(values[np.argmax(bad)])!r}"
        )
    return float(values.max())
