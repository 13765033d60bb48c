"""Writing an example's results: its machine, and its ``.md`` / ``.png`` / ``.json`` files.

Every example ends the same way: a markdown table printed and saved under a title, an optional
plot, and the whole results dictionary (with its wall time) as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

__all__ = ["environment", "write_results"]


def environment() -> dict[str, str]:
    """jax version, backend and device, for the results files.

    Example:
      >>> sorted(environment())
      ['backend', 'device', 'jax', 'python']
    """
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores",
        "python": platform.python_version(),
    }


def write_results(
    out: str | Path,
    name: str,
    title: str,
    table: str,
    results: dict[str, Any],
    t_start: float,
    plot: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """Write ``name.md`` (``# title`` and ``table``), ``name.png`` (``plot(results, path)``, if
    given) and ``name.json`` (``results`` with ``wall_seconds`` since ``t_start`` set), and say so.

    Example:
      >>> import tempfile, time
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_results(d, "demo", "Demo", "| a |", {"x": 1}, time.perf_counter())
      ...     sorted(p.name for p in Path(d).iterdir())  # doctest: +ELLIPSIS
      <BLANKLINE>
      Wrote .../demo.json and .md (0 s).
      ['demo.json', 'demo.md']
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(f"# {title}\n\n{table}\n")
    if plot is not None:
        plot(results, out / f"{name}.png")
    results["wall_seconds"] = time.perf_counter() - t_start
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    written = ", .md and .png" if plot is not None else " and .md"
    print(f"\nWrote {out / f'{name}.json'}{written} ({results['wall_seconds']:.0f} s).")
