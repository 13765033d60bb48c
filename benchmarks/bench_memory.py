"""Section 3: compiled peak memory of a full jitted fine-tuning step.

A small decoder-only transformer (Flax Linen, pre-LayerNorm, causal attention, GELU MLP,
untied output head) whose size is set by ``(vocab, d_model, layers, heads, d_ff)``. The
head is named ``head`` and the LayerNorms ``*_norm``, so that the library's default labels
update them densely (the paper's rule); every other leaf (embeddings, kernels, biases) is
sparse.

The step is ``loss -> grad -> tx.update -> apply_updates`` (next-token cross-entropy),
jitted with ``donate_argnums=(0, 1)`` (params and optimizer state) and compiled from
``jax.ShapeDtypeStruct`` inputs only: ``jax.jit(step, donate_argnums=(0, 1)).lower(...)
.compile().memory_analysis()``. Nothing is allocated.

``nanoadam-bf16`` stores its moments in bfloat16 (``moment_dtype=jnp.bfloat16``, the
paper's memory model; the update math stays float32); AdamW keeps its float32 moments.

``peak_bytes = argument + output + temp - alias``: the inputs and outputs of the step, the
scratch buffers XLA assigned, minus the outputs that reuse a donated input buffer (an
upper bound of what is live at once; it is what the device must hold).
``state_floor = 1.25 * density`` (two float32 moments plus a ``uint16`` position per
selected entry, over AdamW's two float32 moments); ``model_state_floor`` adds the dense
leaves' full Adam state. ``compile_s`` is the time of ``lower(...).compile()`` (tracing,
lowering and XLA's compilation) and ``compile_ratio_vs_adamw`` divides it by AdamW's;
``hlo_instructions`` counts the instructions of the optimized HLO.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import nanoadam_jax as nanoadam
from benchmarks import common

TITLE = "Compiled peak memory of a jitted fine-tuning step (transformer, donation)"
LR = 1e-4
DENSITY = 0.1


@dataclass(frozen=True)
class Config:
    name: str
    vocab: int
    d_model: int
    layers: int
    heads: int
    d_ff: int
    batch: int
    seq: int


FULL_CONFIGS = (
    Config("~10M", vocab=8192, d_model=256, layers=8, heads=4, d_ff=1024, batch=4, seq=128),
    Config("~100M", vocab=8192, d_model=768, layers=12, heads=12, d_ff=3072, batch=4, seq=128),
    Config("~340M", vocab=16384, d_model=1024, layers=24, heads=16, d_ff=4096, batch=4, seq=128),
)
#: One layer only (quick mode): a few seconds of compilation per optimizer.
QUICK_CONFIGS = (
    Config("~0.2M", vocab=512, d_model=64, layers=1, heads=2, d_ff=256, batch=2, seq=32),
)

COLUMNS = [
    ("model", "model"),
    ("n_params", "params"),
    ("optimizer", "optimizer"),
    ("argument_bytes", "argument"),
    ("output_bytes", "output"),
    ("alias_bytes", "alias"),
    ("temp_bytes", "temp"),
    ("peak_bytes", "peak"),
    ("peak_ratio_vs_adamw", "peak / adamw"),
    ("state_bytes", "state"),
    ("state_ratio_vs_adamw", "state / adamw"),
    ("state_floor", "floor 1.25*d"),
    ("model_state_floor", "floor incl. dense leaves"),
    ("compile_s", "compile s"),
    ("compile_ratio_vs_adamw", "compile / adamw"),
    ("hlo_instructions", "HLO instructions"),
]


class Block(nn.Module):
    d_model: int
    heads: int
    d_ff: int

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        y = nn.LayerNorm(name="attn_norm")(x)
        q = nn.Dense(d, name="query")(y).reshape(b, t, self.heads, hd)
        k = nn.Dense(d, name="key")(y).reshape(b, t, self.heads, hd)
        v = nn.Dense(d, name="value")(y).reshape(b, t, self.heads, hd)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd).astype(np.float32)
        causal = jnp.tril(jnp.ones((t, t), bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + nn.Dense(d, name="out")(att.reshape(b, t, d))
        y = nn.LayerNorm(name="mlp_norm")(x)
        y = nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(self.d_ff, name="fc1")(y)))
        return x + y


class _ScanBlock(nn.Module):
    d_model: int
    heads: int
    d_ff: int

    @nn.compact
    def __call__(self, x, _):
        return Block(self.d_model, self.heads, self.d_ff, name="block")(x), None


class DecoderLM(nn.Module):
    """A GPT-style decoder; ``scanned``: its blocks stacked (a leading layer axis on every
    leaf under ``blocks``) and run by ``nn.scan``, else unrolled (``block_0``, ...)."""

    vocab: int
    d_model: int
    layers: int
    heads: int
    d_ff: int
    max_len: int = 512
    scanned: bool = False

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.d_model, name="embed")(tokens)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (self.max_len, self.d_model))
        x = x + pos[: tokens.shape[1]]
        if self.scanned:
            stack = nn.scan(
                _ScanBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.layers,
            )
            x, _ = stack(self.d_model, self.heads, self.d_ff, name="blocks")(x, None)
        else:
            for i in range(self.layers):
                x = Block(self.d_model, self.heads, self.d_ff, name=f"block_{i}")(x)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(self.vocab, name="head")(x)


def model_and_shapes(cfg: Config) -> tuple[DecoderLM, Any, jax.ShapeDtypeStruct]:
    """The model, its parameter shapes (``ShapeDtypeStruct``) and the batch shape."""
    model = DecoderLM(cfg.vocab, cfg.d_model, cfg.layers, cfg.heads, cfg.d_ff, max(512, cfg.seq))
    dummy = jnp.zeros((1, cfg.seq), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), dummy))["params"]
    batch = jax.ShapeDtypeStruct((cfg.batch, cfg.seq + 1), jnp.int32)
    return model, params, batch


def train_step(model: DecoderLM, tx: optax.GradientTransformation):
    def step(params, opt_state, batch):
        def loss_fn(p):
            logits = model.apply({"params": p}, batch[:, :-1])
            labels = batch[:, 1:]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def memory_stats(model: DecoderLM, tx: Any, params: Any, batch: Any) -> dict[str, Any]:
    """Memory analysis of the compiled, donated step (from shapes only)."""
    opt_state = jax.eval_shape(tx.init, params)
    compiled, lower_s, xla_s = common.lower_and_compile(
        train_step(model, tx), params, opt_state, batch
    )
    ma = compiled.memory_analysis()
    arg = int(ma.argument_size_in_bytes)
    out = int(ma.output_size_in_bytes)
    alias = int(ma.alias_size_in_bytes)
    temp = int(ma.temp_size_in_bytes)
    xla_peak = getattr(ma, "peak_memory_in_bytes", None)
    return {
        "argument_bytes": arg,
        "output_bytes": out,
        "alias_bytes": alias,
        "temp_bytes": temp,
        "peak_bytes": arg + out + temp - alias,
        "xla_peak_bytes": None if xla_peak is None else int(xla_peak),
        "state_bytes": common.tree_nbytes(opt_state),
        "compile_s": lower_s + xla_s,
        "lower_s": lower_s,
        "xla_compile_s": xla_s,
        "hlo_instructions": common.hlo_instructions(compiled),
    }


def model_state_floor(params: Any, density: float) -> float:
    """NanoAdam's smallest possible state over AdamW's, with the default labels.

    Sparse leaves: two float32 moments and one ``uint16`` position per selected entry
    (chunks of at most 16384 entries), ``round(density * n)`` entries; dense leaves:
    AdamW's 8 bytes per entry. Counters are ignored.
    """
    labels = jax.tree.leaves(nanoadam.label_params(params))
    nano = adamw = 0.0
    for p, lab in zip(jax.tree.leaves(params), labels):
        n = int(np.prod(p.shape))
        adamw += 8 * n
        if lab == nanoadam.SPARSE:
            nano += 10 * max(1, round(density * n))
        elif lab == nanoadam.DENSE:
            nano += 8 * n
    return nano / adamw


def bench_config(cfg: Config, density: float = DENSITY) -> list[dict[str, Any]]:
    model, params, batch = model_and_shapes(cfg)
    n_params = common.num_params(params)
    labels = jax.tree.leaves(nanoadam.label_params(params))
    n_dense = sum(
        int(np.prod(p.shape))
        for p, lab in zip(jax.tree.leaves(params), labels)
        if lab == nanoadam.DENSE
    )
    txs = {
        "adamw": optax.adamw(LR),
        f"nanoadam d={density:g}": nanoadam.nanoadam(LR, density=density, mask_interval=100),
        f"nanoadam-bf16 d={density:g}": nanoadam.nanoadam(
            LR, density=density, mask_interval=100, moment_dtype=jnp.bfloat16
        ),
    }
    stats = {name: memory_stats(model, tx, params, batch) for name, tx in txs.items()}
    base = stats["adamw"]
    rows = []
    for name, st in stats.items():
        nano = name.startswith("nanoadam")
        f32_moments = nano and "bf16" not in name  # the floors assume float32 moments
        rows.append(
            {
                "model": cfg.name,
                "n_params": n_params,
                "n_dense_params": n_dense,
                "params_bytes": common.tree_nbytes(params),
                "vocab": cfg.vocab,
                "d_model": cfg.d_model,
                "layers": cfg.layers,
                "heads": cfg.heads,
                "d_ff": cfg.d_ff,
                "batch": cfg.batch,
                "seq": cfg.seq,
                "optimizer": name,
                "density": density if nano else None,
                **st,
                "peak_ratio_vs_adamw": common.ratio(st["peak_bytes"], base["peak_bytes"]),
                "compile_ratio_vs_adamw": common.ratio(st["compile_s"], base["compile_s"]),
                "state_ratio_vs_adamw": common.ratio(st["state_bytes"], base["state_bytes"]),
                "state_floor": common.state_floor(density) if f32_moments else None,
                "model_state_floor": model_state_floor(params, density) if f32_moments else None,
            }
        )
    return rows


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for cfg in QUICK_CONFIGS if quick else FULL_CONFIGS:
        rows += bench_config(cfg)
    return rows
