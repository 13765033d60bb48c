"""Tests of the density schedules."""

import jax
import jax.numpy as jnp
import numpy as np
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
