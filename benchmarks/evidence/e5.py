"""E5: forgetting of the old task, NanoAdam at two densities vs AdamW; the rounding of ``k``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

import nanoadam_jax as nanoadam
from benchmarks.evidence.plots import _plt
from benchmarks.evidence.runner import Runner
from benchmarks.evidence.settings import ADAMW
from benchmarks.evidence.shared import _grid, _neighbour_lrs, default_variant
from benchmarks.evidence.stats import compare, lr_table, pct
from benchmarks.evidence.tasks.base import Task


def rounding_table(task: Task, densities: Sequence[float]) -> list[dict[str, Any]]:
    """Per leaf: its label, size, chunk length and the entries NanoAdam trains at each density
    (:func:`nanoadam_jax.plan`, the library's own sizing: ``k`` per chunk times chunks)."""
    plans = {d: nanoadam.plan(task.params, density=d, show=False) for d in densities}
    by_path = {d: {leaf.path: leaf for leaf in p.leaves} for d, p in plans.items()}
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(task.params)[0]:
        key = jax.tree_util.keystr(path)
        first = by_path[densities[0]][key]
        row = {
            "leaf": "/".join(nanoadam.path_names(path)),
            "label": first.label,
            "n": int(leaf.size),
            "chunk": first.chunk,
            "chunks": first.chunks,
        }
        for d in densities:
            row[f"k at d={d:g}"] = by_path[d][key].trained
        rows.append(row)
    return rows


def experiment_e5(runner: Runner, task_name: str = "vision") -> dict[str, Any]:
    s, sw = runner.s, runner.s.sweep(task_name)
    task = runner.task(task_name)
    words = task.words
    tables = {f"nanoadam d={d:g}": _grid(runner, sw, default_variant(sw), d) for d in s.densities}
    diag_lrs: list[float] = []
    if task.shared_head:
        # Diagnostic: is the forgetting due to the densely updated head (shared by both tasks)?
        # Only on the default's best LR and its neighbours, like e3.
        head_sparse = f"nanoadam d={s.densities[0]:g}, head sparse too (diagnostic)"
        diag_lrs = _neighbour_lrs(s, sw, tables[f"nanoadam d={s.densities[0]:g}"]["best_lr"])
        diag_variant = dataclasses.replace(default_variant(sw), dense_head=False)
        tables[head_sparse] = lr_table(runner.runs(task_name, diag_variant, diag_lrs))
    tables["adamw"] = _grid(runner, sw, ADAMW)
    before = runner.base_accuracy(task_name)
    n = len(s.seeds)
    lines = [
        f"Old task: {words['old']} ({100 * before['old']:.2f}% before fine-tuning); new task: "
        f"{words['new']} ({100 * before['new']:.2f}% before). mask_interval {sw.mask_interval}, "
        "each method at its best LR for the NEW task (validation); forgetting = old-task "
        "accuracy before - after.",
        "",
        "| method | best LR | new task (%) | old task after (%) | forgetting (pts) |",
        "|---|---|---|---|---|",
    ]
    forgetting = {}
    for name, t in tables.items():
        f = (before["old"] - t["best"]["old"][0], t["best"]["old"][1])
        forgetting[name] = f
        lines.append(
            f"| {name} | {t['best_lr']:g} | {pct(t['best']['test'])} | {pct(t['best']['old'])} | "
            f"{100 * f[0]:.2f} ± {100 * f[1]:.2f} |"
        )
    names = list(tables)
    lines.append("")
    if diag_lrs:
        lines.append(
            f"- The diagnostic (head sparse too, so the 10-class head shared by both tasks only "
            f"moves on {s.densities[0]:g} of its entries) ran on LRs "
            f"{', '.join(f'{x:g}' for x in diag_lrs)} only."
        )
    else:
        lines.append(
            f"- Each task has its own head: the {words['old']} head is frozen, so all forgetting "
            "comes from the shared encoder."
        )
    for name in names:
        if name == "adamw":
            continue
        verdict = compare(
            name, tables[name]["best"]["test"], "adamw", tables["adamw"]["best"]["test"], n
        )
        lines.append(
            f"- {name}: new task {verdict}; "
            f"forgetting {100 * forgetting[name][0]:.2f} vs AdamW "
            f"{100 * forgetting['adamw'][0]:.2f} pts."
        )
    # Equal new-task accuracy: among the LRs whose mean new-task validation accuracy reaches a
    # threshold, the one that keeps the old task best.
    matched: dict[str, dict[str, Any]] = {}
    lines += [
        "",
        "At equal new-task accuracy (paper's claim: far less forgetting at equal or better "
        "new-task accuracy): among the LRs whose mean new-task *validation* accuracy reaches "
        "the threshold, the one with the best old-task accuracy; test numbers (%).",
        "",
        "| threshold | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for thr in sw.matched_thresholds:
        cells = []
        for name in names:
            rows = tables[name]["rows"]
            ok = [lr for lr, r in rows.items() if r["val"][0] >= thr]
            if not ok:
                cells.append("not reached")
                continue
            lr = max(ok, key=lambda x: rows[x]["old"][0])
            matched.setdefault(f"{thr:g}", {})[name] = {"lr": lr, **rows[lr]}
            cells.append(
                f"new {100 * rows[lr]['test'][0]:.1f}, old {pct(rows[lr]['old'])} (lr {lr:g})"
            )
        lines.append(f"| new task ≥ {100 * thr:g}% | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Rounding of k (library rule): a sparse leaf is cut into chunks of C <= 16384 entries "
        "(`nanoadam_jax.layout`) and each chunk trains `k = clip(round_half_up(d * C), 1, C)` "
        "entries, computed in float32 (`nanoadam_jax.num_selected`); the table gives the total "
        "per leaf (`nanoadam_jax.plan`). Dense leaves (head, norms) are updated in full. On this "
        f"{words['model']}:",
        "",
        "| leaf | label | n | chunk x chunks | "
        + " | ".join(f"k at d={d:g}" for d in s.densities)
        + " |",
        "|---|---|---|---|" + "---|" * len(s.densities),
    ]
    rtab = rounding_table(task, s.densities)
    for row in rtab:
        ks = " | ".join(str(row[f"k at d={d:g}"]) for d in s.densities)
        chunks = f"{row['chunk']:,} x {row['chunks']}" if row["chunk"] else "-"
        lines.append(f"| {row['leaf']} | {row['label']} | {row['n']:,} | {chunks} | {ks} |")
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(names))
    w = 0.38
    for j, (key, lab) in enumerate(
        (("test", f"new task ({words['new']})"), ("old", "old task after"))
    ):
        v = [100 * tables[k]["best"][key][0] for k in names]
        e = [100 * tables[k]["best"][key][1] for k in names]
        rects = a1.bar(x + (j - 0.5) * w, v, w, yerr=e, capsize=3, label=lab, color=f"C{j}")
        a1.bar_label(rects, fmt="%.1f", fontsize=7, padding=2)
    a1.axhline(100 * before["old"], color="C7", ls="--", label="old task before")
    a1.set_xticks(x, [k.replace(", ", ",\n") for k in names], fontsize=7)
    a1.set(ylabel="accuracy (%)", ylim=(0, 105), title="At each method's best LR (new task)")
    a1.legend(fontsize=8, loc="lower left")
    for j, name in enumerate(names):
        rows = tables[name]["rows"]
        a2.plot(
            [100 * rows[lr]["test"][0] for lr in rows],
            [100 * rows[lr]["old"][0] for lr in rows],
            "-o",
            color=f"C{j}",
            label=name,
        )
        for lr in rows:
            a2.annotate(
                f"{lr:g}",
                (100 * rows[lr]["test"][0], 100 * rows[lr]["old"][0]),
                fontsize=6,
                alpha=0.7,
            )
    a2.set(
        xlabel="new task accuracy (%)",
        ylabel="old task accuracy after (%)",
        title="Every LR of the grid (labels: LR)",
    )
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.suptitle(f"E5: forgetting, {words['model']} fine-tuned on {words['new']} ({n} seeds)")
    fig.tight_layout()
    return {
        "tables": tables,
        "forgetting": forgetting,
        "before": before,
        "rounding": rtab,
        "matched": matched,
        "markdown": "\n".join(lines),
        "figure": fig,
    }
