"""Diagnostic: where the compile time of a NanoAdam step goes on XLA:CPU.

XLA:CPU compiles every kernel (fusion, scatter, ...) of the optimized program to machine code
with LLVM, and compiles *identical* kernels once: AdamW's per-leaf kernels are the same for
every leaf of a shape, so 128 leaves cost it a handful of LLVM modules. This script counts,
for AdamW and NanoAdam side by side, the kernels in the program and the LLVM modules XLA
actually compiled, grouped by kind, with their LLVM time, read from XLA's own log
(``TF_CPP_VMODULE=ir_compiler=2``). Each measurement runs in a fresh subprocess (the log is
per process; no compilation cache is shared).

Cases: ``N`` leaves of ``256 x 256`` (:mod:`benchmarks.bench_compile`'s tree; the jitted,
donated ``update + apply_updates``) for ``N`` in 8 and 128, and the ~10M transformer train
step of :mod:`benchmarks.bench_memory` (``loss -> grad -> update -> apply``). NanoAdam is
``nanoadam(lr, density=0.1, mask_interval=100)``.

Reading it: a kind whose LLVM modules equal its kernel count is compiled once per leaf (the
kernels differ, e.g. by a slice offset into a stacked array, or are scatters, which this
XLA version never shares); such kinds make compile time grow with the number of leaves. Usage::

    python benchmarks/diag_compile.py [--out benchmarks/results/diag_compile]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if not __package__:  # run as `python benchmarks/diag_compile.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common

CASES = ("leaves-8", "leaves-128", "transformer-10M")
OPTIMIZERS = ("adamw", "nanoadam d=0.1")
_MODULE = re.compile(
    r"Compiled LLVM module: (?:__compute_module_)?(\S+?) time: ([0-9.]+) (us|ms|s)\b"
)
_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
_KERNEL = re.compile(r"^\s*%([A-Za-z_\-]+?)(?:\.\d+)? = \S+ (?:fusion|scatter|gather)\(", re.M)


def kind_of(module: str) -> str:
    """``wrapped_scatter.12`` / ``slice_bitcast_fusion.3_kernel_module`` -> the kernel kind."""
    name = re.sub(r"^(__compute_module_)+|_kernel_module$", "", module)
    return re.sub(r"\.\d+", "", name)


def worker(case: str, optimizer: str) -> dict[str, Any]:
    """Lower and compile one step (in this process) and return its sizes and times."""
    import jax
    import optax

    import nanoadam_jax as nanoadam
    from benchmarks import bench_compile, bench_memory

    if optimizer == "adamw":
        tx = optax.adamw(1e-3)
    else:
        tx = nanoadam.nanoadam(1e-3, density=0.1, mask_interval=100)
    if case.startswith("leaves-"):
        params = bench_compile.tree_of(int(case.split("-")[1]))
        state = jax.eval_shape(tx.init, params)
        compiled, lower_s, compile_s = common.lower_and_compile(
            common.update_step(tx), params, state, params
        )
    else:
        model, params, batch = bench_memory.model_and_shapes(bench_memory.FULL_CONFIGS[0])
        state = jax.eval_shape(tx.init, params)
        compiled, lower_s, compile_s = common.lower_and_compile(
            bench_memory.train_step(model, tx), params, state, batch
        )
    kernels = Counter(kind_of(k) for k in _KERNEL.findall(compiled.as_text()))
    return {
        "lower_s": lower_s,
        "compile_s": compile_s,
        "hlo_instructions": common.hlo_instructions(compiled),
        "kernels": dict(kernels),
    }


def measure(case: str, optimizer: str) -> dict[str, Any]:
    """Run :func:`worker` in a subprocess with XLA's LLVM log on; parse the log."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0", TF_CPP_VMODULE="ir_compiler=2")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", case, optimizer]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    modules: Counter[str] = Counter()
    llvm_ms: Counter[str] = Counter()
    for name, value, unit in _MODULE.findall(proc.stderr):
        kind = kind_of(name)
        modules[kind] += 1
        llvm_ms[kind] += float(value) * _UNIT_MS[unit]
    kinds = sorted(set(modules) | set(result["kernels"]), key=lambda k: -llvm_ms.get(k, 0.0))
    result["kinds"] = [
        {
            "kind": k,
            "kernels": result["kernels"].get(k, 0),
            "llvm_modules": modules.get(k, 0),
            "llvm_ms": llvm_ms.get(k, 0.0),
        }
        for k in kinds
    ]
    result["llvm_modules"] = sum(modules.values())
    result["llvm_ms"] = sum(llvm_ms.values())
    result["log_found"] = bool(modules)
    return result


def render(rows: list[dict[str, Any]], machine: dict[str, Any], command: str) -> str:
    lines = [
        "# Compile-time diagnostic: kernels and LLVM modules (XLA:CPU)",
        "",
        *common.provenance_md(machine, command),
        "",
        "| case | optimizer | lower s | compile s | kernels | LLVM modules | LLVM s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['optimizer']} | {r['lower_s']:.2f} | {r['compile_s']:.2f} | "
            f"{sum(r['kernels'].values())} | {r['llvm_modules']} | {r['llvm_ms'] / 1e3:.2f} |"
        )
    for r in rows:
        lines += [
            "",
            f"## {r['case']}, {r['optimizer']}: the kinds with the most LLVM time",
            "",
            "| kind | kernels in the program | LLVM modules | LLVM ms |",
            "|---|---|---|---|",
        ]
        for k in r["kinds"][:8]:
            lines.append(
                f"| {k['kind']} | {k['kernels']} | {k['llvm_modules']} | {k['llvm_ms']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "OPTIMIZER"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--out",
        default="benchmarks/results/diag_compile",
        help="write OUT.json and OUT.md (default: benchmarks/results/diag_compile)",
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    t0 = time.perf_counter()
    rows = []
    for case in CASES:
        for optimizer in OPTIMIZERS:
            rows.append({"case": case, "optimizer": optimizer, **measure(case, optimizer)})
            print(f"{case} {optimizer}: compile {rows[-1]['compile_s']:.2f} s", flush=True)
    machine = common.machine_info()
    command = "python benchmarks/diag_compile.py" + (
        "" if args.out == parser.get_default("out") else f" --out {args.out}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "machine": machine,
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    out.with_suffix(".md").write_text(render(rows, machine, command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
