"""A Llama-style decoder with stacked layers, sharded FSDP over 8 devices: NanoAdam vs AdamW.

The model is a small Llama (RMSNorm, rotary attention, SwiGLU MLP, an untied ``lm_head`` or,
with ``--tie-embeddings``, the embedding as the output layer) whose decoder layers are created
once, stacked, with ``nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: "layers"})`` and run
with ``nnx.scan``. Every weight is annotated with ``nnx.with_partitioning``: FSDP-style specs
(``("fsdp", None)``: the first axis of each matrix split over the devices) on a one-axis
``"fsdp"`` mesh of 8 devices. On a CPU-only machine the script asks XLA for 8 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set before jax is imported unless the
flag is already there); the batch is split over the same axis (data parallel).

What NanoAdam sees: every stacked kernel has shape ``(layers, d_in, d_out)`` and the metadata
names its axis 0 ``"layers"``, so each layer is selected on its own (``k`` per chunk of each
layer, never across layers), and its state rows are sharded like the parameter rows they index.
The ``"layers"`` name is not a mesh axis: ``nnx.logical_axis_rules([("layers", None)])`` maps it
to none (the layer axis is replicated), which Flax needs whenever it shards a variable from that
metadata (``nnx.Optimizer`` does for both optimizers' states).

**No real pretrained Llama weights ship offline**, so the model starts from random init. To make
the small-weights premise meaningful, it is first pre-trained briefly with AdamW (character-level
next-byte prediction on Rotten Tomatoes review snippets, ``--pretrain-steps``); then a copy of the
pre-trained model is fine-tuned with each optimizer on a shifted task, BBC News articles (both
offline assets, see ``examples/common/assets.py``). Held-out loss on both domains is tracked:
the new one (learning) and the old one (forgetting). ``--data synthetic`` replaces the two text
domains by two random first-order Markov "languages" (no assets needed).

Reported per optimizer: the per-device optimizer-state bytes (the sum of the state's addressable
shards on device 0), the whole state's bytes, compile time, mean step time, the loss curves, and
the fraction of each stacked weight matrix's entries that moved, per layer (bar plot). The script
prints NanoAdam's plan first (``nanoadam.plan``: per leaf the label, layer axes, chunking,
entries trained and state bytes against ``optax.adamw``'s) and, once the optimizer exists, the
state layout it really got on the mesh (the chunks are halved until each lies on one shard).

::

    python examples/llama_fsdp.py            # writes examples/results/llama_fsdp.*
    python examples/llama_fsdp.py --smoke    # 2 layers, d=32, a few steps (well under a minute)
    python examples/llama_fsdp.py --help

Outputs (in ``--out``): ``llama_fsdp.json`` (all numbers and curves), ``llama_fsdp.md`` (the
tables) and ``llama_fsdp.png`` (entries moved per layer and matrix, loss curves, state bytes).
On 8 *host* devices the step and compile times measure XLA:CPU's partitioned program on the
machine's cores, not an accelerator's; the state bytes are what they would be anywhere.
"""

from __future__ import annotations

import os

_DEVICE_FLAG = "--xla_force_host_platform_device_count"
if _DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):  # before jax is imported
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICE_FLAG}=8".strip()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from common import assets, cli  # noqa: E402
from common.plans import plan_summary  # noqa: E402
from common.progress import progress  # noqa: E402
from common.results import environment, write_results  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import nanoadam_jax as nanoadam  # noqa: E402

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "device_bytes",
    "load_domains",
    "main",
    "make_mesh",
    "moved_per_layer",
    "parse_args",
]

#: Optimizers compared in the fine-tuning phase, in table order.
OPTIMIZERS = ("nanoadam", "adamw")
#: Offline assets of ``--data text``.
ASSET_NAMES = ("rotten_tomatoes", "bbc_news")
#: The mesh axis the weights (first axis) and the batch are split over.
FSDP = "fsdp"
#: Name of the stacked-layer axis in the variables' metadata (what NanoAdam looks for).
LAYERS = "layers"

