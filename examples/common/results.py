"""Writing an example's results: its provenance, and its ``.md`` / ``.png`` / ``.json`` files.

Every example ends the same way: a markdown table printed and saved under a title, an optional
plot, and the whole results dictionary (with its wall time) as JSON. Both files record where
the numbers come from (:func:`environment`): the library's git commit (and whether
``nanoadam_jax/`` had uncommitted changes), the machine and the jax devices.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

import nanoadam_jax

__all__ = [
    "cpu_model",
    "environment",
    "git_revision",
    "machine",
    "provenance_md",
    "strict_json",
    "write_results",
]

#: The repository checkout the examples live in.
REPO = Path(__file__).resolve().parents[2]


def git_revision(repo: str | Path = REPO) -> dict[str, Any]:
    """The checkout's commit and whether the library (``nanoadam_jax/``) differs from it.

    ``{"commit": None, "library_dirty": None}`` outside a git checkout or without ``git``.

    Example:
      >>> sorted(git_revision())
      ['commit', 'library_dirty']
    """

    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        return {
            "commit": git("rev-parse", "HEAD"),
            "library_dirty": bool(git("status", "--porcelain", "--", "nanoadam_jax")),
        }
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "library_dirty": None}


def cpu_model() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    """The machine: platform, CPU model and cores, and the jax devices.

    Example:
      >>> sorted(machine())  # doctest: +NORMALIZE_WHITESPACE
      ['cpu_count', 'cpu_model', 'cpus_available', 'device_count', 'device_kind', 'devices',
       'platform']
    """
    devices = jax.devices()
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count()
    return {
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "devices": [str(d) for d in devices],
    }


def environment() -> dict[str, Any]:
    """Library version and commit, jax version, backend, device and machine, for the results.

    ``device`` is a one-line summary for the scripts' captions.

    Example:
      >>> sorted(environment())  # doctest: +NORMALIZE_WHITESPACE
      ['backend', 'device', 'git', 'jax', 'machine', 'nanoadam_jax', 'python']
    """
    device = jax.devices()[0]
    return {
        "nanoadam_jax": nanoadam_jax.__version__,
        "git": git_revision(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPU cores",
        "python": platform.python_version(),
        "machine": machine(),
    }


def provenance_md(env: dict[str, Any]) -> str:
    """Markdown lines naming the library commit and the machine of an :func:`environment`.

    Example:
      >>> env = {"nanoadam_jax": "0.1.0", "jax": "0.10.2", "python": "3.11.7", "backend": "cpu",
      ...        "git": {"commit": "0123456789abcdef", "library_dirty": True},
      ...        "machine": {"cpu_model": "Xeon", "cpu_count": 2, "platform": "Linux",
      ...                    "device_count": 1, "device_kind": "cpu"}}
      >>> print(provenance_md(env))
      - library: nanoadam_jax 0.1.0, commit 0123456789ab (nanoadam_jax/ has uncommitted changes)
      - machine: Xeon, 2 CPU cores, Linux; jax 0.10.2 (cpu), 1 x cpu; Python 3.11.7
    """
    git = env.get("git") or {}
    commit = git.get("commit")
    where = f"commit {commit[:12]}" if commit else "commit unknown (not a git checkout)"
    if git.get("library_dirty"):
        where += " (nanoadam_jax/ has uncommitted changes)"
    m = env.get("machine") or {}
    return (
        f"- library: nanoadam_jax {env.get('nanoadam_jax')}, {where}\n"
        f"- machine: {m.get('cpu_model')}, {m.get('cpu_count')} CPU cores, {m.get('platform')}; "
        f"jax {env.get('jax')} ({env.get('backend')}), {m.get('device_count')} x "
        f"{m.get('device_kind')}; Python {env.get('python')}"
    )


def strict_json(x: Any) -> Any:
    """``x`` with every NaN/inf float replaced by ``None`` (strict JSON).

    Example:
      >>> strict_json({"a": [1.0, float("nan")], "b": (float("inf"),)})
      {'a': [1.0, None], 'b': [None]}
    """
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [strict_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(
    out: str | Path,
    name: str,
    title: str,
    table: str,
    results: dict[str, Any],
    t_start: float,
    plot: Callable[[dict[str, Any], Path], None] | None = None,
) -> None:
    """Write ``name.md`` (``# title``, ``table`` and the provenance lines), ``name.png``
    (``plot(results, path)``, if given) and ``name.json`` (``results`` with ``wall_seconds``
    since ``t_start`` set, NaN written as null), and say so.

    ``results["environment"]`` (set here from :func:`environment` if missing) gives the
    provenance of both files.

    Example:
      >>> import tempfile, time
      >>> with tempfile.TemporaryDirectory() as d:
      ...     write_results(d, "demo", "Demo", "| a |", {"x": 1}, time.perf_counter())
      ...     sorted(p.name for p in Path(d).iterdir())  # doctest: +ELLIPSIS
      ...     print(json.loads((Path(d) / "demo.json").read_text())["environment"]["git"])
      <BLANKLINE>
      Wrote .../demo.json and .md (0 s).
      ['demo.json', 'demo.md']
      {'commit': ..., 'library_dirty': ...}
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    env = results.setdefault("environment", environment())
    (out / f"{name}.md").write_text(f"# {title}\n\n{table}\n\n{provenance_md(env)}\n")
    if plot is not None:
        plot(results, out / f"{name}.png")
    results["wall_seconds"] = time.perf_counter() - t_start
    (out / f"{name}.json").write_text(json.dumps(strict_json(results), indent=2) + "\n")
    written = ", .md and .png" if plot is not None else " and .md"
    print(f"\nWrote {out / f'{name}.json'}{written} ({results['wall_seconds']:.0f} s).")
