"""E1: NanoAdam (library defaults) vs full AdamW fine-tuning; its text part (``text``)."""

from __future__ import annotations

import statistics
from typing import Any

import jax

from benchmarks.evidence.plots import _bars, _plot_lr_curves, _plt, _zoom
from benchmarks.evidence.runner import Runner
from benchmarks.evidence.settings import ADAMW
from benchmarks.evidence.shared import _grid, default_variant, state_bytes, time_steps
from benchmarks.evidence.stats import compare, lr_table, pct


def experiment_e1(runner: Runner, with_text: bool) -> dict[str, Any]:
    s = runner.s
    sw = s.sweep("vision")
    task = runner.task("vision")
    nano = _grid(runner, sw, default_variant(sw))
    adamw = _grid(runner, sw, ADAMW)
    before = runner.base_accuracy("vision")
    sb = state_bytes(task, s, s.mask_interval)
    timing = time_steps(task, s)
    grid_cpu = {
        # the fastest call: the first call of a configuration also compiles it
        name: min(r["call_cpu_s_per_run_step"] for r in runner.runs("vision", v, s.lr_grid))
        for name, v in (("nanoadam", default_variant(sw)), ("adamw", ADAMW))
    }
    grid_ratio = grid_cpu["nanoadam"] / grid_cpu["adamw"]
    n = len(s.seeds)
    dname = f"nanoadam d={s.densities[0]:g}"
    lines = [
        f"Vision: pretrained MNIST CNN ({sum(x.size for x in jax.tree.leaves(task.params)):,} "
        f"parameters) fine-tuned on rotated MNIST, {s.steps} steps of batch {s.batch_size} on "
        f"{task.info['train']} images; before fine-tuning: {100 * before['new']:.1f}% rotated, "
        f"{100 * before['old']:.1f}% upright. Each method at its best LR (validation).",
        "",
        "| method | best LR | test acc. (%) | optimizer state | step time (wall / CPU) |",
        "|---|---|---|---|---|",
    ]
    for label, name, t, key in (
        (f"{dname}, mask_interval {s.mask_interval}", dname, nano, "nanoadam"),
        ("adamw", "adamw", adamw, "adamw"),
    ):
        ts = timing["per_step"][key]
        lines.append(
            f"| {label} | {t['best_lr']:g} | {pct(t['best']['test'])} | "
            f"{sb[name] / 1024:,.1f} KiB | {ts['wall_ms']:.1f} / {ts['cpu_ms']:.1f} ms |"
        )
    verdict = compare("NanoAdam", nano["best"]["test"], "AdamW", adamw["best"]["test"], n)
    lines += [
        "",
        f"- Accuracy: {verdict}.",
        f"- Optimizer state: NanoAdam {sb[dname] / sb['adamw']:.3f}x AdamW's "
        f"({sb[dname]:,} vs {sb['adamw']:,} bytes; parameters {sb['params']:,} bytes).",
        f"- Step time: NanoAdam / AdamW = {timing['ratio_wall']:.2f} (wall), "
        f"{timing['ratio_cpu']:.2f} (CPU), single run, medians of {s.timing_rounds} interleaved "
        "rounds on a shared machine (paper: 1.4-2.3x on GLUE with their PyTorch code).",
        f"- Inside the vmapped grid (CPU per run-step of the fastest call, evaluation included, "
        f"{s.vmap_chunk} runs per call, the density traced per run) the ratio is "
        f"{grid_ratio:.2f}.",
    ]
    result: dict[str, Any] = {
        "vision": {
            "nanoadam": nano,
            "adamw": adamw,
            "before": before,
            "state_bytes": sb,
            "timing": timing,
            "grid_cpu_s_per_run_step": grid_cpu,
        },
    }
    text = experiment_text(runner) if with_text else None
    if text is not None:
        result["text"] = text
        lines += ["", text["markdown"]]
    plt = _plt()
    ncols = 4 if text else 3
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 4.2))
    names = [dname, "adamw"]
    vals = [100 * nano["best"]["test"][0], 100 * adamw["best"]["test"][0]]
    errs = [100 * nano["best"]["test"][1], 100 * adamw["best"]["test"][1]]
    _bars(
        axes[0],
        names,
        vals,
        errs,
        "test accuracy (%)",
        "Vision: rotated MNIST",
        "%.2f",
        _zoom(vals, errs),
    )
    kib = [sb[dname] / 1024, sb["adamw"] / 1024]
    _bars(axes[1], names, kib, [0, 0], "KiB", "Optimizer state (vision)", "%.0f")
    ms = [timing["per_step"][k]["wall_ms"] for k in ("nanoadam", "adamw")]
    _bars(axes[2], names, ms, [0, 0], "ms / step (wall)", "Step time (vision, CPU)", "%.1f")
    if text:
        tv = [100 * text["nanoadam"]["best"]["test"][0], 100 * text["adamw"]["best"]["test"][0]]
        te = [100 * text["nanoadam"]["best"]["test"][1], 100 * text["adamw"]["best"]["test"][1]]
        _bars(
            axes[3],
            names,
            tv,
            te,
            "test accuracy (%)",
            "Text: Rotten Tomatoes (MiniLM)",
            "%.2f",
            _zoom(tv, te),
        )
    fig.suptitle(f"E1: NanoAdam (defaults) vs AdamW, each at its best LR, {n} seeds")
    fig.tight_layout()
    result.update(markdown="\n".join(lines), figure=fig)
    return result


