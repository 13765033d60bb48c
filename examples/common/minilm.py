"""all-MiniLM-L6-v2 (a 6-layer BERT) in Flax NNX, loaded from the offline safetensors file.

Architecture (``config.json`` of the shipped model): vocabulary 30522, hidden size 384, 12
attention heads, feed-forward size 1536 with exact (erf) GELU, post-LayerNorm residual blocks with
LayerNorm epsilon 1e-12, learned absolute position embeddings (512) and token type embeddings (2).
The sentence embedding is the attention-mask weighted mean of the last hidden states, as in
sentence-transformers (the BERT pooler is not used). Dropout is omitted: the examples fine-tune
deterministically.

Naming contract with ``nanoadam_jax``'s default parameter labelling (leaves whose path contains
``head`` or ``norm`` are updated densely): every LayerNorm attribute name contains ``norm``
(``embeddings_norm``, ``attention_norm``, ``output_norm``), the classifier's new layer is called
``head``, and no other attribute name contains either word. Linear layers are plain
:class:`flax.nnx.Linear` (``kernel`` of shape ``(in, out)`` and ``bias``).

Typical use::

    tokenizer = MiniLMTokenizer(max_length=48)
    encoder = load_minilm()                       # pretrained, all 6 layers
    ids, mask = tokenizer(["A man is playing a guitar."])
    emb = encoder.embed(ids, mask, normalize=True)  # (1, 384)

    clf = MiniLMClassifier.from_pretrained(num_classes=2, num_layers=2)  # truncated encoder
    logits = clf(ids, mask)
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "MiniLMClassifier",
    "MiniLMConfig",
    "MiniLMEncoder",
    "MiniLMTokenizer",
    "encode_sentences",
    "load_minilm",
    "load_pretrained_weights",
    "mean_pool",
    "torch_to_nnx_weights",
]


@dataclasses.dataclass(frozen=True)
class MiniLMConfig:
    """Hyper-parameters of the BERT encoder (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12

    @classmethod
    def from_json_file(cls, path: str | Path, **overrides) -> MiniLMConfig:
        """Read a Hugging Face BERT ``config.json``; keyword ``overrides`` win (e.g. num_layers)."""
        cfg = json.loads(Path(path).read_text())
        values = dict(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            max_position_embeddings=cfg["max_position_embeddings"],
            type_vocab_size=cfg["type_vocab_size"],
            layer_norm_eps=cfg["layer_norm_eps"],
        )
        values.update(overrides)
        return cls(**values)


def _layer_norm(config: MiniLMConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # use_fast_variance=False: E[(x - mean)^2], exact like torch, matters with eps = 1e-12.
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps, use_fast_variance=False, rngs=rngs
    )


class Embeddings(nnx.Module):
    """Word + learned position + token type embeddings, followed by ``embeddings_norm``."""

    def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)
        h = config.hidden_size
        self.word_embeddings = nnx.Embed(config.vocab_size, h, embedding_init=init, rngs=rngs)
        self.position_embeddings = nnx.Embed(
            config.max_position_embeddings, h, embedding_init=init, rngs=rngs
        )
        self.token_type_embeddings = nnx.Embed(
            config.type_vocab_size, h, embedding_init=init, rngs=rngs
        )
        self.embeddings_norm = _layer_norm(config, rngs)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        positions = jnp.arange(input_ids.shape[-1])[None, :]
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)
            + self.token_type_embeddings(token_type_ids)
        )
        return self.embeddings_norm(x)


