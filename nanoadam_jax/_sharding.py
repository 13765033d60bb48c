"""The one sharding probe: what a traced or concrete array says about its sharding.

Every module that must keep a computation on the shards of its input asks here, so the
rule "explicit sharding is on the type; a concrete array carries a NamedSharding" is
written once.
"""

from __future__ import annotations

from typing import Any

import jax

__all__ = ["explicit_sharding", "known_sharding"]


def explicit_sharding(x: Any) -> Any:
    """``x``'s sharding when it is explicit (set on its type, e.g. under
    ``jax.sharding.use_mesh`` with ``AxisType.Explicit``) and splits some axis, else None.

    Example:
      >>> import jax.numpy as jnp
      >>> explicit_sharding(jnp.zeros(3)) is None
      True
    """
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None or all(e is None for e in spec):
        return None
    return sharding


def known_sharding(x: Any) -> Any:
    """A parameter's ``NamedSharding`` when it is known here, else None: a concrete
    array's or a ``jax.ShapeDtypeStruct``'s, or a tracer's explicit one.

    Example:
      >>> import jax.numpy as jnp
      >>> known_sharding(jnp.zeros(3)) is None  # one device: a SingleDeviceSharding
      True
    """
    if isinstance(x, jax.core.Tracer):
        return explicit_sharding(x)
    sharding = getattr(x, "sharding", None)
    return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None
