"""Smoke test of the benchmark suite: quick mode, in-process, into a temporary folder.

Checks that the results are well formed (keys present, positive numbers, files written),
never the timings themselves.
"""

from __future__ import annotations

import json
import math
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
    assert set(data["sections"]) == {"update", "selection", "memory", "gpu"}
    assert data["summary"] == json.loads(json.dumps(results["summary"]))
    assert "## Key ratios" in md
    for section in data["sections"].values():
        assert f"## {section['title']}" in md
    for key in MACHINE_KEYS:
        assert key in data["machine"], key
    assert positive(data["machine"]["cpu_count"])
    assert data["machine"]["backend"] == jax.default_backend()
    assert positive(data["wall_s"])


def test_update_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["update"]["rows"]
    names = {r["optimizer"] for r in rows}
    assert {"adamw", "adam"} <= names
    nano = [r for r in rows if r["optimizer"].startswith("nanoadam")]
    plain = [r for r in nano if not r["optimizer"].startswith("nanoadam-scatter")]
    assert sorted(r["density"] for r in plain) == [0.01, 0.05, 0.1, 0.5]
    assert [r["density"] for r in nano if r not in plain] == [0.1]
    for r in rows:
        for key in ("n_params", "step_ms", "ratio_vs_adamw", "state_bytes", "compile_s"):
            assert positive(r[key]), (r["optimizer"], key)
        assert len(r["step_ms_rounds"]) == r["rounds"] >= 1
        assert r["steps"] == 100
    adamw = next(r for r in rows if r["optimizer"] == "adamw")
    assert adamw["ratio_vs_adamw"] == 1.0
    for r in nano:
        assert r["mask_interval"] == 100
        assert r["state_floor"] == pytest.approx(1.5 * r["density"])
        assert 0 < r["state_ratio_vs_adamw"] < 1
        for key in ("refresh_step_ms", "normal_step_ms", "adamw_single_step_ms"):
            assert positive(r[key]), (r["optimizer"], key)
        assert isinstance(r["refresh_cost_adamw_steps"], float)


def test_selection_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["selection"]["rows"]
    methods = {r["method"] for r in rows}
    assert methods == {"bisection", "sort", "top_k", "approx_min_k"}
    for r in rows:
        assert positive(r["ms"]) and positive(r["ratio_vs_bisection"])
        assert r["selected"] == r["k"] > 0
        assert 0 <= r["recall"] <= 1
        if r["method"] != "approx_min_k":
            assert r["exact_match"] is True, r
    assert all(r["ratio_vs_bisection"] == 1.0 for r in rows if r["method"] == "bisection")


def test_memory_rows(quick_results):
    _, results = quick_results
    rows = results["sections"]["memory"]["rows"]
    assert {r["optimizer"] for r in rows} == {
        "adamw",
        "nanoadam d=0.1",
        "nanoadam-scatter d=0.1",
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
    nano = next(r for r in rows if r["optimizer"] != "adamw")
    assert nano["state_ratio_vs_adamw"] < 1
    assert nano["state_floor"] == pytest.approx(0.15)
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
        "peak memory nanoadam / adamw",
        "update time nanoadam(inplace_apply=False) / adamw",
        "peak memory nanoadam(inplace_apply=False) / adamw",
        "peak memory nanoadam(moment_dtype=bf16) / adamw",
    ):
        assert wanted in names
    for s in results["summary"]:
        assert isinstance(s["value"], float), s
        assert s["met"] in (True, False, None)


def test_update_cost_diagnostic_runs(tmp_path):
    from benchmarks import diag_update_cost

    out = tmp_path / "diag.md"
    assert diag_update_cost.main(["--params", "2e5", "--out", str(out)]) == 0
    rows = [
        line for line in out.read_text().splitlines() if line.startswith("| ") and "ms" not in line
    ]
    assert [r.split(" | ")[0][2:] for r in rows] == [
        "optax.adamw",
        "nanoadam",
        "nanoadam(inplace_apply=False)",
        "nanoadam, refresh cond removed",
        "nanoadam(inplace_apply=False), cond removed",
    ]
    assert float(rows[0].split(" | ")[2].strip(" |")) == 1.0
    assert jax.lax.cond.__module__.startswith("jax")  # the patch is undone


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