class SelfAttention(nnx.Module):
    """Multi-head self-attention: ``query``/``key``/``value`` projections and ``output``."""

    def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
        if config.hidden_size % config.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        self.num_heads = config.num_heads
        h = config.hidden_size
        self.query = nnx.Linear(h, h, rngs=rngs)
        self.key = nnx.Linear(h, h, rngs=rngs)
        self.value = nnx.Linear(h, h, rngs=rngs)
        self.output = nnx.Linear(h, h, rngs=rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        b, t, h = x.shape
        d = h // self.num_heads

        def split(y):  # (B, T, H) -> (B, heads, T, d)
            return y.reshape(b, t, self.num_heads, d).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
        keep = attention_mask[:, None, None, :].astype(bool)
        scores = jnp.where(keep, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3).reshape(b, t, h)
        return self.output(ctx)


class TransformerLayer(nnx.Module):
    """One post-LayerNorm BERT block: attention + ``attention_norm``, FFN + ``output_norm``."""

    def __init__(self, config: MiniLMConfig, *, rngs: nnx.Rngs):
        self.attention = SelfAttention(config, rngs=rngs)
        self.attention_norm = _layer_norm(config, rngs)
        self.intermediate = nnx.Linear(config.hidden_size, config.intermediate_size, rngs=rngs)
        self.output = nnx.Linear(config.intermediate_size, config.hidden_size, rngs=rngs)
        self.output_norm = _layer_norm(config, rngs)

    def __call__(self, x: jax.Array, attention_mask: jax.Array) -> jax.Array:
        x = self.attention_norm(x + self.attention(x, attention_mask))
        ffn = self.output(jax.nn.gelu(self.intermediate(x), approximate=False))
        return self.output_norm(x + ffn)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Average ``hidden`` ``(B, T, H)`` over the tokens where ``attention_mask`` ``(B, T)`` is 1."""
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


class MiniLMEncoder(nnx.Module):
    """The BERT encoder: :class:`Embeddings` then ``config.num_layers`` transformer layers."""

    def __init__(self, config: MiniLMConfig | None = None, *, rngs: nnx.Rngs):
        self.config = config or MiniLMConfig()
        self.embeddings = Embeddings(self.config, rngs=rngs)
        self.layers = nnx.List(
            [TransformerLayer(self.config, rngs=rngs) for _ in range(self.config.num_layers)]
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
    ) -> jax.Array:
        """Return the last hidden states ``(B, T, hidden_size)``."""
        input_ids = jnp.asarray(input_ids)
        attention_mask = jnp.asarray(attention_mask)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x

    def embed(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        normalize: bool = False,
    ) -> jax.Array:
        """Sentence embedding ``(B, hidden)``: masked mean pooling, optionally L2-normalised."""
        pooled = mean_pool(self(input_ids, attention_mask, token_type_ids), attention_mask)
        if normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


class MiniLMClassifier(nnx.Module):
    """Sentence classifier: :class:`MiniLMEncoder`, mean pooling and a new linear ``head``."""

    def __init__(self, num_classes: int, config: MiniLMConfig | None = None, *, rngs: nnx.Rngs):
        self.encoder = MiniLMEncoder(config, rngs=rngs)
        self.head = nnx.Linear(
            self.encoder.config.hidden_size,
            num_classes,
            kernel_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
        """Return class logits ``(B, num_classes)``."""
        return self.head(self.encoder.embed(input_ids, attention_mask))

    @classmethod
    def from_pretrained(
        cls,
        num_classes: int,
        *,
        num_layers: int = 6,
        seed: int = 0,
        weights_path: str | Path | None = None,
    ) -> MiniLMClassifier:
        """Pretrained encoder (first ``num_layers`` layers) + new head initialised from ``seed``."""
        model = cls(num_classes, MiniLMConfig(num_layers=num_layers), rngs=nnx.Rngs(seed))
        load_pretrained_weights(model.encoder, weights_path)
        return model


# ------------------------------------------------------------------------------------------------
# Weight loading
# ------------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")
_LAYER_MODULES = {
    "attention.self.query": ("attention", "query"),
    "attention.self.key": ("attention", "key"),
    "attention.self.value": ("attention", "value"),
    "attention.output.dense": ("attention", "output"),
    "attention.output.LayerNorm": ("attention_norm",),
    "intermediate.dense": ("intermediate",),
    "output.dense": ("output",),
    "output.LayerNorm": ("output_norm",),
}
_EMBEDDING_MODULES = {
    "embeddings.word_embeddings.weight": ("embeddings", "word_embeddings", "embedding"),
    "embeddings.position_embeddings.weight": ("embeddings", "position_embeddings", "embedding"),
    "embeddings.token_type_embeddings.weight": (
        "embeddings",
        "token_type_embeddings",
        "embedding",
    ),
    "embeddings.LayerNorm.weight": ("embeddings", "embeddings_norm", "scale"),
    "embeddings.LayerNorm.bias": ("embeddings", "embeddings_norm", "bias"),
}


def torch_to_nnx_weights(
    tensors: dict[str, np.ndarray], num_layers: int = 6
) -> tuple[dict[tuple, np.ndarray], list[str]]:
    """Map Hugging Face BERT tensor names to :class:`MiniLMEncoder` parameter paths.

    torch ``Linear`` weights are ``(out, in)`` and are transposed to Flax ``(in, out)`` kernels;
    LayerNorm ``weight`` becomes ``scale``. The int64 ``embeddings.position_ids`` buffer, the
    unused BERT ``pooler`` and layers ``>= num_layers`` are not mapped.

    Returns:
      ``(weights, unused)``: ``{nnx_path_tuple: array}`` and the sorted list of skipped names.
    """
    out: dict[tuple, np.ndarray] = {}
    unused: list[str] = []
    for name, value in tensors.items():
        if name in _EMBEDDING_MODULES:
            out[_EMBEDDING_MODULES[name]] = value
            continue
        m = _LAYER_RE.match(name)
        if m is None or m.group(2) not in _LAYER_MODULES or int(m.group(1)) >= num_layers:
            unused.append(name)  # position_ids, pooler.*, truncated layers
            continue
        layer, module, kind = int(m.group(1)), _LAYER_MODULES[m.group(2)], m.group(3)
        is_norm = module[-1].endswith("norm")
        if kind == "weight":
            leaf, value = ("scale", value) if is_norm else ("kernel", value.T)
        else:
            leaf = "bias"
        out[("layers", layer, *module, leaf)] = value
    return out, sorted(unused)


def load_pretrained_weights(encoder: MiniLMEncoder, path: str | Path | None = None) -> list[str]:
    """Load all-MiniLM-L6-v2 safetensors weights into ``encoder`` in place.

    Every parameter of ``encoder`` must receive a checkpoint tensor of the same shape (a
    ``ValueError`` is raised otherwise), so nothing is left at its random initialisation.

    Args:
      encoder: a :class:`MiniLMEncoder` with ``config.num_layers <= 6``.
      path: the ``model.safetensors`` file; defaults to the installed offline asset.

    Returns:
      The sorted checkpoint tensor names that were not used (``embeddings.position_ids``,
      ``pooler.*`` and the layers beyond ``num_layers``).
    """
    from safetensors.numpy import load_file

    if path is None:
        from .assets import minilm_weights_path

        path = minilm_weights_path()
    weights, unused = torch_to_nnx_weights(load_file(str(path)), encoder.config.num_layers)
    flat = nnx.to_flat_state(nnx.state(encoder, nnx.Param))
    missing = []
    for param_path, var in flat:
        key = tuple(param_path)
        if key not in weights:
            missing.append(key)
            continue
        value = weights.pop(key)
        current = var.get_value()
        if tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"{key}: checkpoint shape {value.shape} != model {current.shape}")
        var.set_value(jnp.asarray(value, dtype=current.dtype))
    if missing:
        raise ValueError(f"parameters without checkpoint weights: {missing}")
    if weights:
        raise ValueError(f"checkpoint tensors mapped to no parameter: {sorted(weights)}")
    return unused


def load_minilm(
    num_layers: int = 6, *, seed: int = 0, weights_path: str | Path | None = None
) -> MiniLMEncoder:
    """Build a :class:`MiniLMEncoder` with the first ``num_layers`` pretrained layers."""
    if not 1 <= num_layers <= 6:
        raise ValueError("all-MiniLM-L6-v2 has 6 layers; num_layers must be in 1..6")
    encoder = MiniLMEncoder(MiniLMConfig(num_layers=num_layers), rngs=nnx.Rngs(seed))
    load_pretrained_weights(encoder, weights_path)
    return encoder


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------


class MiniLMTokenizer:
    """WordPiece tokenizer of all-MiniLM-L6-v2 with padding/truncation to ``max_length``.

    The shipped ``tokenizer.json`` forces padding and truncation to 128 tokens; both are
    overridden here. Calling the tokenizer returns numpy int32 ``(input_ids, attention_mask)`` of
    shape ``(len(texts), max_length)`` (``[CLS] ... [SEP]`` then ``[PAD]`` = 0), or, with
    ``pad_to_longest=True``, padded only to the longest sequence of the batch.
    """

    def __init__(
        self,
        max_length: int = 128,
        *,
        pad_to_longest: bool = False,
        path: str | Path | None = None,
    ):
        from tokenizers import Tokenizer

        if max_length < 2:
            raise ValueError("max_length must leave room for [CLS] and [SEP]")
        if path is None:
            from .assets import minilm_tokenizer_path

            path = minilm_tokenizer_path()
        self.max_length = max_length
        self.tokenizer = Tokenizer.from_file(str(path))
        self.tokenizer.enable_truncation(max_length=max_length)
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self.tokenizer.enable_padding(
            pad_id=0 if pad_id is None else pad_id,
            pad_token="[PAD]",
            length=None if pad_to_longest else max_length,
        )

    def __call__(self, texts: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize one text or a batch; returns ``(input_ids, attention_mask)`` int32 arrays."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.asarray([e.ids for e in encodings], dtype=np.int32)
        mask = np.asarray([e.attention_mask for e in encodings], dtype=np.int32)
        return ids, mask


@nnx.jit(static_argnames="normalize")
def _embed(encoder: MiniLMEncoder, ids: jax.Array, mask: jax.Array, normalize: bool):
    return encoder.embed(ids, mask, normalize=normalize)


def encode_sentences(
    encoder: MiniLMEncoder,
    tokenizer: MiniLMTokenizer,
    texts: Sequence[str],
    *,
    batch_size: int = 64,
    normalize: bool = True,
) -> np.ndarray:
    """Embed ``texts`` with ``encoder`` in fixed-size (padded) batches; returns ``(N, hidden)``."""
    outs = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        n = len(chunk)
        chunk += [""] * (batch_size - n)  # constant batch shape -> a single compilation
        ids, mask = tokenizer(chunk)
        outs.append(np.asarray(_embed(encoder, ids, mask, normalize))[:n])
    hidden = encoder.config.hidden_size
    return np.concatenate(outs) if outs else np.zeros((0, hidden), np.float32)
