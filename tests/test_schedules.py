"""Tests of the density schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import nanoadam_jax as nanoadam


def test_linear_decay_is_piecewise_constant_and_linear():
    s = nanoadam.linear_density_decay(0.1, 0.04, decay_steps=100, density_interval=10)
    values = np.array([float(s(t)) for t in range(130)])
    # Constant inside each interval of 10 steps.
    for start in range(0, 130, 10):
        assert np.all(values[start : start + 10] == values[start])
    # Linear at the interval starts, then flat at the end value.
    np.testing.assert_allclose(values[0:101:10], np.linspace(0.1, 0.04, 11), rtol=1e-6)
    assert values[-1] == pytest.approx(0.04)
    assert s.max_density == 0.1


def test_linear_decay_under_jit():
    s = nanoadam.linear_density_decay(0.5, 0.1, decay_steps=4)
    out = jax.jit(jax.vmap(s))(jnp.arange(6))
    np.testing.assert_allclose(out, [0.5, 0.4, 0.3, 0.2, 0.1, 0.1], rtol=1e-6)


def test_constant_density():
    assert float(nanoadam.constant_density(0.25)(7)) == 0.25


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(init_density=0.0, end_density=0.1, decay_steps=10), "init_density"),
        (dict(init_density=0.1, end_density=1.5, decay_steps=10), "end_density"),
        (dict(init_density=0.1, end_density=0.1, decay_steps=0), "decay_steps"),
        (dict(init_density=0.1, end_density=0.1, decay_steps=10, density_interval=2.5), "interval"),
    ],
)
def test_bad_schedule_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        nanoadam.linear_density_decay(**kwargs)


# -- schedule_max: how the state is sized for a schedule ---------------------------------------


def test_schedule_max_reads_the_attribute_of_the_library_schedules():
    assert nanoadam.schedules.schedule_max(nanoadam.constant_density(0.25)) == 0.25
    rising = nanoadam.linear_density_decay(0.05, 0.3, decay_steps=10)
    assert rising.max_density == 0.3
    assert nanoadam.schedules.schedule_max(rising) == 0.3


def test_schedule_max_probes_other_callables():
    sm = nanoadam.schedules.schedule_max
    assert sm(optax.linear_schedule(0.1, 0.05, 100)) == pytest.approx(0.1)
    assert sm(optax.linear_schedule(0.05, 0.2, 5000)) == pytest.approx(0.2)  # at step 5000
    # A peak between the probed steps (every 100th step from 1000 on) is not seen.
    peak = lambda t: jnp.where((t > 1000) & (t < 1100), 0.9, 0.1)
    assert sm(peak) == pytest.approx(0.1)
    assert sm(lambda t: jnp.where(t == 1000, 0.9, 0.1)) == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("schedule", "match"),
    [
        (lambda t: 1.5, "at step 0 it returned 1.5"),
        (lambda t: jnp.where(t >= 100, -0.1, 0.1), "at step 100"),
        (lambda t: jnp.full((2,), 0.1), "must return a scalar"),
        (lambda t: float(t) * 0.0 + 0.1, "could not be evaluated"),  # needs a concrete step
    ],
    ids=["above-1", "negative-from-100", "vector", "not-traceable"],
)
def test_schedule_max_refuses_bad_schedules(schedule, match):
    with pytest.raises(ValueError, match=match):
        nanoadam.schedules.schedule_max(schedule)
