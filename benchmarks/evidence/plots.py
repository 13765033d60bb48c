"""Matplotlib helpers of the experiments' figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_lr_curves(ax, tables: dict[str, dict], key: str = "test", title: str = "") -> None:
    for i, (name, t) in enumerate(tables.items()):
        lrs = list(t["rows"])
        m = np.array([100 * t["rows"][lr][key][0] for lr in lrs])
        s = np.array([100 * t["rows"][lr][key][1] for lr in lrs])
        ax.errorbar(lrs, m, yerr=s, fmt="-o", ms=4, capsize=3, color=f"C{i}", label=name)
        ax.plot([t["best_lr"]], [100 * t["best"][key][0]], "*", ms=14, color=f"C{i}")
    ax.set_xscale("log")
    ax.set(xlabel="learning rate", ylabel="accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _bars(ax, names, values, errs, ylabel, title, fmt="%.1f", ylim=None) -> None:
    x = np.arange(len(names))
    rects = ax.bar(x, values, yerr=errs, capsize=4, color=[f"C{i}" for i in range(len(names))])
    ax.bar_label(rects, fmt=fmt, fontsize=7, padding=2)
    ax.set_xticks(x, names, fontsize=7, rotation=15)
    ax.set(ylabel=ylabel, title=title)
    if ylim:
        ax.set_ylim(*ylim)
    ax.grid(axis="y", alpha=0.3)


def _zoom(values: Sequence[float], errs: Sequence[float]) -> tuple[float, float]:
    lo = min(v - e for v, e in zip(values, errs))
    hi = max(v + e for v, e in zip(values, errs))
    pad = max(0.5, 0.15 * (hi - lo))
    return max(0.0, lo - 3 * pad), min(100.0, hi + 2 * pad)
