"""Run the nanoadam-jax benchmark suite and write ``results.json`` and ``results.md``.

Usage::

    python benchmarks/run.py                 # full suite -> benchmarks/results/
    python benchmarks/run.py --quick         # small sizes -> benchmarks/results/quick/
    python benchmarks/run.py --out DIR --sections update,memory

Both files carry the machine (platform, CPUs, backend and device kind), the jax, jaxlib,
optax and flax versions, the library's git commit (and whether ``nanoadam_jax/`` had
uncommitted changes), the date and the load average at the start and the end. The markdown
file starts with the key ratios (with the targets the library aims for, where it has one),
then one table per section.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if not __package__:  # run as `python benchmarks/run.py`: make the `benchmarks` package importable
    sys.path.insert(0, str(REPO))

from benchmarks import (  # noqa: E402
    _compat,
    bench_chunk,
    bench_compile,
    bench_gpu,
    bench_memory,
    bench_selection,
    bench_train_step,
    bench_update,
    bench_vmap,
    common,
)

SECTIONS = {
    "update": bench_update,
    "compile": bench_compile,
    "vmap": bench_vmap,
    "chunk": bench_chunk,
    "selection": bench_selection,
    "memory": bench_memory,
    "train_step": bench_train_step,
    "gpu": bench_gpu,
}
DEFAULT_OUT = REPO / "benchmarks" / "results"
DEFAULT_QUICK_OUT = DEFAULT_OUT / "quick"

#: Targets: an amortized update (one refresh per 100 steps) at most 0.6 AdamW steps at 25M
#: parameters and d = 0.1; a fine-tuning step's peak memory at most 0.62 of AdamW's on a
#: model of at least 300M parameters; a vmapped grid step about as fast as its runs one by one.
UPDATE_TARGET = 0.6
PEAK_TARGET = 0.62
VMAP_TARGET = 1.25
PEAK_MIN_PARAMS = 300_000_000
TARGET_DENSITY = 0.1
#: Benchmarked variants of ``nanoadam`` (row-name prefix, label in the key ratio, note).
VARIANTS = (
    (
        "nanoadam-bf16",
        "moment_dtype=bf16",
        "bf16 moments (the paper's memory model); AdamW keeps f32 moments",
    ),
    ("nanoadam-leaf", 'scope="leaf"', "exactly k per tensor, int32 positions"),
)


def git_revision() -> dict[str, Any]:
    """The checkout's commit and whether the library differs from it (see ``common``)."""
    return common.git_revision()


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return None


