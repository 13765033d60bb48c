"""The command line: ``python -m benchmarks.evidence [--experiment ...] [--task ...]``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import assets

from benchmarks.common import machine_info
from benchmarks.evidence.e1 import experiment_e1, experiment_text
from benchmarks.evidence.e2 import experiment_e2
from benchmarks.evidence.e3 import experiment_e3
from benchmarks.evidence.e4 import experiment_e4
from benchmarks.evidence.e5 import experiment_e5
from benchmarks.evidence.plots import _plt
from benchmarks.evidence.runner import Runner, library_hash
from benchmarks.evidence.settings import (
    ADAMW_WEIGHT_DECAY,
    DEFAULT_OUT,
    DEFAULT_OUT_TEXT,
    EXPERIMENTS,
    FULL,
    OLD_TEXT_ASSETS,
    OPT_IN,
    OPT_IN_OUT,
    REPO,
    SMOKE,
    TASKS,
    TEXT,
    TEXT_ASSETS,
    TEXT_SMOKE,
    VISION_ASSETS,
    Settings,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.evidence",
        description="NanoAdam vs AdamW and the paper's ablations on real pretrained models "
        "(CPU, offline). Writes JSON, PNG and summary.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--experiment",
        default="all",
        help=f"comma-separated subset of {','.join(EXPERIMENTS)}, or 'all'; or, alone, one of "
        f"the opt-in {', '.join(OPT_IN)} (e3long: long-run E3 on vision -> "
        f"{OPT_IN_OUT['e3long'].relative_to(REPO)}; e6: the whole MiniLM-L6 on the full Rotten "
        f"Tomatoes training split -> {OPT_IN_OUT['e6'].relative_to(REPO)})",
    )
    p.add_argument(
        "--task",
        choices=TASKS,
        default="vision",
        help="model and data of the experiments (text: MiniLM on Rotten Tomatoes, old task BBC "
        "News; e1 is then the text comparison)",
    )
    p.add_argument("--smoke", action="store_true", help="every experiment in a few steps")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    p.add_argument("--no-text", action="store_true", help="skip the text part of e1")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default: {DEFAULT_OUT.relative_to(REPO)}, or "
        f"{DEFAULT_OUT_TEXT.relative_to(REPO)} with --task text)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    args = p.parse_args(argv)
    names = (
        EXPERIMENTS
        if args.experiment == "all"
        else tuple(x.strip() for x in args.experiment.split(",") if x.strip())
    )
    bad = [x for x in names if x not in EXPERIMENTS + OPT_IN]
    if bad or not names:
        p.error(
            f"--experiment: unknown {bad}; choose from {EXPERIMENTS} or 'all', or one of the "
            f"opt-in {OPT_IN}"
        )
    if any(x in OPT_IN for x in names) and len(names) > 1:
        p.error(f"--experiment: {' and '.join(OPT_IN)} run alone (each has its results folder)")
    if args.no_text:
        names = tuple(x for x in names if x != "text")
    args.experiments = names
    if args.seeds is not None and args.seeds < 1:
        p.error("--seeds must be >= 1")
    if args.out is None:
        args.out = DEFAULT_OUT_TEXT if args.task == "text" else DEFAULT_OUT
        if names[0] in OPT_IN:
            args.out = OPT_IN_OUT[names[0]]
    if names[0] in OPT_IN and args.task != "vision":
        p.error(f"--experiment {names[0]} has its own task: drop --task")
    return args


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items() if k != "figure"}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.experiments[0] in OPT_IN:
        return main_opt_in(args, argv)
    task = args.task
    settings = {
        ("vision", False): FULL,
        ("vision", True): SMOKE,
        ("text", False): TEXT,
        ("text", True): TEXT_SMOKE,
    }[task, args.smoke]
    if args.seeds is not None:
        settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
    if task == "text":
        need = [*TEXT_ASSETS, *OLD_TEXT_ASSETS]
    else:
        need = list(VISION_ASSETS) + (list(TEXT_ASSETS) if "text" in args.experiments else [])
    missing = assets.missing_assets(*need)
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runner = Runner(settings, out, progress=not args.quiet)
    w0, c0 = time.perf_counter(), time.process_time()
    machine = machine_info()
    try:
        from benchmarks.run import git_revision

        machine["git"] = git_revision()
    except Exception:  # pragma: no cover - git missing
        machine["git"] = None
    command = " ".join(
        ["python -m benchmarks.evidence", *(sys.argv[1:] if argv is None else list(argv))]
    )
    order = ("e4", "e1", "e5", "e2", "e3")
    results: dict[str, Any] = {}
    for name in order:
        if name not in args.experiments and not (name == "e1" and "text" in args.experiments):
            continue
        runner.used = set()
        if not args.quiet:
            print(f"[{name}]", flush=True)
        if name == "e1":
            if task == "text":
                res = experiment_text(runner, figure=True)
            elif "e1" in args.experiments:
                res = experiment_e1(runner, with_text="text" in args.experiments)
            else:  # text alone
                res = {"text": experiment_text(runner)}
                res["markdown"] = res["text"]["markdown"]
        else:
            res = {
                "e2": experiment_e2,
                "e3": experiment_e3,
                "e4": experiment_e4,
                "e5": experiment_e5,
            }[name](runner, task)
        used, runner.used = runner.used, set()
        fig = res.pop("figure", None)
        if fig is not None:
            fig.savefig(out / f"{name}.png", dpi=110)
            _plt().close(fig)
        payload = {
            "experiment": name,
            "settings": dataclasses.asdict(settings),
            "machine": machine,
            "command": command,
            "results": res,
            "runs": [runner.cache[k] for k in sorted(used)],
        }
        (out / f"{name}.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
        results[name] = res
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    summary = _summary_md(settings, machine, command, results, runner, wall, cpu, args.smoke, task)
    (out / "summary.md").write_text(summary)
    if not args.quiet:
        print(summary)
        print(f"Wrote {out} ({wall:.0f} s wall, {cpu:.0f} s CPU).")
    return {"results": _jsonable(results), "wall_s": wall, "cpu_s": cpu, "out": str(out)}


def _cached_cpu(runner: Runner) -> float:
    s = runner.s
    steps = {"vision": s.steps, "text": s.text_steps}
    return sum(r["call_cpu_s_per_run_step"] * steps[r["task"]] for r in runner.cache.values())


def _protocol(s: Settings, task: str) -> str:
    """The task's part of the summary's protocol line."""
    if task == "vision":
        return (
            f"Vision: {s.steps} steps, batch {s.batch_size}, {s.train_examples} training / "
            f"{s.val_examples} validation / {s.test_examples} test images, LR grid "
            f"{', '.join(f'{x:g}' for x in s.lr_grid)}."
        )
    return (
        f"Text: all-MiniLM-L6-v2 truncated to {s.text_layers} layer(s) (word-embedding table "
        f"frozen) + new 2-class head, {s.text_steps} steps, batch {s.text_batch_size}, sequence "
        f"length {s.text_seq_len}, {s.text_train_examples} training / {s.text_val_examples} "
        f"validation / {s.text_test_examples} test reviews (Rotten Tomatoes), LR grid "
        f"{', '.join(f'{x:g}' for x in s.text_lr_grid)}, NanoAdam mask_interval "
        f"{s.text_mask_interval} (e3: {', '.join(map(str, s.text_mask_intervals))}). Old task: "
        f"BBC News, {s.text_old_examples} held-out articles; its 5-topic head is a logistic "
        f"regression ({s.text_old_head_steps} Adam steps) on the frozen pretrained encoder's "
        f"features of {s.text_old_train_examples} other articles, kept frozen."
    )


def _summary_md(settings, machine, command, results, runner, wall, cpu, smoke, task) -> str:
    s = settings
    lines = [
        "# Evidence: NanoAdam vs AdamW and the paper's ablations"
        + (" (text task: MiniLM on Rotten Tomatoes, BBC News)" if task == "text" else "")
        + (" (SMOKE RUN)" if smoke else ""),
        "",
        f"- Command: `{command}`",
        f"- Date: {machine['date']}",
        f"- Machine: {machine['processor']}, {machine['cpus_available']} CPU core(s) available "
        f"({machine['cpu_count']} on the host), shared with other jobs; backend "
        f"{machine['backend']} ({machine['device_kind']}); {machine['platform']}",
        f"- Versions: jax {machine['jax']}, jaxlib {machine['jaxlib']}, optax {machine['optax']}, "
        f"flax {machine['flax']}, nanoadam_jax {machine['nanoadam_jax']}, python "
        f"{machine['python']}"
        + (f"; git {str(machine['git']['commit'])[:12]}" if machine.get("git") else ""),
        f"- Cost: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (this invocation; runs found "
        "in `runs.json` are reused, not recomputed). All runs in `runs.json`: "
        f"{len(runner.cache)} runs, {_cached_cpu(runner) / 60:.1f} min CPU (their compiled "
        "calls, compilation included).",
        f"- Protocol: {len(s.seeds)} seeds ({', '.join(map(str, s.seeds))}), each method at its "
        "own best learning rate on a validation split, reported on a separate test split as "
        f"mean ± sample std over seeds. {_protocol(s, task)} AdamW: `optax.adamw` (weight decay "
        f"{ADAMW_WEIGHT_DECAY:g}); NanoAdam: `nanoadam_jax.nanoadam` (no weight decay), head "
        + (
            "updated densely, all other leaves (kernels and biases) sparse."
            if task == "vision"
            else "and LayerNorm parameters updated densely (the library's labels), all other "
            "leaves (kernels, biases, position and type embeddings) sparse."
        ),
        "",
    ]
    titles = {
        "e1": "E1. NanoAdam vs full AdamW fine-tuning",
        "e4": "E4. Learning-rate tolerance",
        "e5": "E5. Forgetting (continual learning) and the rounding of k",
        "e2": "E2. Selection criterion and static vs dynamic mask",
        "e3": "E3. Moments at a refresh and mask_interval",
    }
    for name in ("e1", "e2", "e3", "e4", "e5"):
        if name in results:
            lines += [
                f"## {titles[name]}",
                "",
                results[name]["markdown"],
                "",
                f"![{name}]({name}.png)",
                "",
            ]
    lines += [
        "## Compiled calls (wall and CPU seconds, compilation included)",
        "",
        "| call | wall s | CPU s |",
        "|---|---|---|",
    ]
    for c in runner.compile_log:
        lines.append(f"| {c['call']} | {c['wall_s']:.0f} | {c['cpu_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _provenance(machine: dict[str, Any], command: str, wall: float, cpu: float) -> list[str]:
    git = machine.get("git") or {}
    dirty = ", library modified (uncommitted changes)" if git.get("library_dirty") else ""
    return [
        f"- Command: `{command}`",
        f"- Date: {machine['date']}; git {str(git.get('commit'))[:12]}{dirty}; library hash "
        f"(sha256 of nanoadam_jax/**/*.py) {library_hash()[:16]}",
        f"- Machine: {machine['processor']}, {machine['cpus_available']} CPU core(s) available "
        f"({machine['cpu_count']} on the host), shared with other jobs; backend "
        f"{machine['backend']}; jax {machine['jax']}, optax {machine['optax']}, flax "
        f"{machine['flax']}, python {machine['python']}",
        f"- Cost of this invocation: {wall / 60:.1f} min wall, {cpu / 60:.1f} min CPU (runs found "
        "in `runs.json`, made with the same library code, are reused, not recomputed).",
    ]


def main_opt_in(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """``--experiment e3long`` or ``--experiment e6``: their own settings and results folder."""
    from benchmarks.evidence import e3long, e6

    name = args.experiments[0]
    need = VISION_ASSETS if name == "e3long" else e6.ASSETS
    missing = assets.missing_assets(*need)
    if missing:
        raise SystemExit("Missing offline assets. Install them with:\n  " + "\n  ".join(missing))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    command = " ".join(
        ["python -m benchmarks.evidence", *(sys.argv[1:] if argv is None else list(argv))]
    )
    w0, c0 = time.perf_counter(), time.process_time()
    if name == "e3long":
        settings: Any = e3long.E3LONG_SMOKE if args.smoke else e3long.E3LONG
        if args.seeds is not None:
            settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
        runner = Runner(settings, out, progress=not args.quiet)
        res = e3long.experiment_e3long(runner)
        runs = [runner.cache[k] for k in sorted(runner.used)]
        title = "E3-long: moments and bias correction of entering entries over a long run"
    else:
        settings = e6.E6_SMOKE if args.smoke else e6.E6
        if args.seeds is not None:
            settings = dataclasses.replace(settings, seeds=tuple(range(args.seeds)))
        res = e6.run_e6(settings, out, progress=not args.quiet)
        runs = res.pop("runs")
        title = "E6: the whole MiniLM-L6 on Rotten Tomatoes (AdamW vs NanoAdam), BBC forgetting"
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    fig = res.pop("figure")
    fig.savefig(out / f"{name}.png", dpi=110)
    _plt().close(fig)
    payload = {
        "experiment": name,
        "settings": dataclasses.asdict(settings),
        "machine": machine,
        "library_hash": library_hash(),
        "command": command,
        "wall_s": wall,
        "cpu_s": cpu,
        "results": res,
        "runs": runs,
    }
    (out / f"{name}.json").write_text(json.dumps(_jsonable(payload), indent=1) + "\n")
    md = [f"# {title}" + (" (SMOKE RUN)" if args.smoke else ""), ""]
    md += _provenance(machine, command, wall, cpu)
    md += ["", res["markdown"], "", f"![{name}]({name}.png)", ""]
    (out / f"{name}.md").write_text("\n".join(md))
    if not args.quiet:
        print("\n".join(md))
        print(f"Wrote {out} ({wall:.0f} s wall, {cpu:.0f} s CPU).")
    return {"results": _jsonable(res), "wall_s": wall, "cpu_s": cpu, "out": str(out)}