FULL_DEFAULTS = dict(
    pretrain_steps=300,
    steps=200,
    batch_size=32,
    seq_len=128,
    num_layers=4,
    d_model=128,
    num_heads=4,
    d_ff=384,
    eval_every=25,
    eval_batches=4,
    mask_interval=50,
)
SMOKE_DEFAULTS = dict(
    pretrain_steps=4,
    steps=4,
    batch_size=8,
    seq_len=32,
    num_layers=2,
    d_model=32,
    num_heads=2,
    d_ff=64,
    eval_every=2,
    eval_batches=1,
    mask_interval=2,
)


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; unset size flags take the full-run or ``--smoke`` defaults."""
    p = cli.parser(
        "llama_fsdp.py",
        "Pre-train a small Llama-style decoder (layers stacked with nnx.vmap, run with nnx.scan, "
        "FSDP over 8 devices) briefly with AdamW, then fine-tune it on a shifted task with "
        "NanoAdam and with AdamW: per-device optimizer state, compile and step time, loss "
        "curves, entries moved per layer. Runs offline on CPU.",
    )
    sized = cli.sized_adder(p, FULL_DEFAULTS, SMOKE_DEFAULTS)
    sized("--pretrain-steps", "pretrain_steps", int, "AdamW pre-training steps (old domain)")
    sized("--steps", "steps", int, "fine-tuning steps per optimizer (new domain)")
    sized("--batch-size", "batch_size", int, "sequences per batch (split over the devices)")
    sized("--seq-len", "seq_len", int, "bytes per training sequence")
    sized("--num-layers", "num_layers", int, "decoder layers (stacked)")
    sized("--d-model", "d_model", int, "model width")
    sized("--num-heads", "num_heads", int, "attention heads")
    sized("--d-ff", "d_ff", int, "SwiGLU hidden width")
    sized("--eval-every", "eval_every", int, "evaluate every this many steps")
    sized("--eval-batches", "eval_batches", int, "held-out batches per domain and evaluation")
    sized("--mask-interval", "mask_interval", int, "NanoAdam: re-select weights every N steps")
    p.add_argument(
        "--density", type=float, default=0.1, help="NanoAdam: fraction of each chunk updated"
    )
    p.add_argument("--lr-pretrain", type=float, default=3e-3, help="AdamW pre-training peak lr")
    p.add_argument("--lr-nanoadam", type=float, default=3e-3, help="NanoAdam fine-tuning lr")
    p.add_argument("--lr-adamw", type=float, default=3e-4, help="AdamW fine-tuning lr")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument(
        "--tie-embeddings",
        action="store_true",
        help="use the embedding as the output layer (labelled dense) instead of an lm_head",
    )
    p.add_argument(
        "--devices", type=int, default=8, help="devices of the FSDP mesh (at most those present)"
    )
    p.add_argument(
        "--data",
        choices=("text", "synthetic"),
        default="text",
        help="text: Rotten Tomatoes then BBC News bytes (offline assets); synthetic: two random "
        "Markov languages",
    )
    p.add_argument(
        "--optimizers", default=",".join(OPTIMIZERS), help="comma-separated fine-tuning runs"
    )
    cli.add_run_flags(p, seed_help="seed of the init, the data windows and the batch order")
    args = p.parse_args(argv)
    cli.fill_sized_defaults(args, FULL_DEFAULTS, SMOKE_DEFAULTS)
    args.optimizers = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    if not args.optimizers or set(args.optimizers) - set(OPTIMIZERS):
        p.error(f"--optimizers must be a non-empty subset of {list(OPTIMIZERS)}")
    positive = ("steps", "batch_size", "seq_len", "num_layers", "d_model", "num_heads", "d_ff",
                "eval_every", "eval_batches", "mask_interval", "devices")  # fmt: skip
    for name in positive:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.pretrain_steps < 0:
        p.error("--pretrain-steps must be >= 0")
    if args.d_model % args.num_heads or (args.d_model // args.num_heads) % 2:
        p.error("--d-model must be a multiple of --num-heads with an even head size (rotary)")
    if not 0.0 < args.density <= 1.0:
        p.error("--density must be in (0, 1]")
    return args


# ------------------------------------------------------------------------------------------------
# The model
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Sizes of :class:`LlamaForCausalLM` (byte-level vocabulary by default)."""

    vocab_size: int = 256
    d_model: int = 128
    num_layers: int = 4
    num_heads: int = 4
    d_ff: int = 384
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads


_INIT = nnx.initializers.normal(0.02)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
    """A bias-free projection whose kernel ``(d_in, d_out)`` is split over ``fsdp`` on axis 0."""
    init = nnx.with_partitioning(_INIT, (FSDP, None))
    return nnx.Linear(d_in, d_out, use_bias=False, kernel_init=init, rngs=rngs)