def summarize(sections: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The key ratios, each with its target (if any) and whether it is met."""
    out: list[dict[str, Any]] = []
    nano = f"nanoadam d={TARGET_DENSITY:g}"

    def add(name, value, target=None, where="", note="", tol=0.0):
        met = None if target is None or value is None else bool(value <= target * (1 + tol))
        out.append(
            {"name": name, "value": value, "target": target, "met": met, "where": where}
            | ({"note": note} if note else {})
        )

    def add_variants(quantity, pool, key, target, where, **match):
        """One key ratio per variant of :data:`VARIANTS` that has a row in ``pool``."""
        for prefix, label, note in VARIANTS:
            row = _find(pool, optimizer=f"{prefix} d={TARGET_DENSITY:g}", **match)
            if row:
                add(f"{quantity} nanoadam({label}) / adamw", row[key], target, where, note)

    rows = sections.get("update", {}).get("rows", [])
    if rows:
        sizes = sorted({(r["n_params"], r["size"]) for r in rows if r["optimizer"] == nano})
        for _, size in sizes:
            row = _find(rows, size=size, optimizer=nano)
            where = f"{size} params, d={TARGET_DENSITY:g}, mask_interval 100"
            add("update time nanoadam / adamw", row["ratio_vs_adamw"], UPDATE_TARGET, where)
        wanted = _find(rows, size="25M", optimizer=nano)
        row = wanted or (_find(rows, size=sizes[-1][1], optimizer=nano) if sizes else None)
        if row:
            where = f"{row['size']} params, d={TARGET_DENSITY:g}"
            note = "" if wanted else "the 25M size did not run (quick mode): largest size shown"
            add(
                "state bytes nanoadam / adamw",
                row["state_ratio_vs_adamw"],
                row["state_floor"],
                where,
                "target: the floor 1.25*d (uint16 positions); scalar counters allowed "
                "(0.1% tolerance)" + (f"; {note}" if note else ""),
                tol=1e-3,
            )
            add_variants(
                "update time", rows, "ratio_vs_adamw", UPDATE_TARGET, where, size=row["size"]
            )
            add("refresh cost (adamw steps)", row["refresh_cost_adamw_steps"], where=where)
            add("refresh step / adamw step", row["refresh_step_adamw_steps"], where=where)
    rows = sections.get("compile", {}).get("rows", [])
    if rows:
        n = max(r["n_leaves"] for r in rows)
        row = _find(rows, n_leaves=n, optimizer=nano)
        if row:
            where = f"{n} leaves of 256x256"
            add("compile time nanoadam / adamw", row["compile_ratio_vs_adamw"], where=where)
            add("HLO instructions nanoadam / adamw", row["hlo_ratio_vs_adamw"], where=where)
    rows = sections.get("vmap", {}).get("rows", [])
    for row in rows:
        where = f"{row['runs']} runs, one {row['leaf_shape'][0]}x{row['leaf_shape'][1]} leaf"
        if row["optimizer"] == "adamw":
            add("vmapped step / single steps (adamw)", row["ratio_vs_singles"], where=where)
        elif row["optimizer"].endswith("(singles sized like the grid)"):
            add(
                "vmapped step / single steps sized like the grid (nanoadam)",
                row["ratio_vs_singles"],
                where=where + "; each single holds the grid's state (max_density)",
            )
        else:
            add(
                "vmapped step / single steps (nanoadam, 4 densities)",
                row["ratio_vs_singles"],
                VMAP_TARGET,
                where,
                "target: about 1x the sum of the single runs",
            )
    rows = sections.get("chunk", {}).get("rows", [])
    if rows:
        default = _find(rows, default_chunk=True, method="threshold")
        if default:
            where = f"chunk_size={default['chunk_size']} (default), {default['n_params']:,} params"
            add("ordinary step / adamw step", default["step_ratio_vs_adamw"], where=where)
            add("refresh step / adamw step", default["refresh_ratio_vs_adamw"], where=where)
            top_k = _find(rows, default_chunk=True, method="top_k")
            if top_k:
                add(
                    "refresh step: top_k / threshold search",
                    common.ratio(top_k["refresh_ms"], default["refresh_ms"]),
                    where=where,
                )
        plain = [r for r in rows if r["method"] == "threshold"]
        best = min(plain, key=lambda r: r["refresh_ms"])
        add(
            "chunk_size with the fastest refresh",
            float(best["chunk_size"]),
            where=f"{best['n_params']:,} params; sizes {[r['chunk_size'] for r in plain]}",
            note=f"its refresh is {best['refresh_ratio_vs_adamw']:.3g} adamw steps",
        )
    rows = sections.get("memory", {}).get("rows", [])
    if rows:
        big = [r for r in rows if r["n_params"] >= PEAK_MIN_PARAMS]
        pool = big or rows
        top = max(r["n_params"] for r in pool)
        row = _find(pool, n_params=top, optimizer=nano)
        if row:
            note = "" if big else "no model of >= 300M parameters ran (quick mode)"
            where = f"{row['model']} transformer ({row['n_params']:,} params), d={TARGET_DENSITY:g}"
            add(
                "peak memory nanoadam / adamw", row["peak_ratio_vs_adamw"], PEAK_TARGET, where, note
            )
            add_variants(
                "peak memory", pool, "peak_ratio_vs_adamw", PEAK_TARGET, where, n_params=top
            )
            add(
                "state bytes nanoadam / adamw (transformer)",
                row["state_ratio_vs_adamw"],
                where=where,
                note=f"floor 1.25*d = {row['state_floor']:g}; with the dense head and norms "
                f"{row['model_state_floor']:.3f}",
            )
            add(
                "compile time nanoadam / adamw (transformer step)",
                row["compile_ratio_vs_adamw"],
                where=where,
            )
    rows = sections.get("train_step", {}).get("rows", [])
    for s in bench_train_step.summary(rows):
        if s["name"] in ("peak / adamw", "compile / adamw", "parameter-sized copies"):
            add(f"train step: {s['name']}", s["value"], s["target"], s["where"])
    rows = sections.get("selection", {}).get("rows", [])
    if rows:
        n = max(r["n"] for r in rows)
        for r in rows:
            if r["n"] == n and r["method"] != "threshold":
                add(
                    f"selection {r['method']} / threshold search ({r['scope']} scope)",
                    r["ratio_vs_threshold"],
                    where=f"one leaf of {n:,} entries",
                )
    return out


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        f"# nanoadam-jax benchmarks ({results['mode']} mode)",
        "",
        f"- date: {m['date']}",
        f"- machine: {m['platform']}; {m['processor']}; {m['cpu_count']} CPUs "
        f"({m['cpus_available']} available)",
        f"- backend: {m['backend']}, device kind: {m['device_kind']} x {m['device_count']}",
        f"- versions: jax {m['jax']}, jaxlib {m['jaxlib']}, optax {m['optax']}, "
        f"flax {m['flax']}, nanoadam_jax {m['nanoadam_jax']} "
        f"(commit {str(m['git'].get('commit'))[:12]}"
        f"{', library modified' if m['git'].get('library_dirty') else ''})",
        f"- library work-arounds: {'; '.join(m['library_workarounds'])}",
        f"- command: `{results['command']}`",
        f"- total wall time: {results['wall_s']:.0f} s; load average (1, 5, 15 min) at start "
        f"{m.get('load_average')}, at end {m.get('load_average_end')} on "
        f"{m['cpus_available']} CPUs",
        "",
        "## Key ratios",
        "",
        "| quantity | value | target | met | where |",
        "|---|---|---|---|---|",
    ]
    for s in results["summary"]:
        met = {True: "yes", False: "**no**", None: "-"}[s["met"]]
        target = "-" if s["target"] is None else f"<= {common.fmt(s['target'])}"
        where = s["where"] + (f" ({s['note']})" if s.get("note") else "")
        lines.append(f"| {s['name']} | {common.fmt(s['value'])} | {target} | {met} | {where} |")
    lines.append("")
    for name, sec in results["sections"].items():
        lines += [f"## {sec['title']}", "", sec["description"], ""]
        lines.append(
            f"_Section wall time: {sec['wall_s']:.0f} s; load average at its end "
            f"{sec.get('load_average_end')}._"
        )
        lines.append("")
        rows = sec["rows"]
        if name == "gpu":
            if not rows:
                lines += [f"No GPU backend (backend: {m['backend']}): nothing measured.", ""]
                continue
            for kind, columns in bench_gpu.COLUMNS_BY_KIND.items():
                sub = [r for r in rows if r.get("kind") == kind]
                if sub:
                    lines += [f"### {kind}", "", common.md_table(sub, columns)]
            continue
        lines.append(common.md_table(rows, sec["columns"]))
    return "\n".join(lines).rstrip() + "\n"


def _description(module: Any) -> str:
    """The module docstring without its title line, Sphinx roles turned into code spans."""
    doc = (module.__doc__ or "").strip()
    parts = doc.split("\n\n")
    text = "\n\n".join(p.strip() for p in parts[1:]) if len(parts) > 1 else doc
    return re.sub(r":(?:func|mod|class|data):`", "`", text)


def run(
    quick: bool = False, out: str | Path | None = None, sections: list[str] | None = None
) -> dict[str, Any]:
    """Run the suite (or some ``sections``), write the files, return the results."""
    names = sections or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    out_dir = Path(out) if out is not None else (DEFAULT_QUICK_OUT if quick else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    workarounds = _compat.apply()
    machine = common.machine_info() | {"library_workarounds": workarounds}
    t_all = time.perf_counter()
    command = "python benchmarks/run.py" + (" --quick" if quick else "")
    if sections:
        command += f" --sections {','.join(names)}"
    results: dict[str, Any] = {
        "suite": "nanoadam-jax benchmarks",
        "mode": "quick" if quick else "full",
        "command": command,
        "machine": machine,
        "sections": {},
    }
    for name in names:
        module = SECTIONS[name]
        print(f"[benchmarks] {name}: {module.TITLE}", flush=True)
        t0 = time.perf_counter()
        rows = module.run(quick=quick)
        results["sections"][name] = {
            "title": module.TITLE,
            "description": _description(module),
            "columns": [list(c) for c in module.COLUMNS],
            "rows": rows,
            "wall_s": time.perf_counter() - t0,
            "load_average_end": common.load_average(),
        }
        wall = results["sections"][name]["wall_s"]
        print(f"[benchmarks] {name}: {len(rows)} rows in {wall:.0f} s", flush=True)
    results["wall_s"] = time.perf_counter() - t_all
    machine["load_average_end"] = common.load_average()
    results["summary"] = summarize(results["sections"])
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: benchmarks/results, or benchmarks/results/quick)",
    )
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)}",
    )
    args = parser.parse_args(argv)
    results = run(args.quick, args.out, [s for s in args.sections.split(",") if s])
    for s in results["summary"]:
        status = {True: "met", False: "MISSED", None: ""}[s["met"]]
        target = "" if s["target"] is None else f" (target <= {common.fmt(s['target'])})"
        print(f"{s['name']}: {common.fmt(s['value'])}{target} {status} [{s['where']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
