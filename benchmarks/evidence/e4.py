"""E4: learning-rate tolerance, NanoAdam and AdamW over an LR grid."""

from __future__ import annotations

from typing import Any

from benchmarks.evidence.plots import _plot_lr_curves, _plt
from benchmarks.evidence.runner import Runner
from benchmarks.evidence.settings import ADAMW
from benchmarks.evidence.shared import _grid, default_variant
from benchmarks.evidence.stats import pct


def experiment_e4(runner: Runner, task: str = "vision") -> dict[str, Any]:
    s, sw = runner.s, runner.s.sweep(task)
    words = runner.task(task).words
    tables = {f"nanoadam d={d:g}": _grid(runner, sw, default_variant(sw), d) for d in s.densities}
    tables["adamw"] = _grid(runner, sw, ADAMW)
    reach = f"{100 * sw.reach:g}"
    reach_key = f"lrs_reaching_{reach}pct"
    lines = [
        f"Test accuracy (%) on {words['new']}, mean ± std over seeds, per learning rate "
        f"(NanoAdam: mask_interval {sw.mask_interval}, refresh "
        f"'{default_variant(sw).refresh_policy}'). **Bold**: the best LR on the validation split.",
        "",
        "| learning rate | " + " | ".join(tables) + " |",
        "|---|" + "---|" * len(tables),
    ]
    for lr in sw.lr_grid:
        cells = []
        for t in tables.values():
            row = t["rows"][lr]
            c = pct(row["test"]) + (f" ({row['diverged']} diverged)" if row["diverged"] else "")
            cells.append(f"**{c}**" if lr == t["best_lr"] else c)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    # tolerance: width of the LR range within 1 point of each method's best (validation)
    tol = {}
    grid = sorted(sw.lr_grid)
    for name, t in tables.items():
        rows, best = t["rows"], t["best_lr"]
        i = grid.index(best)
        tol[name] = {
            "best_lr": best,
            "lrs_within_1pt_of_best": [
                lr for lr, r in rows.items() if r["val"][0] >= t["best"]["val"][0] - 0.01
            ],
            reach_key: [lr for lr, r in rows.items() if r["val"][0] >= sw.reach],
            "drop_one_step_up": None
            if i + 1 >= len(grid)
            else t["best"]["test"][0] - rows[grid[i + 1]]["test"][0],
            "drop_one_step_down": None
            if i == 0
            else t["best"]["test"][0] - rows[grid[i - 1]]["test"][0],
        }

    def drop(x):
        return "-" if x is None else f"{100 * x:.2f}"

    def lrs(xs):
        return ", ".join(f"{x:g}" for x in xs) or "none"

    lines += [
        "",
        "| method | best LR | LRs within 1 point of its best (val.) | "
        f"LRs reaching {reach}% (val.) | test drop one grid step above the best | one step below |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in tol.items():
        lines.append(
            f"| {name} | {v['best_lr']:g} | {lrs(v['lrs_within_1pt_of_best'])} | "
            f"{lrs(v[reach_key])} | {drop(v['drop_one_step_up'])} | "
            f"{drop(v['drop_one_step_down'])} |"
        )
    nano, adamw = tables[f"nanoadam d={s.densities[0]:g}"], tables["adamw"]
    ratio = nano["best_lr"] / adamw["best_lr"]
    top = grid[-1]
    lines += [
        "",
        f"- Best LR: NanoAdam {nano['best_lr']:g} vs AdamW {adamw['best_lr']:g} "
        f"(ratio {ratio:.3g}; paper: NanoAdam prefers a higher LR, about 10x on vision).",
        f"- At the largest LR of the grid ({top:g}): NanoAdam {pct(nano['rows'][top]['test'])} vs "
        f"AdamW {pct(adamw['rows'][top]['test'])}; at the smallest ({grid[0]:g}): NanoAdam "
        f"{pct(nano['rows'][grid[0]]['test'])} vs AdamW {pct(adamw['rows'][grid[0]]['test'])}.",
    ]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_lr_curves(a1, tables, "test", f"New task ({words['new']}) test accuracy")
    if all(t["best"]["old"] is not None for t in tables.values()):
        _plot_lr_curves(a2, tables, "old", f"Old task ({words['old']}) accuracy after")
    fig.suptitle(f"E4: learning-rate tolerance ({len(s.seeds)} seeds, ★ = best LR on validation)")
    fig.tight_layout()
    return {"tables": tables, "tolerance": tol, "markdown": "\n".join(lines), "figure": fig}
