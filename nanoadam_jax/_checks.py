"""Argument checks shared by the factories: clear errors at construction time."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np


def is_concrete(value: Any) -> bool:
    """True for Python numbers and concrete (non-traced) arrays."""
    if isinstance(value, jax.core.Tracer):
        return False
    try:
        np.asarray(value)
    except Exception:
        return False
    return True


def check_density(name: str, value: Any) -> None:
    """Raise if a concrete density is not a scalar in (0, 1]; traced values pass."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a number in (0, 1], got {value!r}")
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"`{name}` must be a scalar number in (0, 1], got {value!r}")
    if not 0.0 < float(arr) <= 1.0:
        raise ValueError(f"`{name}` must be in (0, 1], got {float(arr)!r}")


def check_positive_int(name: str, value: Any) -> None:
    """Raise if a concrete value is not a positive integer; traced values pass."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    if not is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.shape != () or not np.issubdtype(arr.dtype, np.integer) or int(arr) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def check_static_positive_int(name: str, value: Any, hint: str = "") -> int:
    """A positive integer that must be known at trace time (array shapes depend on it)."""
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"`{name}` must be a static Python int, got a traced value. {hint}")
    check_positive_int(name, value)
    return int(np.asarray(value))


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    """Raise if ``value`` is not one of ``allowed``."""
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}")