def _rms_norm(d: int, eps: float, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """RMSNorm with a replicated scale (annotated, so that a stacked one gets its layer axis)."""
    init = nnx.with_partitioning(nnx.initializers.ones_init(), (None,))
    return nnx.RMSNorm(d, epsilon=eps, scale_init=init, rngs=rngs)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Rotary cosines and sines, ``(seq_len, head_dim // 2)`` each."""
    inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x`` ``(batch, seq, heads, head_dim)`` by position (Llama's rotate-half form)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


class Attention(nnx.Module):
    """Causal multi-head self-attention with rotary position embeddings."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.q_proj = _linear(cfg.d_model, cfg.d_model, rngs)
        self.k_proj = _linear(cfg.d_model, cfg.d_model, rngs)
        self.v_proj = _linear(cfg.d_model, cfg.d_model, rngs)
        self.o_proj = _linear(cfg.d_model, cfg.d_model, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        heads = (b, t, self.cfg.num_heads, self.cfg.head_dim)
        q = apply_rope(self.q_proj(x).reshape(heads), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(heads), cos, sin)
        v = self.v_proj(x).reshape(heads)
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.reshape(b, t, self.cfg.d_model))


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.d_model, cfg.d_ff, rngs)
        self.up_proj = _linear(cfg.d_model, cfg.d_ff, rngs)
        self.down_proj = _linear(cfg.d_ff, cfg.d_model, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm Llama block: attention and MLP, each behind an RMSNorm and a residual."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.input_layernorm = _rms_norm(cfg.d_model, cfg.norm_eps, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = _rms_norm(cfg.d_model, cfg.norm_eps, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nnx.Module):
    """Embedding, ``num_layers`` stacked decoder layers (one ``nnx.scan``), final norm, head.

    Create it under ``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules([("layers", None)])``
    (see :func:`on_mesh`): the weights are then created sharded. Every leaf of ``layers`` has a
    leading axis of ``num_layers`` named ``"layers"`` in its metadata.
    """

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nnx.with_partitioning(_INIT, (FSDP, None)),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
        def stacked_layers(rngs: nnx.Rngs) -> DecoderLayer:
            return DecoderLayer(cfg, rngs)

        self.layers = stacked_layers(rngs)
        self.norm = _rms_norm(cfg.d_model, cfg.norm_eps, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg.d_model, cfg.vocab_size, rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Next-token logits ``(batch, seq, vocab)`` for token ids ``(batch, seq)``."""
        cos, sin = rope_tables(ids.shape[1], self.cfg.head_dim, self.cfg.rope_theta)
        x = self.embed_tokens(ids)

        @nnx.scan(
            in_axes=(0, nnx.Carry),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: LAYERS},
        )
        def run_layers(layer: DecoderLayer, h: jax.Array) -> jax.Array:
            return layer(h, cos, sin)

        x = self.norm(run_layers(self.layers, x))
        if self.cfg.tie_embeddings:
            return self.embed_tokens.attend(x)
        return self.lm_head(x)


def nanoadam_labels(cfg: LlamaConfig):
    """NanoAdam's labels: the defaults (``lm_head`` and the norms dense, the rest sparse), and
    with tied embeddings the embedding dense too, as it is also the output layer."""
    if not cfg.tie_embeddings:
        return None

    def labels(path, leaf):
        if "embed_tokens" in nanoadam.path_names(path):
            return nanoadam.DENSE
        return nanoadam.default_labels(path, leaf)

    return labels


# ------------------------------------------------------------------------------------------------
# Mesh and memory
# ------------------------------------------------------------------------------------------------


def make_mesh(n: int) -> jax.sharding.Mesh:
    """A one-axis ``fsdp`` mesh over the first ``n`` devices (Auto axis: XLA places the rest)."""
    return jax.make_mesh((n,), (FSDP,), axis_types=(AxisType.Auto,), devices=jax.devices()[:n])


@contextlib.contextmanager
def on_mesh(mesh: jax.sharding.Mesh) -> Iterator[None]:
    """``mesh`` as the current mesh, with the ``"layers"`` metadata axis mapped to no mesh axis."""
    with jax.set_mesh(mesh), nnx.logical_axis_rules([(LAYERS, None)]):
        yield


def device_bytes(tree: Any, device: Any) -> int:
    """Bytes of ``tree``'s arrays held on ``device``: the sum of its addressable shards there."""
    total = 0
    for x in jax.tree.leaves(tree):
        for shard in getattr(x, "addressable_shards", ()):
            if shard.device == device:
                total += shard.data.nbytes
    return int(total)


def total_bytes(tree: Any) -> int:
    """Bytes of ``tree``'s arrays as logical (unsharded) arrays."""
    return int(sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree)))


