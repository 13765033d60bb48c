"""Command-line helpers shared by the example scripts."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def sized_adder(
    parser: argparse.ArgumentParser, full: dict[str, Any], smoke: dict[str, Any]
) -> Callable[[str, str, type, str], None]:
    """A function adding a size flag whose default depends on ``--smoke``.

    The flag defaults to None; :func:`fill_sized_defaults` later fills it from ``full`` or
    ``smoke``. Its help text shows both defaults.
    """

    def sized(flag: str, key: str, typ: type, help_: str) -> None:
        parser.add_argument(
            flag,
            type=typ,
            default=None,
            help=f"{help_} (default: {full[key]}; with --smoke: {smoke[key]})",
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
