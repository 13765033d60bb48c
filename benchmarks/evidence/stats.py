"""Statistics of the runs: mean and std over seeds, per-LR tables, verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs]
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0


def pct(ms: tuple[float, float]) -> str:
    return f"{100 * ms[0]:.2f} ± {100 * ms[1]:.2f}"


def by_lr(runs: list[dict[str, Any]], density: float | None = None) -> dict[float, list[dict]]:
    out: dict[float, list[dict]] = {}
    for r in runs:
        if density is not None and r["density"] is not None and abs(r["density"] - density) > 1e-9:
            continue
        out.setdefault(r["lr"], []).append(r)
    return dict(sorted(out.items()))


def lr_table(runs: list[dict[str, Any]], density: float | None = None) -> dict[str, Any]:
    """Per learning rate: mean +- std of val/test/old accuracy; the best LR (on validation)."""
    rows = {}
    for lr, rs in by_lr(runs, density).items():
        rows[lr] = {
            "val": mean_std([r["val_acc"] for r in rs]),
            "test": mean_std([r["test_acc"] for r in rs]),
            "old": mean_std([r["old_task_acc"] for r in rs])
            if rs[0]["old_task_acc"] is not None
            else None,
            "forgetting": None,
            "diverged": sum(r["diverged"] for r in rs),
            "changed": mean_std([r["body_changed_fraction"] for r in rs]),
            "n": len(rs),
        }
    best = max(rows, key=lambda lr: (rows[lr]["val"][0], -lr))  # ties: the smaller LR
    return {"rows": rows, "best_lr": best, "best": rows[best]}


def compare(name_a: str, a: tuple, name_b: str, b: tuple, n: int) -> str:
    """A plain verdict on two (mean, std) accuracies over ``n`` seeds each."""
    diff = a[0] - b[0]
    se = math.sqrt((a[1] ** 2 + b[1] ** 2) / max(n, 1))
    sig = abs(diff) / se if se > 0 else math.inf
    if abs(diff) < 2 * se or diff == 0:
        return (
            f"{name_a} ≈ {name_b} ({100 * diff:+.2f} pts, within 2 standard errors: "
            "no clear difference)"
        )
    rel = ">" if diff > 0 else "<"
    return f"{name_a} {rel} {name_b} ({100 * diff:+.2f} pts, {sig:.1f} standard errors)"
