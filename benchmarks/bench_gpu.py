"""Section: the update, selection, chunk and memory measurements on a GPU backend.

Empty (no rows) unless ``jax.default_backend() == "gpu"``. On a GPU it reuses the CPU
sections' code at sizes that suit a GPU; every row carries a ``kind`` (``update``,
``selection``, ``chunk``, ``memory`` or ``train_step``) and the columns of that kind's
section. A kind that fails is recorded as one row ``{"kind": ..., "error": ...}`` and the
others still run.

``train_step`` is ``benchmarks/bench_train_step.py`` (the whole donated step: peak, step
time, compile, copies and the ordinary update's bytes accessed, NanoAdam vs AdamW) on the
unrolled and scanned ~336M transformer and MiniLM-L6, compiled once (the XLA:CPU copy
insertion flag does not apply to the GPU compiler).

One prepared command for a lent GPU (writes ``OUT/gpu.json`` and ``OUT/gpu.md``; about
5-8 minutes on an H100)::

    python benchmarks/bench_gpu.py --out "$OUT"            # all kinds
    python benchmarks/bench_gpu.py --out "$OUT" --kinds train_step,update

``--allow-cpu --quick`` runs the same code on the CPU at quick sizes (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

if not __package__:  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax

from benchmarks import (
    bench_chunk,
    bench_memory,
    bench_selection,
    bench_train_step,
    bench_update,
    common,
)

TITLE = "GPU (empty unless a GPU backend is present)"
FULL_UPDATE_SIZES = {25_000_000: 5, 100_000_000: 5}
QUICK_UPDATE_SIZES = {1_000_000: 2}
FULL_SELECTION_SIZES = {1_000_000: 5, 25_000_000: 5}
QUICK_SELECTION_SIZES = {100_000: 2}
UPDATE_DENSITIES = (0.01, 0.1)
FULL_CHUNK = {"n_params": 64 * 2**20, "rounds": 5, "steps": 20, "refresh_steps": 5}

COLUMNS_BY_KIND = {
    "update": bench_update.COLUMNS,
    "selection": bench_selection.COLUMNS,
    "chunk": bench_chunk.COLUMNS,
    "memory": bench_memory.COLUMNS,
    "train_step": bench_train_step.COLUMNS,
    "error": [("kind", "kind"), ("failed", "failed"), ("error", "error")],
}
COLUMNS: list[tuple[str, str]] = []


def available() -> bool:
    return jax.default_backend() == "gpu"


def _update(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for n, rounds in (QUICK_UPDATE_SIZES if quick else FULL_UPDATE_SIZES).items():
        rows += bench_update.bench_size(
            n, rounds, 2 if quick else 5, UPDATE_DENSITIES, variants=not quick
        )
    return rows


def _selection(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for n, rounds in (QUICK_SELECTION_SIZES if quick else FULL_SELECTION_SIZES).items():
        rows += bench_selection.bench_size(n, rounds)
    return rows


def _chunk(quick: bool) -> list[dict[str, Any]]:
    return bench_chunk.bench(**(bench_chunk.QUICK if quick else FULL_CHUNK))


def _memory(quick: bool) -> list[dict[str, Any]]:
    rows = []
    for cfg in bench_memory.QUICK_CONFIGS if quick else bench_memory.FULL_CONFIGS[-1:]:
        rows += bench_memory.bench_config(cfg)
    return rows


def _train_step(quick: bool) -> list[dict[str, Any]]:
    rows = []
    flags = (False,) if available() else (False, True)  # the flag is XLA:CPU's only
    if quick:
        tiny = bench_train_step.transformer(bench_train_step.TINY_TRANSFORMER, scanned=True)
        return bench_train_step.bench_model(tiny, 2, flags=flags, with_full=False)
    for factory, steps in bench_train_step.plan(quick):
        rows += bench_train_step.bench_model(factory(), steps, flags=flags)
    return rows


KINDS = {
    "update": _update,
    "selection": _selection,
    "chunk": _chunk,
    "memory": _memory,
    "train_step": _train_step,
}


def run(
    quick: bool = False, kinds: list[str] | None = None, allow_cpu: bool = False
) -> list[dict[str, Any]]:
    if not (available() or allow_cpu):
        return []
    rows: list[dict[str, Any]] = []
    for kind in kinds or list(KINDS):
        fn = KINDS[kind]
        try:
            rows += [{"kind": kind, **row} for row in fn(quick)]
        except Exception as e:  # one failing kind must not lose the others' rows
            rows.append(
                {
                    "kind": "error",
                    "failed": kind,
                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
                    "traceback": traceback.format_exc(limit=8),
                }
            )
    return rows


def markdown(payload: dict[str, Any]) -> str:
    m = payload["machine"]
    lines = [
        f"# {TITLE}",
        "",
        *common.provenance_md(m, payload["command"]),
        f"- backend {m['backend']}, device {m['device_kind']} x {m['device_count']}; "
        f"wall time {payload['wall_s']:.0f} s",
        "",
    ]
    for kind, columns in COLUMNS_BY_KIND.items():
        sub = [r for r in payload["rows"] if r.get("kind") == kind]
        if sub:
            lines += [f"## {kind}", "", common.md_table(sub, columns)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/gpu", help="output folder")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--kinds", default=",".join(KINDS), help="subset of " + ",".join(KINDS))
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run without a GPU (a smoke test of this path)"
    )
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown kinds {unknown}; choose from {list(KINDS)}")
    machine = common.machine_info()
    print(f"[gpu] backend {machine['backend']}: {machine['devices']}", flush=True)
    t0 = time.perf_counter()
    rows = run(args.quick, kinds, args.allow_cpu)
    command = "python benchmarks/bench_gpu.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    payload = {
        "command": command.strip(),
        "machine": machine,
        "wall_s": time.perf_counter() - t0,
        "rows": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(payload, indent=1, default=float) + "\n")
    (out / "gpu.md").write_text(markdown(payload))
    print(markdown(payload))
    if not rows:
        print("[gpu] no rows: no GPU backend (pass --allow-cpu to run on the CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
