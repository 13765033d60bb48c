"""Smoke test of ``examples/llama_fsdp.py``: a stacked-layer Llama on an 8-device FSDP mesh.

The script runs in-process with ``--smoke`` (2 layers, d=32, a few steps) on the 8 host CPU
devices that ``conftest.py`` asks XLA for. It uses the offline text assets when they are
installed, else its synthetic data (``--data synthetic``). What would break: NanoAdam's state
on a device above AdamW's (state not sharded, or not compact), a layer with no entry moved
(selection across the stacked layers instead of per layer), a non-finite loss.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "examples") not in sys.path:
    sys.path.insert(0, str(REPO / "examples"))

from common import assets  # noqa: E402
from test_examples_smoke import assert_help_states_defaults_once, assert_provenance  # noqa: E402

#: The stacked weight matrices of a decoder layer.
MATRICES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


def _data_flag() -> list[str]:
    import llama_fsdp

    return [] if not assets.missing_assets(*llama_fsdp.ASSET_NAMES) else ["--data", "synthetic"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (conftest.py sets XLA_FLAGS for 8 host CPU devices)")
    import llama_fsdp

    out = tmp_path_factory.mktemp("llama")
    returned = llama_fsdp.main(["--smoke", "--no-progress", "--out", str(out), *_data_flag()])
    results = json.loads((out / "llama_fsdp.json").read_text())
    return out, results, returned


def test_llama_fsdp_writes_results(smoke_run):
    out, results, returned = smoke_run
    for name in ("llama_fsdp.json", "llama_fsdp.md", "llama_fsdp.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "llama_fsdp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["config"]["smoke"] is True
    assert results["mesh"]["devices"] == 8
    assert "No real pretrained Llama weights" in results["pretrained_note"]
    md = (out / "llama_fsdp.md").read_text()
    assert "No real pretrained Llama weights" in md
    assert_provenance(results, md)
    assert (
        returned["optimizers"]["adamw"]["state_bytes"]
        == (results["optimizers"]["adamw"]["state_bytes"])
    )


def test_llama_fsdp_state_per_device_below_adamw(smoke_run):
    _, results, _ = smoke_run
    nano, adamw = results["optimizers"]["nanoadam"], results["optimizers"]["adamw"]
    assert 0 < nano["state_bytes_device0"] < adamw["state_bytes_device0"]
    assert nano["state_bytes"] < adamw["state_bytes"]
    # Sharded: a device holds well under the whole state (the norms and counters replicate).
    assert nano["state_bytes_device0"] < nano["state_bytes"] / 2
    assert adamw["state_bytes_device0"] < adamw["state_bytes"] / 2
    # The state rows of each stacked kernel: one row block per layer, sharded over fsdp.
    layers = results["config"]["num_layers"]
    stacked = [r for r in results["state_layout"] if r["leaf"].startswith("layers.")]
    assert {r["leaf"].removeprefix("layers.").removesuffix(".kernel") for r in stacked} == MATRICES
    for r in stacked:
        assert r["positions_shape"][0] == layers, r
        assert "fsdp" in r["positions_spec"] and "fsdp" in r["param_spec"], r


def test_llama_fsdp_selects_every_layer(smoke_run):
    _, results, _ = smoke_run
    layers = results["config"]["num_layers"]
    density = results["config"]["density"]
    nano = results["optimizers"]["nanoadam"]["moved_per_layer"]
    assert set(nano) == MATRICES
    for matrix, fractions in nano.items():
        assert len(fractions) == layers, matrix
        # Per-layer selection: every layer moves, none beyond what the refreshes can select.
        assert all(0.0 < f <= min(1.0, 3 * density) for f in fractions), (matrix, fractions)
    adamw = results["optimizers"]["adamw"]["moved_per_layer"]
    assert all(min(f) > 0.9 for f in adamw.values())
    # The plan found the layer axis of every stacked kernel (from the nnx.vmap metadata).
    kernels = [leaf for leaf in results["plan"]["leaves"] if "['layers']" in leaf["leaf"]]
    for leaf in kernels:
        if leaf["label"] == "sparse":
            assert leaf["layer_axes"] == [0], leaf
    assert sum(leaf["label"] == "sparse" for leaf in kernels) == len(MATRICES)
    head = [leaf for leaf in results["plan"]["leaves"] if "lm_head" in leaf["leaf"]]
    assert [leaf["label"] for leaf in head] == ["dense"]


def test_llama_fsdp_losses_finite(smoke_run):
    _, results, _ = smoke_run
    assert len(results["pretrain"]["losses"]) == results["config"]["pretrain_steps"]
    for run in (results["pretrain"], *results["optimizers"].values()):
        assert all(math.isfinite(x) for x in run["losses"])
        for curve in run["eval_loss"].values():
            assert all(math.isfinite(x) for x in curve)
    for run in results["optimizers"].values():
        assert len(run["losses"]) == results["config"]["steps"]
        assert run["compile_seconds"] > 0 and run["mean_step_seconds"] > 0


def test_llama_model_tied_and_untied():
    """The model on its own: logits' shape, the tied variant has no lm_head, layers stacked."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    from flax import nnx
    from llama_fsdp import LlamaConfig, LlamaForCausalLM, make_mesh, nanoadam_labels, on_mesh

    import nanoadam_jax as nanoadam

    ids = jax.numpy.zeros((8, 5), jax.numpy.int32)
    with on_mesh(make_mesh(8)):
        for tie in (False, True):
            cfg = LlamaConfig(d_model=16, num_layers=3, num_heads=2, d_ff=32, tie_embeddings=tie)
            model = LlamaForCausalLM(cfg, nnx.Rngs(0))
            assert model(ids).shape == (8, 5, 256)
            assert hasattr(model, "lm_head") is not tie
            state = nnx.state(model, nnx.Param)
            assert state["layers"]["self_attn"]["q_proj"]["kernel"].shape == (3, 16, 16)
            labels = nanoadam.label_params(state, nanoadam_labels(cfg))
            embed = jax.tree.leaves(labels["embed_tokens"])
            assert embed == ["dense" if tie else "sparse"]


def test_llama_fsdp_help(capsys):
    import llama_fsdp

    with pytest.raises(SystemExit) as exc:
        llama_fsdp.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--smoke", "--out", "--seed", "--steps", "--pretrain-steps", "--num-layers",
                 "--density", "--devices", "--tie-embeddings", "--data"):  # fmt: skip
        assert flag in out
    assert_help_states_defaults_once(out)
