"""Smoke test of the benchmark suite: quick mode, in-process, into a temporary folder.

Checks that the results are well formed (keys present, positive numbers, files written),
never the timings themselves.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import run as bench_run  # noqa: E402

MACHINE_KEYS = (
    "date",
    "platform",
    "processor",
    "cpu_count",
    "backend",
    "device_kind",
    "jax",
    "jaxlib",
    "optax",
    "flax",
    "git",
    "library_workarounds",
)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = bench_run.run(quick=True, out=out)
    return out, results


def test_files_written_and_json_matches(quick_results):
    out, results = quick_results
    md = (out / "results.md").read_text()
    data = json.loads((out / "results.json").read_text())
    assert data["mode"] == "quick"
    assert set(data["sections"]) == set(bench_run.SECTIONS)
    assert data["summary"] == json.loads(json.dumps(results["summary"]))
    assert "## Key ratios" in md
    for section in data["sections"].values():
        assert f"## {section['title']}" in md
        assert isinstance(section["load_average_end"], (list, type(None)))
    for key in MACHINE_KEYS:
        assert key in data["machine"], key
    assert positive(data["machine"]["cpu_count"])
    assert data["machine"]["backend"] == jax.default_backend()
    assert positive(data["wall_s"])
    commit = data["machine"]["git"]["commit"]
    assert commit is None or (len(commit) == 40 and commit[:12] in md)
    for needle in ("- date: ", "- versions: jax ", "load average", "- command: "):
        assert needle in md, needle


def test_update_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["update"]["rows"]
    names = {r["optimizer"] for r in rows}
    assert {"adamw", "adam", "nanoadam-bf16 d=0.1", "nanoadam-leaf d=0.1"} <= names
    nano = [r for r in rows if r["optimizer"].startswith("nanoadam")]
    plain = [r for r in nano if r["optimizer"].startswith("nanoadam d=")]
    assert sorted(r["density"] for r in plain) == [0.01, 0.1]
    for r in rows:
        for key in ("n_params", "step_ms", "ratio_vs_adamw", "state_bytes", "compile_s"):
            assert positive(r[key]), (r["optimizer"], key)
        assert len(r["step_ms_rounds"]) == r["rounds"] >= 1
        assert r["steps"] == 100
        assert r["faults_per_step"] >= 0
    adamw = next(r for r in rows if r["optimizer"] == "adamw")
    assert adamw["ratio_vs_adamw"] == 1.0
    floors = {"nanoadam": 1.25, "nanoadam-bf16": 0.75, "nanoadam-leaf": 1.5}
    for r in nano:
        assert r["mask_interval"] == 100
        assert r["state_floor"] == pytest.approx(floors[r["optimizer"].split()[0]] * r["density"])
        assert 0 < r["state_ratio_vs_adamw"] < 1
        for key in ("refresh_step_ms", "normal_step_ms", "adamw_single_step_ms"):
            assert positive(r[key]), (r["optimizer"], key)
        assert isinstance(r["refresh_cost_adamw_steps"], float)


def test_compile_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["compile"]["rows"]
    assert sorted({r["n_leaves"] for r in rows}) == [8, 32]
    assert {r["optimizer"] for r in rows} == {"adamw", "nanoadam d=0.1"}
    for r in rows:
        for key in ("lower_s", "compile_s", "total_s", "compile_ratio_vs_adamw"):
            assert positive(r[key]), (r["n_leaves"], r["optimizer"], key)
        assert isinstance(r["hlo_instructions"], int) and r["hlo_instructions"] > 0
        assert r["n_params"] == r["n_leaves"] * 256 * 256
        if r["optimizer"] == "adamw":
            assert r["compile_ratio_vs_adamw"] == r["hlo_ratio_vs_adamw"] == 1.0


def test_vmap_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["vmap"]["rows"]
    assert [r["optimizer"] for r in rows] == [
        "adamw",
        "nanoadam d=0.01,0.05,0.1,0.2",
        "nanoadam d=0.01,0.05,0.1,0.2 (singles sized like the grid)",
    ]
    for r in rows:
        for key in ("vmapped_ms", "singles_ms", "ratio_vs_singles", "compile_s", "temp_bytes"):
            assert positive(r[key]), (r["optimizer"], key)
        assert r["runs"] == 4 and len(r["ratio_rounds"]) == r["rounds"]
        assert r["faults_per_step"] >= 0
    assert rows[1]["max_density"] == max(rows[1]["densities"]) == 0.2
    assert rows[1]["mask_interval"] == 10**6


def test_chunk_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["chunk"]["rows"]
    plain = [r for r in rows if r["method"] == "threshold"]
    assert [r["chunk_size"] for r in plain] == [1024, 4096, 16384, 65536]
    (top_k,) = [r for r in rows if r["method"] == "top_k"]
    assert top_k["default_chunk"] and top_k["chunk_size"] == 16384
    for r in rows:
        for key in ("step_ms", "refresh_ms", "adamw_ms", "step_ratio_vs_adamw"):
            assert positive(r[key]), (r["chunk_size"], key)
        assert positive(r["refresh_ratio_vs_adamw"])
        assert r["chunk"] <= r["chunk_size"]
        assert r["index_dtype"] == ("uint16" if r["chunk"] <= 0xFFFF else "int32")
        # m, v (float32), the position and the uint16 age per selected entry, vs 8 bytes
        floor = (8 + 2 + (2 if r["index_dtype"] == "uint16" else 4)) / 8 * r["density"]
        assert r["state_ratio_vs_adamw"] == pytest.approx(floor, rel=0.01)


def test_selection_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["selection"]["rows"]
    assert {(r["scope"], r["method"]) for r in rows} == {
        (s, m) for s in ("chunk", "leaf") for m in ("threshold", "top_k")
    }
    for r in rows:
        assert positive(r["ms"]) and positive(r["ratio_vs_threshold"])
        assert r["selected"] == r["k_per_chunk"] * r["chunks"] > 0
        assert r["exact_match"] is True, r
        if r["scope"] == "leaf":
            assert r["chunk"] == r["n"] and r["chunks"] == 1
    assert all(r["ratio_vs_threshold"] == 1.0 for r in rows if r["method"] == "threshold")


def test_memory_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["memory"]["rows"]
    assert {r["optimizer"] for r in rows} == {
        "adamw",
        "nanoadam d=0.1",
        "nanoadam-bf16 d=0.1",
    }
    for r in rows:
        for key in ("argument_bytes", "output_bytes", "temp_bytes", "peak_bytes", "state_bytes"):
            assert positive(r[key]), (r["optimizer"], key)
        assert r["peak_bytes"] == (
            r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
        )
        # Donation: the new params and state reuse the old buffers.
        assert r["alias_bytes"] >= r["params_bytes"]
        assert positive(r["peak_ratio_vs_adamw"]) and positive(r["state_ratio_vs_adamw"])
        assert positive(r["compile_ratio_vs_adamw"]) and r["hlo_instructions"] > 0
    nano = next(r for r in rows if r["optimizer"] == "nanoadam d=0.1")
    assert nano["state_ratio_vs_adamw"] < 1
    assert nano["state_floor"] == pytest.approx(0.125)
    bf16 = next(r for r in rows if r["optimizer"] == "nanoadam-bf16 d=0.1")
    assert bf16["state_bytes"] < nano["state_bytes"] and bf16["state_floor"] is None


def test_gpu_section_and_summary(quick_results):
    _, results = quick_results
    gpu = results["sections"]["gpu"]["rows"]
    if jax.default_backend() != "gpu":
        assert gpu == []
    names = [s["name"] for s in results["summary"]]
    for wanted in (
        "update time nanoadam / adamw",
        "state bytes nanoadam / adamw",
        "refresh cost (adamw steps)",
        "update time nanoadam(moment_dtype=bf16) / adamw",
        'update time nanoadam(scope="leaf") / adamw',
        "compile time nanoadam / adamw",
        "vmapped step / single steps (nanoadam, 4 densities)",
        "refresh step: top_k / threshold search",
        "chunk_size with the fastest refresh",
        "peak memory nanoadam / adamw",
        "peak memory nanoadam(moment_dtype=bf16) / adamw",
        "compile time nanoadam / adamw (transformer step)",
        "selection top_k / threshold search (chunk scope)",
    ):
        assert wanted in names, wanted
    for s in results["summary"]:
        assert isinstance(s["value"], float), s
        assert s["met"] in (True, False, None)


def test_update_cost_diagnostic_runs(tmp_path):
    import nanoadam_jax as nanoadam
    from benchmarks import diag_update_cost

    cond = nanoadam.refresh.cond
    out = tmp_path / "diag.md"
    assert diag_update_cost.main(["--params", "2e5", "--out", str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split(" | ")[0][2:] for r in rows] == list(diag_update_cost.ROWS)
    assert float(rows[0].split(" | ")[2].strip(" |")) == 1.0
    assert "commit" in text and "load average" in text
    assert nanoadam.refresh.cond is cond  # the patch is undone


def test_sharding_bench_quick(tmp_path):
    # A fresh process: the 8 host devices must be set before jax starts.
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    script = REPO / "benchmarks" / "bench_sharding.py"
    cmd = [sys.executable, str(script), "--quick", "--out", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["machine"]["device_count"] == 8 and "commit" in data["machine"]["git"]
    rows = data["rows"]
    assert {(r["layout"], r["mode"]) for r in rows} == {
        (layout, mode) for layout in ("fsdp", "tp", "2d") for mode in ("auto", "explicit")
    }
    assert {r["optimizer"] for r in rows} == {"optax.adamw", "nanoadam"}
    for r in rows:
        if "error" in r:  # a library failure is recorded, not raised
            assert r["optimizer"] != "optax.adamw" and r["error"], r
            continue
        assert positive(r["state_bytes_per_device"]) and positive(r["step_s"])
        assert set(r["collectives"]) == {"step", "refresh"}
        if r["optimizer"] == "nanoadam":
            assert positive(r["refresh_s"]) and 0 < r["state_ratio_vs_adamw"] < 1
        else:
            assert r["state_ratio_vs_adamw"] == 1.0
    md = (tmp_path / "results.md").read_text()
    assert "| fsdp | auto | nanoadam |" in md and "library commit" in md


HLO_WITH_REFRESH_COND = """HloModule m

