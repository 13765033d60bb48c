"""Progress bars for the example scripts that stay readable in log files.

In a terminal (or a notebook) :func:`progress` is an ordinary ``tqdm`` bar. When stderr is
not a terminal (``make demo > log 2>&1``, CI), tqdm would still write a line on every
update, so the bar is throttled to one refresh every :data:`LOG_INTERVAL_S` seconds (plus
the final one), and ``set_postfix`` no longer forces a refresh of its own.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "interactive", "progress"]

#: Seconds between two refreshes of a bar that writes into a file or pipe.
LOG_INTERVAL_S = 30.0


def interactive(stream: Any = None) -> bool:
    """Whether progress output is shown live: a terminal, or a notebook (tqdm widgets).

    Example:
      >>> import io
      >>> interactive(io.StringIO())
      False
    """
    if any(c.__module__ == "tqdm.notebook" for c in tqdm.__mro__):  # tqdm.auto chose widgets
        return True
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _LogFriendlyBar(tqdm):
    """A tqdm bar whose ``set_postfix`` respects ``mininterval`` outside a terminal."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        live = getattr(self, "_live", True)
        super().set_postfix(ordered_dict, refresh=refresh and live, **kwargs)


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    desc: str,
    total: int | None = None,
    enabled: bool = True,
) -> tqdm:
    """A progress bar over ``iterable`` (or of ``total`` steps): live in a terminal,
    throttled in logs, absent when ``enabled`` is False (``--no-progress``).

    Example:
      >>> sum(progress(range(3), desc="demo", enabled=False))
      3
    """
    live = interactive()
    bar = _LogFriendlyBar(
        iterable,
        desc=desc,
        total=total,
        disable=not enabled,
        dynamic_ncols=live,
        mininterval=0.1 if live else LOG_INTERVAL_S,
    )
    bar._live = live
    return bar
