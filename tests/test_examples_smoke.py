"""Smoke tests of the example scripts: they run end to end in-process on tiny settings."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from common import assets  # noqa: E402


def assert_provenance(results: dict, md: str) -> None:
    """A results file pair records the library's commit (and dirty flag) and the machine."""
    env = results["environment"]
    git = env["git"]
    if (REPO / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", git["commit"]), git
        assert isinstance(git["library_dirty"], bool), git
        assert f"commit {git['commit'][:12]}" in md
    machine = env["machine"]
    for key in ("platform", "cpu_model", "cpu_count", "device_kind"):
        assert machine[key], key
    assert machine["device_count"] == len(machine["devices"]) == jax.device_count()
    assert "- library: nanoadam_jax " in md and "- machine: " in md


def assert_help_states_defaults_once(help_text: str) -> None:
    """Every option's help names its default at most once, and never as None or False."""
    options = re.split(r"\n  (?=-)", help_text.split("options:", 1)[1])
    for option in options:
        text = " ".join(option.split())
        assert text.count("default:") <= 1, text
        assert "(default: None)" not in text and "(default: False)" not in text, text


def test_finetune_text_smoke(tmp_path):
    missing = assets.missing_assets("minilm", "rotten_tomatoes")
    if missing:
        pytest.skip("offline assets not installed; run: " + " && ".join(missing))
    import finetune_text

    returned = finetune_text.main(["--smoke", "--no-progress", "--out", str(tmp_path)])

    for name in ("finetune_text.json", "finetune_text.md", "finetune_text.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "finetune_text.json").read_text())
    assert results["config"]["smoke"] is True
    assert set(results["optimizers"]) == {"nanoadam", "adamw"}
    steps = results["config"]["steps"]
    for name, run in results["optimizers"].items():
        assert 0.0 <= run["accuracy"] <= 1.0, name
        assert all(0.0 <= a <= 1.0 for a in run["eval_accuracies"]), name
        assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == steps
        assert len(run["losses"]) == steps and all(x == x for x in run["losses"])  # no NaN
        assert run["optimizer_state_bytes"] > 0
        assert run["peak_step_bytes"] is None or run["peak_step_bytes"] > 0
        assert run["mean_step_seconds"] > 0
        assert 0.0 < run["touched_fraction"] <= 1.0
    assert results["optimizers"]["adamw"]["accuracy"] == returned["optimizers"]["adamw"]["accuracy"]
    # The plan printed before training counts the state NanoAdam really holds.
    nano = results["optimizers"]["nanoadam"]
    assert nano["plan"]["state_bytes"] == nano["optimizer_state_bytes"]
    assert nano["plan"]["state_bytes"] < nano["plan"]["adamw_bytes"]
    assert results["optimizers"]["adamw"]["plan"] is None
    table = (tmp_path / "finetune_text.md").read_text()
    assert "nanoadam" in table and "adamw" in table
    assert_provenance(results, table)


def test_finetune_text_help(capsys):
    import finetune_text

    with pytest.raises(SystemExit) as exc:
        finetune_text.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--steps", "--lr-nanoadam", "--lr-adamw", "--density", "--mask-interval",
                 "--num-layers", "--smoke", "--out", "--seed"):  # fmt: skip
        assert flag in out
    assert_help_states_defaults_once(out)
    assert "results folder (default: examples/results)" in " ".join(out.split())