%none (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %ar = f32[4]{0} all-reduce(%p), replica_groups={}, to_apply=%sum
}

%refresh (q: f32[4]) -> f32[4] {
  %q = f32[4]{0} parameter(0)
  %ag = f32[32]{0} all-gather(%q), dimensions={0}
  %ar2 = f32[4]{0} all-reduce(%q), replica_groups={}, to_apply=%sum
  ROOT %s = f32[4]{0} slice(%ag), slice={[0:4]}
}

ENTRY %main (x: f32[4], i: s32[]) -> f32[4] {
  %x = f32[4]{0} parameter(0)
  %i = s32[] parameter(1)
  ROOT %c = f32[4]{0} conditional(%i, %x, %x), branch_computations={%none, %refresh}
}
"""


def test_sharding_bench_counts_the_no_refresh_branch_as_per_step(monkeypatch):
    # The refresh cond's branch 0 (no refresh) runs on every ordinary step; the refresh
    # branch adds only what it moves beyond branch 0.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    from benchmarks import bench_sharding

    found = bench_sharding.classify(HLO_WITH_REFRESH_COND)
    step = [(c["op"], c["elements"], c["count"]) for c in found["step"]]
    refresh = [(c["op"], c["elements"], c["count"]) for c in found["refresh"]]
    assert step == [("all-reduce", 4, 1)]
    assert refresh == [("all-gather", 32, 1)]


def test_compile_diagnostic_parses_xla_log():
    from benchmarks import diag_compile

    assert diag_compile.kind_of("wrapped_scatter.12") == "wrapped_scatter"
    assert diag_compile.kind_of("slice_bitcast_fusion.3_kernel_module") == "slice_bitcast_fusion"
    assert diag_compile.kind_of("__compute_module_add_select_fusion") == "add_select_fusion"
    r = diag_compile.measure("leaves-8", "adamw")  # a fresh process with XLA's LLVM log on
    assert r["log_found"], "XLA's 'Compiled LLVM module' log lines were not found"
    assert r["llvm_modules"] == sum(k["llvm_modules"] for k in r["kinds"]) > 0
    assert sum(k["kernels"] for k in r["kinds"]) == sum(r["kernels"].values()) > 0
    assert r["compile_s"] > 0 and r["hlo_instructions"] > 0


def test_inplace_memory_diagnostic_runs(tmp_path):
    from benchmarks import diag_inplace_memory

    out = tmp_path / "diag"
    assert diag_inplace_memory.main(["--layers", "2", "--dim", "128", "--out", str(out)]) == 0
    payload = json.loads(out.with_suffix(".json").read_text())
    assert [r["mode"] for r in payload["rows"]] == list(diag_inplace_memory.MODES)
    for r in payload["rows"]:
        assert r["param_bytes"] == 2 * 128 * 128 * 4 and r["temp_bytes"] >= 0
    assert "commit" in out.with_suffix(".md").read_text()


def test_train_step_bench_tiny(tmp_path):
    """bench_train_step on a tiny transformer: rows well formed (no timing asserted)."""
    from benchmarks import bench_memory, bench_train_step

    cfg = bench_memory.Config(
        "tiny", vocab=64, d_model=32, layers=1, heads=2, d_ff=64, batch=2, seq=8
    )
    rows = bench_train_step.bench_model(
        bench_train_step.transformer(cfg, scanned=True), steps=1, flags=(True,)
    )
    assert [r["optimizer"] for r in rows] == ["adamw", "nanoadam d=0.1"]
    for r in rows:
        assert r["flag"] is True and positive(r["peak_bytes"]) and positive(r["compile_s"])
        assert r["peak_bytes"] == (
            r["argument_bytes"] + r["output_bytes"] + r["temp_bytes"] - r["alias_bytes"]
        )
        assert positive(r["step_ms"]) and r["loss_finite"]
        assert r["param_copies"] >= 0 and positive(r["ordinary_update_bytes"])
    nano = rows[1]
    assert nano["state_bytes"] < rows[0]["state_bytes"] and positive(nano["ordinary_bytes_ratio"])
    summary = bench_train_step.summary(rows)
    assert any(s["name"] == "ordinary update bytes accessed / adamw" for s in summary)
    payload = {
        "command": "test",
        "machine": bench_train_step.common.machine_info(),
        "wall_s": 1.0,
        "rows": rows,
        "update_rows": [],
        "summary": summary,
    }
    assert "## Key ratios" in bench_train_step.markdown(payload)


def test_train_step_hlo_copy_parser():
    from benchmarks import bench_train_step

    text = "\n".join(
        [
            "%fused_computation.1 (p: f32[4,4]) -> f32[4,4] {",
            "  ROOT %copy.9 = f32[4,4]{1,0} copy(%p)",
            "}",
            "ENTRY %main.1 (params_a: f32[4,4]) -> f32[4,4] {",
            "  %params_a = f32[4,4]{1,0} parameter(0)",
            "  %bitcast.1 = f32[16]{0} bitcast(%params_a)",
            "  %copy.1 = f32[4,4]{1,0} copy(%params_a)",
            "  %copy.4 = f32[16]{0} copy(%bitcast.1)",
            "  %copy.2 = f32[2,8]{1,0} copy(%wrapped_broadcast.3)",
            '  %copy.3 = f32[16]{0} copy(%t), metadata={op_name="jit(step)/jvp(f)/dot"}',
            "  ROOT %fusion.1 = f32[4,4]{1,0} fusion(%copy.1), calls=%fused_computation.1",
            "}",
        ]
    )
    copies = bench_train_step.hlo_copies(text)
    assert [c["operand"] for c in copies] == ["params_a", "bitcast.1", "wrapped_broadcast.3", "t"]
    assert [c["source"] for c in copies] == ["param", "param", "other", "other"]
    assert [bench_train_step.is_param_copy(c, {16}) for c in copies] == [True, True, False, False]


def test_gpu_bench_cpu_path(tmp_path):
    """bench_gpu's one command: no rows without a GPU; --allow-cpu runs a kind on the CPU."""
    from benchmarks import bench_gpu

    if jax.default_backend() != "gpu":
        assert bench_gpu.run(quick=True, kinds=["train_step"]) == []
    assert bench_gpu.main(["--out", str(tmp_path), "--kinds", "chunk", "--quick"]) == 0
    assert (tmp_path / "gpu.json").exists() and (tmp_path / "gpu.md").exists()