def experiment_text(runner: Runner, figure: bool = False) -> dict[str, Any]:
    """E1 on the text task: part of e1 (``--task vision``), or e1 itself (``--task text``)."""
    s, sw = runner.s, runner.s.sweep("text")
    task = runner.task("text")
    variant = default_variant(sw)
    nano = lr_table(runner.runs("text", variant, sw.lr_grid, (s.densities[0],)))
    adamw = lr_table(runner.runs("text", ADAMW, sw.lr_grid))
    sb = state_bytes(task, s, sw.mask_interval)
    per_step = {
        name: statistics.median(r["call_cpu_s_per_run_step"] for r in t_runs)
        for name, t_runs in (
            ("nanoadam", runner.runs("text", variant, sw.lr_grid, (s.densities[0],))),
            ("adamw", runner.runs("text", ADAMW, sw.lr_grid)),
        )
    }
    dname = f"nanoadam d={s.densities[0]:g}"
    n = len(s.seeds)
    lines = [
        f"Text: all-MiniLM-L6-v2 truncated to {s.text_layers} layer(s) "
        f"({sum(x.size for x in jax.tree.leaves(task.params)):,} trained parameters; the "
        f"{task.frozen['encoder']['embeddings']['word_embeddings']['embedding'].size:,}-entry "
        "word-embedding table is frozen for both methods to fit the CPU budget) + new head, "
        f"Rotten Tomatoes, sequence length {s.text_seq_len}, {s.text_steps} steps of batch "
        f"{s.text_batch_size} on {task.info['train']} reviews, test on {task.info['test']} "
        f"(majority class {100 * task.info['majority_test']:.1f}%). NanoAdam mask_interval "
        f"{sw.mask_interval}. LR grid {', '.join(f'{x:g}' for x in sw.lr_grid)}.",
        "",
        "| method | best LR | test acc. (%) | optimizer state | CPU s per run-step (vmapped) |",
        "|---|---|---|---|---|",
        f"| {dname} | {nano['best_lr']:g} | {pct(nano['best']['test'])} | "
        f"{sb[dname] / 2**20:,.1f} MiB | {per_step['nanoadam']:.3f} |",
        f"| adamw | {adamw['best_lr']:g} | {pct(adamw['best']['test'])} | "
        f"{sb['adamw'] / 2**20:,.1f} MiB | {per_step['adamw']:.3f} |",
        "",
        "Test accuracy (%) per learning rate:",
        "",
        "| learning rate | " + dname + " | adamw |",
        "|---|---|---|",
    ]
    for lr in sw.lr_grid:
        lines.append(
            f"| {lr:g} | {pct(nano['rows'][lr]['test'])} | {pct(adamw['rows'][lr]['test'])} |"
        )
    verdict = compare("NanoAdam", nano["best"]["test"], "AdamW", adamw["best"]["test"], n)
    lines += [
        "",
        f"- Accuracy: {verdict}.",
        f"- Optimizer state: NanoAdam {sb[dname] / sb['adamw']:.3f}x AdamW's.",
        f"- CPU time per run-step inside the vmapped grid (evaluation included): NanoAdam / AdamW "
        f"= {per_step['nanoadam'] / per_step['adamw']:.2f}.",
    ]
    result = {
        "nanoadam": nano,
        "adamw": adamw,
        "state_bytes": sb,
        "cpu_s_per_run_step": per_step,
        "info": task.info,
        "markdown": "\n".join(lines),
    }
    if figure:
        plt = _plt()
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        vals = [100 * t["best"]["test"][0] for t in (nano, adamw)]
        errs = [100 * t["best"]["test"][1] for t in (nano, adamw)]
        _bars(a1, [dname, "adamw"], vals, errs, "test accuracy (%)", "At each one's best LR",
              "%.2f", _zoom(vals, errs))  # fmt: skip
        _plot_lr_curves(a2, {dname: nano, "adamw": adamw}, "test", "Test accuracy vs LR")
        fig.suptitle(f"E1: NanoAdam (d={s.densities[0]:g}) vs AdamW on Rotten Tomatoes ({n} seeds)")
        fig.tight_layout()
        result["figure"] = fig
    return result
