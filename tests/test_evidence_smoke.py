"""Smoke test of ``python -m benchmarks.evidence``, both tasks: every experiment in a few steps.

Checks that the outputs are well formed (files written, keys present, accuracies in [0, 1],
every method's best learning rate taken from its grid, the run cache reused), never what the
numbers say.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO / "examples", REPO):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from common import assets  # noqa: E402

ASSETS = ("mnist_cnn", "mnist", "minilm", "rotten_tomatoes")


def _acc(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def _check_table(table: dict, grid) -> None:
    assert float(table["best_lr"]) in [float(g) for g in grid]
    for row in table["rows"].values():
        mean, std = row["test"]
        assert _acc(mean) and std >= 0.0 and math.isfinite(std)
        assert row["n"] >= 1


def _smoke(tmp_path_factory, needed, name: str, *args: str):
    """Run ``python -m benchmarks.evidence --smoke ARGS`` in-process into a fresh folder, or skip
    without assets."""
    missing = assets.missing_assets(*needed)
    if missing:
        pytest.skip("offline assets not installed; run: " + " && ".join(missing))
    from benchmarks import evidence

    out = tmp_path_factory.mktemp(name)
    returned = evidence.main([*args, "--smoke", "--quiet", "--out", str(out)])
    return evidence, out, returned


def _check_e2_to_e4(docs: dict, grid, mask_intervals) -> None:
    e2 = docs["e2"]["results"]["tables"]
    assert len(e2) == 4
    for table in e2.values():
        _check_table(table, grid)

    e3 = docs["e3"]["results"]["tables"]
    for m in mask_intervals:
        assert f"reset m={m}" in e3 and f"keep m={m}" in e3
    # keep is the library default: the default variant of every experiment
    for doc in docs.values():
        nano = [r["variant"] for r in doc["runs"] if r["variant"] != "adamw"]
        assert nano and all("-keep-" in v or "-reset-" in v for v in nano)
        assert any("-keep-" in v for v in nano)

    e4 = docs["e4"]["results"]["tables"]
    assert set(e4) == {"nanoadam d=0.1", "nanoadam d=0.01", "adamw"}
    for table in e4.values():
        _check_table(table, grid)
        assert set(map(float, table["rows"])) == set(grid)


@pytest.fixture(scope="module")
def evidence_run(tmp_path_factory):
    return _smoke(tmp_path_factory, ASSETS, "evidence")


def test_files_written(evidence_run):
    _, out, returned = evidence_run
    for name in ("e1", "e2", "e3", "e4", "e5"):
        for ext in ("json", "png"):
            path = out / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
    assert (out / "runs.json").is_file()
    assert returned["wall_s"] > 0 and returned["cpu_s"] > 0
    summary = (out / "summary.md").read_text()
    for needle in ("SMOKE RUN", "Command: `python -m benchmarks.evidence", "jax ", "Date:",
                   "## E1.", "## E2.", "## E3.", "## E4.", "## E5.", "e1.png"):  # fmt: skip
        assert needle in summary, needle


def test_json_well_formed(evidence_run):
    evidence, out, _ = evidence_run
    s = evidence.SMOKE
    docs = {n: json.loads((out / f"{n}.json").read_text()) for n in ("e1", "e2", "e3", "e4", "e5")}
    for name, doc in docs.items():
        assert doc["experiment"] == name
        assert doc["machine"]["jax"] and doc["machine"]["backend"]
        assert doc["settings"]["seeds"] == list(s.seeds)
        assert doc["runs"], name
        for run in doc["runs"]:
            assert _acc(run["val_acc"]) and _acc(run["test_acc"])
            assert run["old_task_acc"] is None or _acc(run["old_task_acc"])
            assert 0.0 <= run["body_changed_fraction"] <= 1.0
            assert run["loss_curve"]

    e1 = docs["e1"]["results"]
    for method in ("nanoadam", "adamw"):
        _check_table(e1["vision"][method], s.lr_grid)
        _check_table(e1["text"][method], s.text_lr_grid)
    sb = e1["vision"]["state_bytes"]
    assert 0 < sb["nanoadam d=0.1"] < sb["adamw"]
    timing = e1["vision"]["timing"]
    assert timing["ratio_wall"] > 0 and timing["ratio_cpu"] > 0

    _check_e2_to_e4(docs, s.lr_grid, s.mask_intervals)

    e5 = docs["e5"]["results"]
    assert {"nanoadam d=0.1", "nanoadam d=0.01", "adamw"} <= set(e5["forgetting"])
    assert len(e5["forgetting"]) == 4  # + the head-sparse diagnostic
    diag = docs["e2"]["results"]["gradient_diagnostic"]
    assert set(diag["criteria"]) == {"smallest", "random", "largest"}
    assert 0.0 <= diag["all_zero_grad"] <= 1.0
    ks = {row["leaf"]: row for row in e5["rounding"]}
    assert ks["conv1/bias"]["k at d=0.01"] == 1  # round(0.32) = 0, clipped to 1
    assert ks["head/kernel"]["label"] == "dense"


def test_cache_reused(evidence_run):
    evidence, out, returned = evidence_run
    again = evidence.main(["--smoke", "--quiet", "--experiment", "e4", "--out", str(out)])
    assert again["results"]["e4"]["tables"] == returned["results"]["e4"]["tables"]
    assert "| vision" not in (out / "summary.md").read_text()  # nothing was recomputed


def test_bad_experiment_name():
    from benchmarks import evidence

    with pytest.raises(SystemExit):
        evidence.parse_args(["--experiment", "e9"])


# ------------------------------------------------------------------------------------------------
# --task text: e1-e5 on MiniLM (Rotten Tomatoes, old task BBC News)
# ------------------------------------------------------------------------------------------------

TEXT_ASSETS = ("minilm", "rotten_tomatoes", "bbc_news")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    return _smoke(tmp_path_factory, TEXT_ASSETS, "evidence-text", "--task", "text")


@pytest.mark.slow  # the vision smoke covers the package in the default suite (about 30 s saved)
def test_text_files_and_json(text_run):
    evidence, out, returned = text_run
    s = evidence.TEXT_SMOKE
    names = ("e1", "e2", "e3", "e4", "e5")
    assert set(returned["results"]) == set(names) and returned["wall_s"] > 0
    for name in names:
        for ext in ("json", "png"):
            path = out / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
    summary = (out / "summary.md").read_text()
    for needle in ("SMOKE RUN", "text task", "--task text", "BBC News", "## E1.", "## E5."):
        assert needle in summary, needle
    docs = {n: json.loads((out / f"{n}.json").read_text()) for n in names}
    for name, doc in docs.items():
        assert doc["experiment"] == name and doc["runs"], name
        for run in doc["runs"]:
            assert run["task"] == "text"
            assert _acc(run["val_acc"]) and _acc(run["test_acc"])
            assert _acc(run["old_task_acc"])  # the BBC News head on the fine-tuned encoder

    e1 = docs["e1"]["results"]
    for method in ("nanoadam", "adamw"):
        _check_table(e1[method], s.text_lr_grid)
    assert 0 < e1["state_bytes"]["nanoadam d=0.1"] < e1["state_bytes"]["adamw"]
    _check_e2_to_e4(docs, s.text_lr_grid, s.text_mask_intervals)
    assert len(docs["e2"]["results"]["gradient_diagnostic"]["criteria"]) == 3
    e5 = docs["e5"]["results"]
    # each task has its own head: no head-sparse diagnostic
    assert set(e5["forgetting"]) == {"nanoadam d=0.1", "nanoadam d=0.01", "adamw"}
    assert _acc(e5["before"]["old"])
    ks = {row["leaf"]: row for row in e5["rounding"]}
    assert ks["head/kernel"]["label"] == "dense"
    # the density is traced on both tasks: one compilation per configuration, none per density
    assert "(d=0.01)" not in summary
    ks = {row["leaf"]: row for row in e5["rounding"]}
    assert all(row["chunk"] > 0 for row in ks.values() if row["label"] == "sparse")


def test_text_default_out():
    from benchmarks import evidence

    assert evidence.parse_args(["--task", "text"]).out == evidence.DEFAULT_OUT_TEXT
    assert evidence.parse_args([]).out == evidence.DEFAULT_OUT
    with pytest.raises(SystemExit):
        evidence.parse_args(["--task", "audio"])


# ------------------------------------------------------------------------------------------------
# The run cache, the variants' keys and the opt-in experiments (e3long, e6)
# ------------------------------------------------------------------------------------------------


def test_run_cache_reads_only_the_current_library(tmp_path):
    from benchmarks.evidence.runner import RunCache, library_hash

    current = RunCache.key("vision", "sig", "adamw")
    assert current.startswith(f"lib={library_hash()[:16]}|")
    other = "lib=0123456789abcdef|vision|sig|adamw"
    old = 'vision|{"v": 3}|adamw'  # the CACHE_VERSION scheme
    path = tmp_path / "runs.json"
    path.write_text(json.dumps({current: {"a": 1}, other: {"a": 2}, old: {"a": 3}}))
    cache = RunCache(path)
    assert cache.runs == {current: {"a": 1}}  # other library code: never read
    cache.runs[RunCache.key("new")] = {"a": 4}
    cache.save()
    kept = json.loads(path.read_text())
    assert set(kept) == {current, other, old, RunCache.key("new")}  # but kept in the file


def test_variant_bias_correction_keys():
    from benchmarks.evidence import Variant

    keys = {
        bc: Variant("nanoadam", bias_correction=bc).key
        for bc in (True, "per_entry", "global", "gradient", False)
    }
    assert keys[True] == keys["per_entry"] == "nanoadam-smallest-keep-m100"
    assert len(set(keys.values())) == 4
    assert Variant("nanoadam", bias_correction="per_entry") == Variant("nanoadam")
    with pytest.raises(ValueError):
        Variant("nanoadam", bias_correction="age")


def test_opt_in_experiments_run_alone():
    from benchmarks import evidence
    from benchmarks.evidence.settings import OPT_IN_OUT

    assert evidence.parse_args(["--experiment", "e6"]).out == OPT_IN_OUT["e6"]
    assert evidence.parse_args(["--experiment", "e3long"]).out == OPT_IN_OUT["e3long"]
    assert "e6" not in evidence.parse_args([]).experiments  # opt-in: not in 'all'
    with pytest.raises(SystemExit):
        evidence.parse_args(["--experiment", "e6,e1"])


def test_e6_smoke(tmp_path):
    """E6 in seconds: a 0-layer MiniLM, a few reviews and steps; then resumed from the cache."""
    missing = assets.missing_assets("minilm", "rotten_tomatoes", "bbc_news")
    if missing:
        pytest.skip("offline assets not installed; run: " + " && ".join(missing))
    from benchmarks import evidence
    from benchmarks.evidence.e6 import E6_SMOKE
    from benchmarks.evidence.runner import library_hash

    args = ["--experiment", "e6", "--smoke", "--quiet", "--out", str(tmp_path)]
    returned = evidence.main(args)
    for ext in ("json", "md", "png"):
        assert (tmp_path / f"e6.{ext}").stat().st_size > 0
    doc = json.loads((tmp_path / "e6.json").read_text())
    assert doc["library_hash"] == library_hash() and doc["machine"]["git"]
    assert "python -m benchmarks.evidence --experiment e6" in (tmp_path / "e6.md").read_text()
    res = doc["results"]
    assert list(res["arms"]) == ["adamw", "nanoadam d=0.1", "nanoadam 10%->4%"]
    for a in res["arms"].values():
        assert a["best_lr"] in a["lrs"]
        assert _acc(a["test"]["mean"]) and a["test"]["n"] == len(E6_SMOKE.seeds)
        assert len(a["curves"]) == len(E6_SMOKE.seeds)
        assert all(len(c) == E6_SMOKE.eval_points for c in a["curves"])
    for run in doc["runs"]:
        assert run["library_hash"] == library_hash()
        assert _acc(run["val_acc"]) and _acc(run["test_acc"]) and _acc(run["bbc_acc"])
    cached = json.loads((tmp_path / "runs.json").read_text())
    assert len(cached) == len(doc["runs"])  # 2 LRs + 1 (adamw), 1 + 1 (each NanoAdam arm)
    again = evidence.main(args)  # resumes: every run from the cache
    assert again["results"]["arms"] == returned["results"]["arms"]


@pytest.mark.slow  # about 3 minutes on 2 busy cores
def test_e3long_smoke(tmp_path):
    missing = assets.missing_assets("mnist_cnn", "mnist")
    if missing:
        pytest.skip("offline assets not installed; run: " + " && ".join(missing))
    from benchmarks import evidence

    evidence.main(["--experiment", "e3long", "--smoke", "--quiet", "--out", str(tmp_path)])
    doc = json.loads((tmp_path / "e3long.json").read_text())
    tables = doc["results"]["tables"]
    assert len(tables) == 5  # 4 arms + the default at reset's LR times the measured boost
    assert {r["variant"].rsplit("-", 1)[-1] for r in doc["runs"]} >= {"bcglobal", "bcgrad"}
    for sizes in doc["results"]["update_sizes"].values():
        assert set(sizes) == {"keep + global", "reset", "keep + per-entry age", "keep + gradient"}
    assert (tmp_path / "e3long.png").stat().st_size > 0