def _spec(x: Any) -> str:
    spec = getattr(getattr(x, "sharding", None), "spec", None)
    return str(tuple(spec)) if spec is not None else "-"


def state_layout(model: LlamaForCausalLM, optimizer: nnx.Optimizer) -> list[dict[str, Any]]:
    """Per sparse leaf, the NanoAdam state it really got on the mesh: the positions' shape and
    sharding next to the parameter's (``(*layers, *chunk grid, k)``), and the chunk length."""
    selected = nnx.to_pure_dict(optimizer.opt_state[0].selected)
    flat_sel = dict(jax.tree_util.tree_flatten_with_path(selected)[0])
    rows = []
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key = tuple(jax.tree_util.DictKey(p) for p in path)
        pos = flat_sel.get(key)
        if pos is None:
            continue
        value = var.get_value()
        rows.append(
            {
                "leaf": ".".join(map(str, path)),
                "shape": list(value.shape),
                "param_spec": _spec(value),
                "positions_shape": list(pos.shape),
                "positions_spec": _spec(pos),
                "chunk": int(value.size // int(np.prod(pos.shape[:-1]))),
                "k_per_chunk": int(pos.shape[-1]),
            }
        )
    return rows


def chunking_differs(plan_rows: list[dict[str, Any]], layout: list[dict[str, Any]]) -> list[str]:
    """Leaves whose chunk length in the plan differs from the optimizer state's."""
    planned = {".".join(re.findall(r"\['([^']*)'\]", r["leaf"])): r["chunk"] for r in plan_rows}
    return [r["leaf"] for r in layout if planned.get(r["leaf"]) not in (None, r["chunk"])]


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


def _bytes_of(texts: list[str]) -> np.ndarray:
    return np.frombuffer("\n".join(texts).encode("utf-8"), dtype=np.uint8).astype(np.int32)


def _markov_stream(n: int, vocab: int, seed: int) -> np.ndarray:
    """``n`` symbols of a random first-order Markov chain (each symbol has 4 likely successors)."""
    rng = np.random.default_rng(seed)
    probs = np.full((vocab, vocab), 0.02 / vocab)
    for a in range(vocab):
        probs[a, rng.choice(vocab, 4, replace=False)] += 0.98 / 4
    probs /= probs.sum(1, keepdims=True)
    cum = np.cumsum(probs, 1)
    out = np.empty(n, np.int32)
    out[0] = 0
    u = rng.random(n)
    for i in range(1, n):
        out[i] = min(int(np.searchsorted(cum[out[i - 1]], u[i])), vocab - 1)
    return out


def load_domains(data: str) -> dict[str, dict[str, Any]]:
    """The two domains as byte streams: ``{"old": {...}, "new": {...}}``, each with ``name``,
    ``train`` and ``eval`` (int32 arrays; 10% of the documents held out, split with seed 0)."""
    if data == "synthetic":
        out = {}
        for key, name, seed in (("old", "Markov language A", 1), ("new", "Markov language B", 2)):
            stream = _markov_stream(120_000, 64, seed)
            out[key] = {"name": name, "train": stream[:100_000], "eval": stream[100_000:]}
        return out
    rt_texts, _ = assets.load_rotten_tomatoes()
    bbc_texts, _, _ = assets.load_bbc_news()
    out = {}
    for key, name, texts in (("old", "Rotten Tomatoes", rt_texts), ("new", "BBC News", bbc_texts)):
        train_idx, eval_idx = assets.split_indices(len(texts), test_size=0.1, seed=0)
        out[key] = {
            "name": name,
            "train": _bytes_of([texts[i] for i in train_idx]),
            "eval": _bytes_of([texts[i] for i in eval_idx]),
        }
    return out


def windows(stream: np.ndarray, count: int, length: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` random windows of ``length`` consecutive symbols, ``(count, length)``."""
    starts = rng.integers(0, len(stream) - length, size=count)
    return np.stack([stream[s : s + length] for s in starts])


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def _loss_fn(model: LlamaForCausalLM, batch: jax.Array) -> jax.Array:
    logits = model(batch[:, :-1]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def train_step(model: LlamaForCausalLM, optimizer: nnx.Optimizer, batch: jax.Array) -> jax.Array:
    """One optimisation step in place; returns the batch loss."""
    loss, grads = nnx.value_and_grad(_loss_fn)(model, batch)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model: LlamaForCausalLM, batch: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy (nats per byte) on ``batch``."""
    return _loss_fn(model, batch)


def _flat_params(model: LlamaForCausalLM) -> dict[tuple, np.ndarray]:
    return {
        tuple(p): np.array(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def moved_per_layer(
    before: dict[tuple, np.ndarray], model: LlamaForCausalLM
) -> dict[str, list[float]]:
    """Per stacked weight matrix (``"self_attn.q_proj"``...), the fraction of each layer's entries
    whose value differs from ``before``."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        now = np.asarray(var.get_value())
        if path[0] != "layers" or now.ndim != 3:  # stacked matrices only (not the norms)
            continue
        changed = (now != before[path]).reshape(now.shape[0], -1).mean(axis=1)
        out[".".join(map(str, path[1:-1]))] = [float(c) for c in changed]
    return out


def _moved_fraction(before: dict[tuple, np.ndarray], model: LlamaForCausalLM) -> dict[str, float]:
    changed = {"all": [0, 0], "layers": [0, 0]}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        now = np.asarray(var.get_value())
        diff = int(np.count_nonzero(now != before[tuple(path)]))
        for group in ("all", "layers") if path[0] == "layers" else ("all",):
            changed[group][0] += diff
            changed[group][1] += now.size
    return {g: c / max(n, 1) for g, (c, n) in changed.items()}


def train(
    name: str,
    model: LlamaForCausalLM,
    tx: optax.GradientTransformation,
    steps: int,
    train_stream: np.ndarray,
    eval_sets: dict[str, list[jax.Array]],
    args: argparse.Namespace,
    mesh: jax.sharding.Mesh,
    seed: int,
) -> tuple[nnx.Optimizer, dict[str, Any]]:
    """Train ``model`` in place for ``steps`` steps with ``tx``; evaluate on ``eval_sets``.

    Returns the optimizer and the run's metrics: compile and step times, the optimizer state's
    bytes (on device 0 and in all), the training losses and the held-out loss curves.
    """
    batch_sharding = NamedSharding(mesh, P(FSDP, None))
    rng = np.random.default_rng(seed)

    def batch() -> jax.Array:
        ids = windows(train_stream, args.batch_size, args.seq_len + 1, rng)
        return jax.device_put(ids, batch_sharding)

    def evaluate() -> dict[str, float]:
        return {
            k: float(np.mean([float(eval_loss(model, b)) for b in v])) for k, v in eval_sets.items()
        }

    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    first = batch()
    compiled, compile_s = None, 0.0
    if steps:
        t0 = time.perf_counter()
        compiled = train_step.lower(model, optimizer, first).compile()
        compile_s = time.perf_counter() - t0
    curves = {k: [v] for k, v in evaluate().items()}
    eval_steps = [0]
    losses: list[float] = []
    step_times: list[float] = []
    bar = progress(range(steps), desc=f"{name:>9}", enabled=not args.no_progress)
    for step in bar:
        ids = first if step == 0 else batch()
        t = time.perf_counter()
        loss = float(compiled(model, optimizer, ids))  # float() waits for the step
        step_times.append(time.perf_counter() - t)
        losses.append(loss)
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            for k, v in evaluate().items():
                curves[k].append(v)
            eval_steps.append(step + 1)
            bar.set_postfix(loss=f"{loss:.3f}", **{k: f"{v[-1]:.3f}" for k, v in curves.items()})
    bar.close()
    timed = step_times[1:] if len(step_times) > 1 else step_times
    device0 = mesh.devices.flat[0]
    return optimizer, {
        "state_bytes_device0": device_bytes(optimizer.opt_state, device0),
        "state_bytes": total_bytes(optimizer.opt_state),
        "compile_seconds": compile_s,
        "mean_step_seconds": float(np.mean(timed)) if timed else None,
        "losses": losses,
        "final_loss": losses[-1] if losses else None,
        "eval_steps": eval_steps,
        "eval_loss": curves,
    }


def make_optimizer(name: str, args: argparse.Namespace, cfg: LlamaConfig):
    """``(tx, description)`` of a fine-tuning run."""
    if name == "nanoadam":
        tx = nanoadam.nanoadam(
            args.lr_nanoadam,
            density=args.density,
            mask_interval=args.mask_interval,
            labels=nanoadam_labels(cfg),
        )
        return tx, (
            f"nanoadam(lr={args.lr_nanoadam:g}, density={args.density:g}, "
            f"mask_interval={args.mask_interval})"
        )
    tx = optax.adamw(args.lr_adamw, weight_decay=args.weight_decay)
    return tx, f"optax.adamw(lr={args.lr_adamw:g}, weight_decay={args.weight_decay:g})"


# ------------------------------------------------------------------------------------------------
# Reporting
# ------------------------------------------------------------------------------------------------


def _kib(x: int | None) -> str:
    return "n/a" if x is None else f"{x / 1024:,.1f} KiB"


def format_table(results: dict[str, Any]) -> str:
    """Markdown: the side-by-side table, the entries moved per layer, the state layout."""
    runs = results["optimizers"]
    names = list(runs)
    dom = results["data"]
    pre = results["pretrain"]

    def before_after(r: dict[str, Any], key: str) -> str:
        curve = r["eval_loss"][key]
        return f"{curve[0]:.3f} -> {curve[-1]:.3f}"

    rows = [
        ("optimizer", lambda r: r["optimizer"]),
        ("optimizer state on device 0", lambda r: _kib(r["state_bytes_device0"])),
        ("optimizer state, all devices", lambda r: _kib(r["state_bytes"])),
        ("compile time", lambda r: f"{r['compile_seconds']:.1f} s"),
        ("mean step time", lambda r: f"{1e3 * r['mean_step_seconds']:,.0f} ms"),
        (f"held-out loss, new domain ({dom['new']})", lambda r: before_after(r, "new")),
        (f"held-out loss, old domain ({dom['old']})", lambda r: before_after(r, "old")),
        ("stacked-layer entries moved", lambda r: f"{100 * r['moved_fraction_layers']:.2f}%"),
    ]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, fmt in rows:
        lines.append(f"| {label} | " + " | ".join(fmt(runs[n]) for n in names) + " |")
    cfg = results["config"]
    mesh = results["mesh"]
    lines += [
        "",
        f"{cfg['num_layers']} stacked layers, d_model {cfg['d_model']}, {cfg['num_heads']} heads, "
        f"d_ff {cfg['d_ff']}, byte vocabulary, "
        f"{'tied embeddings' if cfg['tie_embeddings'] else 'untied lm_head'}: "
        f"{results['model']['num_params']:,} parameters "
        f"({_kib(results['model']['param_bytes_device0'])} on device 0). FSDP over "
        f"{mesh['devices']} {mesh['device_kind']} devices. Pre-trained from random init with "
        f"AdamW for {cfg['pretrain_steps']} steps on {dom['old']} (held-out loss "
        f"{pre['eval_loss']['old'][0]:.3f} -> {pre['eval_loss']['old'][-1]:.3f}), then "
        f"fine-tuned {cfg['steps']} steps on {dom['new']}; batch {cfg['batch_size']} x "
        f"{cfg['seq_len']} bytes; losses in nats per byte. {results['pretrained_note']}",
    ]
    for name in names:
        moved = runs[name]["moved_per_layer"]
        layers = len(next(iter(moved.values()))) if moved else 0
        lines += [
            "",
            f"Entries moved after {cfg['steps']} steps, {name} (% of each layer's matrix):",
            "",
            "| matrix | " + " | ".join(f"layer {i}" for i in range(layers)) + " |",
            "|---|" + "---|" * layers,
        ]
        lines += [f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in vals) + " |"
                  for m, vals in moved.items()]  # fmt: skip
    if results.get("state_layout"):
        lines += [
            "",
            "NanoAdam's state on the mesh (positions per chunk, sharded like the parameter rows):",
            "",
            "| leaf | shape | param spec | positions | positions spec | chunk | k |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['leaf']} | {'x'.join(map(str, r['shape']))} | {r['param_spec']} | "
            f"{'x'.join(map(str, r['positions_shape']))} | {r['positions_spec']} | "
            f"{r['chunk']} | {r['k_per_chunk']} |"
            for r in results["state_layout"]
        ]
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: Path) -> None:
    """Entries moved per layer and matrix (bars), loss curves, per-device state bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["optimizers"]
    cfg = results["config"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    ax = axes[0][0]
    if "nanoadam" in runs:
        moved = runs["nanoadam"]["moved_per_layer"]
        mats = list(moved)
        layers = len(moved[mats[0]])
        width = 0.8 / len(mats)
        x = np.arange(layers)
        for j, m in enumerate(mats):
            ax.bar(x + (j - (len(mats) - 1) / 2) * width, moved[m], width, label=m,
                   color=f"C{j}")  # fmt: skip
        ax.axhline(cfg["density"], color="k", ls="--", lw=1, label=f"density {cfg['density']:g}")
        if "adamw" in runs:
            adamw = runs["adamw"]["moved_per_layer"]
            mean = [float(np.mean([adamw[m][i] for m in adamw])) for i in range(layers)]
            ax.plot(x, mean, "kx", ms=9, label="adamw (mean over matrices)")
        ax.set_xticks(x, [f"layer {i}" for i in x])
        ax.legend(fontsize=7, ncol=2)
    ax.set(ylabel="fraction of entries moved", ylim=(0, 1.05),
           title=f"NanoAdam: entries moved per layer after {cfg['steps']} steps")  # fmt: skip

    ax = axes[0][1]
    pre = results["pretrain"]["losses"]
    n_pre = len(pre)
    if pre:
        ax.plot(np.arange(1, n_pre + 1), pre, color="gray", lw=0.8, label="AdamW pre-training")
    for i, (name, r) in enumerate(runs.items()):
        steps = n_pre + np.arange(1, len(r["losses"]) + 1)
        ax.plot(steps, r["losses"], color=f"C{i}", lw=0.8, label=f"{name} fine-tuning")
    ax.set(xlabel="step", ylabel="training loss (nats/byte)", title="Training loss")
    ax.legend(fontsize=8)

    ax = axes[1][0]
    for i, (name, r) in enumerate(runs.items()):
        ax.plot(r["eval_steps"], r["eval_loss"]["new"], "o-", color=f"C{i}",
                label=f"{name}: new domain")  # fmt: skip
        ax.plot(r["eval_steps"], r["eval_loss"]["old"], "s--", color=f"C{i}",
                label=f"{name}: old domain")  # fmt: skip
    dom = results["data"]
    ax.set(xlabel="fine-tuning step", ylabel="held-out loss (nats/byte)",
           title=f"Held-out loss: new = {dom['new']}, old = {dom['old']}")  # fmt: skip
    ax.legend(fontsize=8)

    ax = axes[1][1]
    names = list(runs)
    vals = [runs[n]["state_bytes_device0"] / 1024 for n in names]
    ax.bar(names, vals, color=[f"C{i}" for i in range(len(names))])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.1f} KiB", ha="center", va="bottom", fontsize=9)
    ax.set(ylabel="KiB", title="Optimizer state on device 0 (sum of its shards)")
    fig.suptitle(
        f"Llama-style decoder, {cfg['num_layers']} stacked layers, FSDP over "
        f"{results['mesh']['devices']} devices: NanoAdam vs AdamW (from a short AdamW "
        "pre-training; no real Llama weights)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

PRETRAINED_NOTE = (
    "No real pretrained Llama weights ship offline: the model starts from random init and is "
    "pre-trained briefly with AdamW here, so its weights are only as 'pretrained' as that phase."
)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Pre-train, then fine-tune with each optimizer; returns the results also written to
    ``--out``."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    if args.data == "text":
        missing = assets.missing_assets(*ASSET_NAMES)
        if missing:
            raise SystemExit(
                "Missing offline assets (or run with --data synthetic). Install them with:\n  "
                + "\n  ".join(missing)
            )
    n_dev = min(args.devices, jax.device_count())
    if n_dev < args.devices:
        print(f"Only {jax.device_count()} device(s) present: the mesh has {n_dev}.")
    for flag in ("batch_size", "d_model", "d_ff"):
        if getattr(args, flag) % n_dev:
            raise SystemExit(f"--{flag.replace('_', '-')} must be a multiple of {n_dev} (devices)")
    mesh = make_mesh(n_dev)
    cfg = LlamaConfig(
        d_model=args.d_model,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        d_ff=args.d_ff,
        tie_embeddings=args.tie_embeddings,
    )
    domains = load_domains(args.data)
    rng = np.random.default_rng(args.seed + 1)
    shard = NamedSharding(mesh, P(FSDP, None))  # batches: split over the devices
    eval_sets = {
        key: [
            jax.device_put(windows(d["eval"], args.batch_size, args.seq_len + 1, rng), shard)
            for _ in range(args.eval_batches)
        ]
        for key, d in domains.items()
    }
    print(
        f"Llama-style decoder: {cfg.num_layers} stacked layers, d_model {cfg.d_model}, "
        f"{cfg.num_heads} heads, d_ff {cfg.d_ff}, byte vocabulary; FSDP mesh of {n_dev} "
        f"{jax.devices()[0].platform} devices. Old domain: {domains['old']['name']} "
        f"({len(domains['old']['train']):,} training bytes); new domain: "
        f"{domains['new']['name']} ({len(domains['new']['train']):,}). {PRETRAINED_NOTE}"
    )

    device0 = mesh.devices.flat[0]
    with on_mesh(mesh):
        base = LlamaForCausalLM(cfg, nnx.Rngs(args.seed))
        params = nnx.state(base, nnx.Param)
        num_params = int(sum(x.size for x in jax.tree.leaves(params)))
        model_info = {
            "num_params": num_params,
            "param_bytes": total_bytes(params),
            "param_bytes_device0": device_bytes(params, device0),
        }

        # Phase 1: a short AdamW pre-training on the old domain, from random init.
        schedule = optax.warmup_cosine_decay_schedule(
            0.0,
            args.lr_pretrain,
            max(1, args.pretrain_steps // 10),
            max(1, args.pretrain_steps),
            end_value=args.lr_pretrain / 10,
        )
        pre_tx = optax.adamw(schedule, weight_decay=args.weight_decay)
        _, pretrain = train(
            "pretrain", base, pre_tx, args.pretrain_steps, domains["old"]["train"],
            eval_sets, args, mesh, args.seed,
        )  # fmt: skip
        pretrain["optimizer"] = f"optax.adamw(warmup-cosine to {args.lr_pretrain:g})"

        # Phase 2: fine-tune a copy with each optimizer on the new domain.
        full_plan = nanoadam.plan(
            nnx.state(base, nnx.Param),
            density=args.density,
            labels=nanoadam_labels(cfg),
            show=False,
        )
        print(f"\nNanoAdam's plan (density {args.density:g}): what it trains and stores per leaf")
        print(full_plan)
        plan_rows = [
            {
                "leaf": leaf.path,
                "label": leaf.label,
                "layer_axes": list(leaf.layer_axes),
                "chunk": leaf.chunk,
                "trained": leaf.trained,
                "state_bytes": leaf.state_bytes,
            }
            for leaf in full_plan.leaves
        ]
        runs: dict[str, Any] = {}
        layout = None
        for name in args.optimizers:
            model = nnx.clone(base)
            before = _flat_params(model)
            tx, desc = make_optimizer(name, args, cfg)
            optimizer, run = train(
                name, model, tx, args.steps, domains["new"]["train"], eval_sets, args, mesh,
                args.seed + 2,
            )  # fmt: skip
            if name == "nanoadam":
                layout = state_layout(model, optimizer)
                print("\nNanoAdam's state on the mesh (positions per chunk):")
                for r in layout:
                    print(
                        f"  {r['leaf']:<32} {'x'.join(map(str, r['shape'])):>12} "
                        f"{r['param_spec']:<24} -> {'x'.join(map(str, r['positions_shape'])):>10} "
                        f"{r['positions_spec']:<24} chunk {r['chunk']}, k {r['k_per_chunk']}"
                    )
                differ = chunking_differs(plan_rows, layout)
                if differ:
                    print(
                        f"  note: the plan printed above chunks {len(differ)} leaves differently "
                        "(it did not see the parameters' sharding); the layout here is the "
                        "optimizer's state."
                    )
            run["optimizer"] = desc
            run["moved_per_layer"] = moved_per_layer(before, model)
            fractions = _moved_fraction(before, model)
            run["moved_fraction_all"] = fractions["all"]
            run["moved_fraction_layers"] = fractions["layers"]
            runs[name] = run
            print(
                f"{name}: state on device 0 {_kib(run['state_bytes_device0'])}, compile "
                f"{run['compile_seconds']:.1f} s, step {1e3 * run['mean_step_seconds']:,.0f} ms, "
                f"new-domain loss {run['eval_loss']['new'][-1]:.3f}, old-domain loss "
                f"{run['eval_loss']['old'][-1]:.3f}"
            )

    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results = {
        "config": config,
        "pretrained_note": PRETRAINED_NOTE,
        "data": {"old": domains["old"]["name"], "new": domains["new"]["name"]},
        "mesh": {
            "axis": FSDP,
            "devices": n_dev,
            "device_kind": jax.devices()[0].device_kind,
        },
        "model": model_info,
        "plan": {**plan_summary(full_plan), "leaves": plan_rows},
        "state_layout": layout,
        "plan_chunking_differs": None if layout is None else chunking_differs(plan_rows, layout),
        "pretrain": pretrain,
        "optimizers": runs,
        "environment": environment(),
        "wall_seconds": None,
    }
    table = format_table(results)
    print()
    print(table)
    write_results(
        args.out,
        "llama_fsdp",
        "Llama-style decoder, stacked layers, FSDP: NanoAdam vs AdamW",
        table + "\n\n![llama_fsdp](llama_fsdp.png)",
        results,
        t_start,
        save_plot,
    )
    return results


if __name__ == "__main__":
    main()
