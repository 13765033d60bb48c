"""E3: moments at a refresh (``keep`` vs ``reset``), with and without bias correction, over
several ``mask_interval`` values."""

from __future__ import annotations

from typing import Any

from benchmarks.evidence.plots import _plot_lr_curves, _plt
from benchmarks.evidence.runner import Runner
from benchmarks.evidence.settings import Variant
from benchmarks.evidence.shared import _grid, _neighbour_lrs, default_variant
from benchmarks.evidence.stats import compare, lr_table, pct


def experiment_e3(runner: Runner, task: str = "vision") -> dict[str, Any]:
    s, sw = runner.s, runner.s.sweep(task)
    lrs = _neighbour_lrs(s, sw, _grid(runner, sw, default_variant(sw))["best_lr"])
    tables: dict[str, dict[str, Any]] = {}
    for m in sw.mask_intervals:
        for policy in ("reset", "keep"):
            for bc in (True, False):
                v = Variant("nanoadam", refresh_policy=policy, mask_interval=m, bias_correction=bc)
                runs = runner.runs(task, v, lrs if v != default_variant(sw) else sw.lr_grid)
                runs = [r for r in runs if r["lr"] in lrs]
                tables[f"{policy}{'' if bc else ' no-bc'} m={m}"] = lr_table(runs, s.densities[0])
    static = [
        r
        for r in runner.runs(
            task, Variant("nanoadam", mask_interval=None), sw.lr_grid, (s.densities[0],)
        )
        if r["lr"] in lrs
    ]
    tables[f"static (m>{sw.steps})"] = lr_table(static, s.densities[0])
    n = len(s.seeds)
    lines = [
        f"Density {s.densities[0]:g}, {sw.steps} steps; LRs {', '.join(f'{x:g}' for x in lrs)} "
        f"(the default configuration's best LR and its neighbours); each cell at its best LR "
        "(validation). Test accuracy (%):",
        "",
        "| mask_interval | refreshes in the run | reset | keep (default) | keep - reset "
        "| reset, no bias correction | keep, no bias correction |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(t: dict[str, Any]) -> str:
        return f"{pct(t['best']['test'])} (lr {t['best_lr']:g})"

    for m in sw.mask_intervals:
        r, kp = tables[f"reset m={m}"], tables[f"keep m={m}"]
        lines.append(
            f"| {m} | {-(-sw.steps // m) - 1} | {cell(r)} | {cell(kp)} | "
            f"{100 * (kp['best']['test'][0] - r['best']['test'][0]):+.2f} | "
            f"{cell(tables[f'reset no-bc m={m}'])} | {cell(tables[f'keep no-bc m={m}'])} |"
        )
    st = tables[f"static (m>{sw.steps})"]
    lines.append(f"| static (> {sw.steps}) | 0 | {cell(st)} | same | 0 | - | - |")
    for policy in ("reset", "keep"):
        means = [tables[f"{policy} m={m}"]["best"]["test"][0] for m in sw.mask_intervals]
        lines.append(
            f"- {policy}: spread over mask_interval {sw.mask_intervals}: "
            f"{100 * (max(means) - min(means)):.2f} pts (paper: < 0.5 pts for m in 10-1500)."
        )
    for m in sw.mask_intervals:
        r, kp = tables[f"reset m={m}"], tables[f"keep m={m}"]
        lines.append(
            f"- m={m}: {compare('keep', kp['best']['test'], 'reset', r['best']['test'], n)}."
        )
    for policy in ("reset", "keep"):
        for m in sw.mask_intervals:
            on, off = tables[f"{policy} m={m}"], tables[f"{policy} no-bc m={m}"]
            verdict = compare(
                "no bias correction", off["best"]["test"], "with", on["best"]["test"], n
            )
            lines.append(f"- {policy}, m={m}: {verdict}.")
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    xs = list(sw.mask_intervals)
    for j, policy in enumerate(("reset", "keep", "reset no-bc", "keep no-bc")):
        m_ = [100 * tables[f"{policy} m={m}"]["best"]["test"][0] for m in xs]
        e_ = [100 * tables[f"{policy} m={m}"]["best"]["test"][1] for m in xs]
        ls = "-o" if "no-bc" not in policy else "--s"
        a1.errorbar(xs, m_, yerr=e_, fmt=ls, capsize=3, color=f"C{j}", label=policy)
    a1.axhline(100 * st["best"]["test"][0], color="C7", ls="--", label="static mask")
    a1.set_xscale("log")
    a1.set(xlabel="mask_interval", ylabel="test accuracy (%)", title="At each one's best LR")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    _plot_lr_curves(a2, tables, "test", "Test accuracy vs learning rate")
    fig.suptitle(f"E3: moments at a refresh and mask_interval ({n} seeds)")
    fig.tight_layout()
    return {"tables": tables, "lrs": lrs, "markdown": "\n".join(lines), "figure": fig}
