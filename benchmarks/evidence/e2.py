"""E2: selection criteria at equal density, and a dynamic vs a static mask."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

import nanoadam_jax as nanoadam
from benchmarks.evidence.plots import _bars, _plot_lr_curves, _plt, _zoom
from benchmarks.evidence.runner import Runner
from benchmarks.evidence.settings import Variant
from benchmarks.evidence.shared import _grid, default_variant
from benchmarks.evidence.stats import compare, pct
from benchmarks.evidence.tasks.base import Task


def experiment_e2(runner: Runner, task: str = "vision") -> dict[str, Any]:
    s, sw = runner.s, runner.s.sweep(task)
    variants = {
        "smallest |w| (dynamic)": default_variant(sw),
        "random (dynamic)": Variant("nanoadam", criterion="random", mask_interval=sw.mask_interval),
        "largest |w| (dynamic)": Variant(
            "nanoadam", criterion="largest", mask_interval=sw.mask_interval
        ),
        "smallest |w| (static mask)": Variant("nanoadam", mask_interval=None),
    }
    tables = {name: _grid(runner, sw, v) for name, v in variants.items()}
    n = len(s.seeds)
    lines = [
        f"Density {s.densities[0]:g}, mask_interval {sw.mask_interval} (static: selected once at "
        f"step 0), refresh '{default_variant(sw).refresh_policy}', {sw.steps} steps. Each at its "
        "best LR (validation).",
        "",
        "| selection | best LR | test acc. (%) | old-task acc. after (%) | body weights changed |",
        "|---|---|---|---|---|",
    ]
    for name, t in tables.items():
        b = t["best"]
        lines.append(
            f"| {name} | {t['best_lr']:g} | {pct(b['test'])} | {pct(b['old'])} | "
            f"{100 * b['changed'][0]:.1f}% |"
        )
    t = {k: v["best"]["test"] for k, v in tables.items()}
    small, rand, large, static = (t[k] for k in variants)
    lines += [
        "",
        f"- {compare('smallest', small, 'random', rand, n)}.",
        f"- {compare('random', rand, 'largest', large, n)}.",
        f"- {compare('smallest', small, 'largest', large, n)}.",
        f"- {compare('dynamic', small, 'static', static, n)} (paper: dynamic wins by 1.8-2.7).",
        "- Paper: small > random > large at equal density.",
    ]
    plt = _plt()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    _plot_lr_curves(a1, tables, "test", "Test accuracy vs learning rate")
    names = list(tables)
    vals = [100 * tables[k]["best"]["test"][0] for k in names]
    errs = [100 * tables[k]["best"]["test"][1] for k in names]
    _bars(
        a2,
        [k.replace(" (", "\n(") for k in names],
        vals,
        errs,
        "test accuracy (%)",
        "At each one's best LR",
        "%.2f",
        _zoom(vals, errs),
    )
    fig.suptitle(f"E2: selection criterion and static vs dynamic mask ({n} seeds)")
    fig.tight_layout()
    diag = gradient_diagnostic(runner.task(task), s.densities[0])
    unit = runner.task(task).words["unit"]
    lines += [
        "",
        f"Why (diagnostic at the pretrained weights, gradient summed over {diag['images']} "
        f"training {unit} of the new task, density {s.densities[0]:g}, all sparse leaves pooled; "
        f"{100 * diag['all_zero_grad']:.1f}% of all sparse entries have an exactly zero "
        "gradient):",
        "",
        "| selection | selected entries with zero gradient | mean abs(g) of selected / mean abs(g) "
        "of all | mean abs(w) of selected / mean abs(w) of all |",
        "|---|---|---|---|",
    ]
    for crit, d in diag["criteria"].items():
        lines.append(
            f"| {crit} | {100 * d['zero_grad']:.1f}% | {d['rel_grad']:.2f} | {d['rel_w']:.2f} |"
        )
    return {
        "tables": tables,
        "gradient_diagnostic": diag,
        "markdown": "\n".join(lines),
        "figure": fig,
    }


def gradient_diagnostic(task: Task, density: float, images: int = 512) -> dict[str, Any]:
    """Gradients of the entries each criterion selects, at the pretrained weights.

    The paper's premise is that small weights receive large gradients during fine-tuning;
    this measures it on this model: the gradient is summed over ``images`` training
    examples (an exact zero there means zero for every one of them).
    """
    inputs, y = task.train
    n = min(images, len(y))
    grads = jax.jit(jax.grad(task.loss))(
        task.params, task.frozen, tuple(a[:n] for a in inputs), y[:n]
    )
    labels = jax.tree.leaves(task.body_labels())
    ws = [w for w, lab in zip(jax.tree.leaves(task.params), labels) if lab == nanoadam.SPARSE]
    gs = [g for g, lab in zip(jax.tree.leaves(grads), labels) if lab == nanoadam.SPARSE]
    all_g = np.concatenate([np.abs(np.asarray(g)).ravel() for g in gs])
    all_w = np.concatenate([np.abs(np.asarray(w)).ravel() for w in ws])
    out: dict[str, Any] = {"images": n, "all_zero_grad": float(np.mean(all_g == 0)), "criteria": {}}
    criteria = ("smallest", "random", "largest")

    @jax.jit  # one compilation: op by op, the many leaves of the text encoder take 10+ s
    def select(ws):
        return {
            crit: [
                nanoadam.select_mask(w, density, criterion=crit, key=jax.random.PRNGKey(i))
                for i, w in enumerate(ws)
            ]
            for crit in criteria
        }

    masks = jax.device_get(select(ws))
    for crit in criteria:
        sel_g, sel_w = [], []
        for w, g, m in zip(ws, gs, masks[crit]):
            sel_g.append(np.abs(np.asarray(g))[m])
            sel_w.append(np.abs(np.asarray(w))[m])
        sg, sw = np.concatenate(sel_g), np.concatenate(sel_w)
        out["criteria"][crit] = {
            "zero_grad": float(np.mean(sg == 0)),
            "rel_grad": float(np.mean(sg) / np.mean(all_g)),
            "rel_w": float(np.mean(sw) / np.mean(all_w)),
        }
    return out
