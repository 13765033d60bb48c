"""Command-line helpers shared by the example scripts.

Every script builds its parser with :func:`parser`, whose help states each option's default
once: size flags (:func:`sized_adder`) name their full-run and ``--smoke`` values themselves,
other options get ``(default: X)`` appended, flags (``store_true``) none.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["HelpFormatter", "add_run_flags", "fill_sized_defaults", "parser", "sized_adder"]

#: The examples' folder; ``--out`` defaults to its ``results`` subfolder.
EXAMPLES_DIR = Path(__file__).resolve().parents[1]


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to an option's help, unless the help already states its default.

    Options whose default is ``None`` or ``False`` (size flags filled in later, ``store_true``
    flags) get nothing appended: their help says what happens when they are left out.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            "default" in text
            or not action.option_strings
            or action.default is None
            or action.default is False
            or action.default is argparse.SUPPRESS
        ):
            return action.help
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with :class:`HelpFormatter`.

    Example:
      >>> p = parser("demo.py", "A demo.")
      >>> _ = p.add_argument("--lr", type=float, default=0.1, help="learning rate")
      >>> "learning rate (default: 0.1)" in p.format_help()
      True
    """
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )


def add_run_flags(p: argparse.ArgumentParser, seed_help: str) -> None:
    """Add the flags every example has: ``--smoke``, ``--out``, ``--seed`` and ``--no-progress``."""
    p.add_argument("--smoke", action="store_true", help="tiny, fast run (for tests and CI)")
    p.add_argument(
        "--out",
        type=Path,
        default=EXAMPLES_DIR / "results",
        help="results folder (default: examples/results)",
    )
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bars (outside a terminal they are throttled to one update every 30 s)",
    )


def _shown(value: Any) -> Any:
    return "all" if value is None else value


def sized_adder(
    parser: argparse.ArgumentParser, full: dict[str, Any], smoke: dict[str, Any]
) -> Callable[[str, str, type, str], None]:
    """A function adding a size flag whose default depends on ``--smoke``.

    The flag's argparse default is None; :func:`fill_sized_defaults` later fills it from
    ``full`` or ``smoke``. Its help states both values (a None value, "all", reads as
    "all of them").

    Example:
      >>> p = parser("demo.py", "A demo.")
      >>> sized = sized_adder(p, {"steps": 300, "n": None}, {"steps": 4, "n": 64})
      >>> sized("--steps", "steps", int, "training steps")
      >>> sized("--n", "n", int, "training examples")
      >>> text = " ".join(p.format_help().split())
      >>> "training steps (default: 300; with --smoke: 4)" in text
      True
      >>> "training examples (default: all; with --smoke: 64)" in text
      True
    """

    def sized(flag: str, key: str, typ: type, help_: str) -> None:
        parser.add_argument(
            flag,
            type=typ,
            default=None,
            help=f"{help_} (default: {_shown(full[key])}; with --smoke: {_shown(smoke[key])})",
        )

    return sized


def fill_sized_defaults(
    args: argparse.Namespace, full: dict[str, Any], smoke: dict[str, Any]
) -> argparse.Namespace:
    """Fill the size flags left unset (None) from ``smoke`` under ``--smoke``, else ``full``."""
    for key, value in (smoke if args.smoke else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args
