"""Smoke tests of the text examples: continual learning and why-small-weights.

The two scripts run in-process with ``--smoke`` (1 encoder layer, tiny data, a few steps).
Everything is skipped cleanly when the offline assets are missing. The Colab notebook is tested in
``tests/test_notebook.py``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from common import assets  # noqa: E402
from test_examples_smoke import assert_help_states_defaults_once, assert_provenance  # noqa: E402


def _require(*names: str) -> None:
    missing = assets.missing_assets(*names)
    if missing:
        pytest.skip("offline assets not installed; run: " + " && ".join(missing))


def test_continual_text_smoke(tmp_path):
    _require("minilm", "rotten_tomatoes", "bbc_news")
    import continual_text

    returned = continual_text.main(["--smoke", "--no-progress", "--out", str(tmp_path)])

    for name in ("continual_text.json", "continual_text.md", "continual_text.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "continual_text.json").read_text())
    assert results["config"]["smoke"] is True
    assert 0.0 <= results["bbc"]["accuracy_before"] <= 1.0
    steps = results["config"]["steps"]
    assert set(results["runs"]) == {"nanoadam@0.1", "adamw"}
    for name, run in results["runs"].items():
        assert 0.0 <= run["sentiment_accuracy"] <= 1.0, name
        assert run["bbc_accuracies"][0] == results["bbc"]["accuracy_before"]
        assert run["bbc_forgetting"] == pytest.approx(
            results["bbc"]["accuracy_before"] - run["bbc_accuracy_after"]
        )
        assert run["eval_steps"][0] == 0 and run["eval_steps"][-1] == steps
        assert len(run["losses"]) == steps and all(math.isfinite(x) for x in run["losses"])
        assert 0.0 < run["encoder_touched_fraction"] <= 1.0
    nano, adamw = results["runs"]["nanoadam@0.1"], results["runs"]["adamw"]
    # NanoAdam moves at most ~10% of each sparse tensor (+ the dense LayerNorms).
    assert nano["encoder_touched_fraction"] < 0.15
    assert nano["optimizer_state_bytes"] < adamw["optimizer_state_bytes"]
    assert returned["runs"]["adamw"]["sentiment_accuracy"] == adamw["sentiment_accuracy"]
    assert "nanoadam@0.1" in (tmp_path / "continual_text.md").read_text()
    assert_provenance(results, (tmp_path / "continual_text.md").read_text())


def test_continual_text_parse_runs():
    import continual_text

    runs = continual_text.parse_runs("nanoadam:0.1, nanoadam:0.01:1e-3 ,adamw:3e-5", 2e-4, 5e-5)
    assert [r["name"] for r in runs] == ["nanoadam@0.1", "nanoadam@0.01", "adamw"]
    assert [r["lr"] for r in runs] == [2e-4, 1e-3, 3e-5]
    for bad in ("nanoadam", "nanoadam:0", "adamw,adamw", "sgd", ""):
        with pytest.raises(ValueError):
            continual_text.parse_runs(bad, 1.0, 1.0)


def test_why_small_weights_smoke(tmp_path):
    _require("minilm", "rotten_tomatoes")
    import why_small_weights

    why_small_weights.main(["--smoke", "--no-progress", "--out", str(tmp_path)])

    for name in (
        "why_small_weights.json",
        "why_small_weights.md",
        "why_small_weights.png",
        "why_small_weights_layers.png",
    ):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "why_small_weights.json").read_text())
    steps = [s["step"] for s in results["snapshots"]]
    assert steps == [0, results["config"]["steps"]]
    metrics = results["snapshots"][0]["metrics"]
    assert set(results["scattered"]) <= set(metrics)
    assert "head" in metrics and "L0.attn.query" in metrics and "L0.ffn.intermediate" in metrics
    for name, m in metrics.items():
        assert m["ratio"] is not None and m["ratio"] > 0, name
        assert 0.0 <= m["top1_share"] <= 1.0 and -1.0 <= m["spearman"] <= 1.0, name
    assert set(results["movement_ratio"]) == set(metrics)
    assert_provenance(results, (tmp_path / "why_small_weights.md").read_text())


def test_why_small_weights_select_matches_library():
    import jax.numpy as jnp
    import numpy as np
    import why_small_weights

    import nanoadam_jax as nanoadam

    w = np.random.default_rng(0).normal(size=(37, 11)).astype(np.float32)  # no ties
    for density, criterion in ((0.1, "smallest"), (0.3, "largest"), (0.01, "smallest")):
        ours = why_small_weights.select(w, density, criterion)
        lib = np.asarray(nanoadam.select_mask(jnp.asarray(w), density, criterion=criterion))
        np.testing.assert_array_equal(ours, lib.reshape(-1))


@pytest.mark.parametrize("module", ["continual_text", "why_small_weights"])
def test_help(module, capsys):
    mod = __import__(module)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--smoke", "--out", "--seed", "--steps", "--num-layers"):
        assert flag in out
    assert_help_states_defaults_once(out)
