"""Test configuration: 8 host CPU devices for the sharding tests.

XLA reads the flag when jax initialises its backends, so it is set here, before any
test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
