"""Tests of the leaf labelling (sparse / dense / frozen)."""

import re

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx
from jax.tree_util import DictKey, GetAttrKey, SequenceKey
from label_families import FAMILIES, HEADS, KNOWN_MISSES

import nanoadam_jax as nanoadam
from nanoadam_jax.labels import (
    DENSE,
    FROZEN,
    HEAD_WORDS,
    NORM_WORDS,
    ROOT_HEADS,
    SPARSE,
    find_heads,
    name_words,
)


class NnxModel(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(4, 8, rngs=rngs)
        self.layer_norm = nnx.LayerNorm(8, rngs=rngs)
        self.embed = nnx.Embed(10, 4, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)


def test_default_labels_on_nnx_model():
    model = NnxModel(nnx.Rngs(0))
    labels = nanoadam.label_params(nnx.state(model, nnx.Param))
    flat = {
        "/".join(nanoadam.path_names(p)[:2]): v
        for p, v in jax.tree_util.tree_leaves_with_path(labels)
    }
    assert flat["linear/kernel"] == "sparse"
    assert flat["linear/bias"] == "sparse"
    assert flat["embed/embedding"] == "sparse"
    assert flat["layer_norm/scale"] == "dense"
    assert flat["head/kernel"] == "dense"


def test_default_labels_on_linen_model():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8)(x)
            x = nn.LayerNorm()(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            return nn.Dense(2, name="head")(x)

    variables = Net().init(jax.random.PRNGKey(0), jnp.ones((1, 4)))
    labels = nanoadam.label_params(variables["params"])
    assert labels["Dense_0"] == {"kernel": "sparse", "bias": "sparse"}
    assert labels["LayerNorm_0"] == {"scale": "dense", "bias": "dense"}
    assert labels["BatchNorm_0"] == {"scale": "dense", "bias": "dense"}
    assert labels["head"] == {"kernel": "dense", "bias": "dense"}


def test_non_float_leaves_are_frozen_even_if_labelled_sparse():
    params = {"w": jnp.ones(3), "i": jnp.ones(3, jnp.int32), "b": jnp.ones(3, bool)}
    labels = nanoadam.label_params(params, lambda path, leaf: "sparse")
    assert labels == {"w": "sparse", "i": "frozen", "b": "frozen"}


def test_label_tree_and_params_callable():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    assert nanoadam.label_params(params, {"a": "dense", "b": "frozen"}) == {
        "a": "dense",
        "b": "frozen",
    }
    assert nanoadam.label_params(params, lambda p: {"a": "frozen", "b": "sparse"})["b"] == "sparse"


def test_bad_labels_are_refused_with_the_path():
    params = {"a": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"\['a'\].*|sparse"):
        nanoadam.label_params(params, lambda path, leaf: "trainable")
    with pytest.raises(ValueError, match="structure"):
        nanoadam.label_params(params, {"a": "dense", "b": "dense"})
    with pytest.raises(ValueError, match="complex"):
        nanoadam.label_params({"z": jnp.ones(2, jnp.complex64)})


def test_labels_work_on_shape_dtype_structs():
    params = {
        "w": jax.ShapeDtypeStruct((3, 3), jnp.float32),
        "head": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    assert nanoadam.label_params(params) == {"w": "sparse", "head": "dense"}


# ------------------------------------------------------------------------------------------------
# Real model families (tests/label_families.py), as nested dicts, attribute / sequence paths
# (what NNX modules flatten to) and flat checkpoint keys.
# ------------------------------------------------------------------------------------------------


def _leaf(label):
    return jax.ShapeDtypeStruct((2,), jnp.int32 if label == FROZEN else jnp.float32)


def _split(path):
    return [c for c in re.split(r"[./]", path) if c]


def _nested(entries):
    tree = {}
    for path, label in entries:
        *parents, name = _split(path)
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[name] = _leaf(label)
    return tree


def _by_path(tree, labels=None):
    out = nanoadam.label_params(tree, labels)
    return {"/".join(map(str, _keys(p))): v for p, v in jax.tree_util.tree_leaves_with_path(out)}


def _keys(path):
    return [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]


FAMILY_IDS = sorted(FAMILIES)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_family_as_nested_dicts(family):
    entries = FAMILIES[family]
    got = _by_path(_nested(entries))
    assert got == {"/".join(_split(path)): label for path, label in entries}


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_family_as_attribute_and_sequence_keys(family):
    # NNX modules flatten to GetAttrKey (attributes), SequenceKey (nnx.List items) and a
    # trailing GetAttrKey("value") (the Variable's payload).
    for path, label in FAMILIES[family]:
        keys = [SequenceKey(int(c)) if c.isdigit() else GetAttrKey(c) for c in _split(path)]
        keys = (*keys, GetAttrKey("value"))
        assert nanoadam.default_labels(keys, _leaf(label)) == label, path


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_family_as_flat_checkpoint_keys(family):
    entries = FAMILIES[family]
    flat = {path: _leaf(label) for path, label in entries}  # torch state dict / "a/b" keys
    assert nanoadam.label_params(flat) == dict(entries)
    tuples = {tuple(_split(path)): _leaf(label) for path, label in entries}  # flatten_dict
    assert nanoadam.label_params(tuples) == {tuple(_split(p)): lab for p, lab in entries}


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_find_heads_on_families(family):
    assert sorted(find_heads(_nested(FAMILIES[family]))) == HEADS[family]


@pytest.mark.parametrize(("path", "given", "paper", "why"), KNOWN_MISSES)
def test_known_misses_are_what_the_docs_say(path, given, paper, why):
    assert given != paper, why
    assert nanoadam.label_params({path: _leaf(given)}) == {path: given}, why


def test_resnet_with_fc_head_has_no_recognised_head_until_labelled():
    tree = _nested([*FAMILIES["resnet_torchvision"], ("fc.weight", SPARSE), ("fc.bias", SPARSE)])
    assert find_heads(tree) == []

    def labels(path, leaf):
        return (
            DENSE if nanoadam.path_names(path)[0] == "fc" else nanoadam.default_labels(path, leaf)
        )

    assert find_heads(tree, labels) == ["fc"]
    assert nanoadam.label_params(tree, labels)["fc"] == {"weight": DENSE, "bias": DENSE}


def test_tied_embeddings_are_sparse_and_can_be_made_dense():
    tree = _nested(FAMILIES["gpt2"])
    assert nanoadam.label_params(tree)["transformer"]["wte"]["weight"] == SPARSE

    def labels(path, leaf):
        if "wte" in nanoadam.path_names(path):
            return DENSE
        return nanoadam.default_labels(path, leaf)

    assert nanoadam.label_params(tree, labels)["transformer"]["wte"]["weight"] == DENSE
    assert find_heads(tree, labels) == ["lm_head", "transformer/wte"]


def test_root_heads_only_at_the_root():
    leaf = jnp.ones(2)
    assert nanoadam.label_params({"output": leaf}) == {"output": DENSE}
    assert nanoadam.label_params({"params": {"output": {"kernel": leaf}}}) == {
        "params": {"output": {"kernel": DENSE}}
    }
    assert nanoadam.label_params({"model": {"output": {"kernel": leaf}}}) == {
        "model": {"output": {"kernel": SPARSE}}
    }
    assert nanoadam.label_params([{"output": leaf}]) == [{"output": SPARSE}]


def test_name_words():
    assert name_words("MultiHeadDotProductAttention_0") == [
        "multi", "head", "dot", "product", "attention"
    ]  # fmt: skip
    assert name_words("post_attention_layernorm") == ["post", "attention", "layernorm"]
    assert name_words("LayerNorm_12") == ["layer", "norm"]
    assert name_words("RMSNorm") == ["rms", "norm"]
    assert name_words("ln_f") == ["ln", "f"]
    assert name_words("norm2") == ["norm"]
    assert name_words("wi_0") == ["wi"]
    assert name_words("3") == []
    assert name_words("") == []


def test_constants_are_lower_case_words():
    for words in (NORM_WORDS, HEAD_WORDS, ROOT_HEADS):
        assert all(w == w.lower() and name_words(w) == [w] for w in words)


# ------------------------------------------------------------------------------------------------
# Real Flax models
# ------------------------------------------------------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.attention_norm = nnx.RMSNorm(8, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=2, in_features=8, decode=False, normalize_qk=True, rngs=rngs
        )
        self.ffn_norm = nnx.RMSNorm(8, rngs=rngs)
        self.feed_forward = nnx.Linear(8, 8, rngs=rngs)


class NnxLlama(nnx.Module):
    """A tiny NNX model with Meta Llama's names and NNX's attention."""

    def __init__(self, rngs):
        self.tok_embeddings = nnx.Embed(10, 8, rngs=rngs)
        self.layers = nnx.List([NnxBlock(rngs), NnxBlock(rngs)])
        self.norm = nnx.RMSNorm(8, rngs=rngs)
        self.output = nnx.Linear(8, 10, use_bias=False, rngs=rngs)


NNX_LLAMA_LABELS = {
    "tok_embeddings/embedding": SPARSE,
    "layers/1/attention_norm/scale": DENSE,
    "layers/1/attention/query/kernel": SPARSE,
    "layers/1/attention/key/bias": SPARSE,
    "layers/1/attention/value/kernel": SPARSE,
    "layers/1/attention/out/kernel": SPARSE,
    "layers/1/attention/query_ln/scale": DENSE,
    "layers/1/attention/key_ln/scale": DENSE,
    "layers/1/ffn_norm/scale": DENSE,
    "layers/1/feed_forward/kernel": SPARSE,
    "norm/scale": DENSE,
    "output/kernel": DENSE,
}


def test_real_nnx_model_state():
    state = nnx.state(NnxLlama(nnx.Rngs(0)), nnx.Param)
    got = {k.removesuffix("/value"): v for k, v in _by_path(state).items()}
    assert len(got) == 3 + 2 * 14  # 14 parameters a block (4 projections with biases, 4 norms)
    for path, label in NNX_LLAMA_LABELS.items():
        assert got[path] == label, path
    assert find_heads(state) == ["output"]


def test_real_nnx_module_as_pytree():
    # A module flattens with GetAttrKey / SequenceKey; its RNG state (key arrays) is frozen.
    model = NnxLlama(nnx.Rngs(0))
    got = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(model):
        kinds = {type(k) for k in path}
        assert kinds <= {GetAttrKey, SequenceKey, DictKey}, kinds
        got["/".join(map(str, _keys(path))).removesuffix("/value")] = nanoadam.default_labels(
            path, leaf
        )
    for path, label in NNX_LLAMA_LABELS.items():
        assert got[path] == label, path


def test_real_linen_model_with_multi_head_attention():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            y = nn.LayerNorm()(x)
            x = x + nn.MultiHeadDotProductAttention(num_heads=2, normalize_qk=True)(y)
            return x + nn.Dense(8)(nn.RMSNorm()(x))

    class Net(nn.Module):
        head_name: str | None = "lm_head"

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, name="enormous_proj")(x)
            x = Block()(x)
            x = nn.LayerNorm(name="final_norm")(x)
            return nn.Dense(3, name=self.head_name)(x)

    x = jnp.ones((1, 2, 4))
    params = Net().init(jax.random.PRNGKey(0), x)["params"]
    labels = nanoadam.label_params(params)
    attn = labels["Block_0"]["MultiHeadDotProductAttention_0"]
    for name in ("query", "key", "value", "out"):
        assert attn[name] == {"kernel": SPARSE, "bias": SPARSE}, name
    assert attn["query_ln"] == attn["key_ln"] == {"scale": DENSE}
    assert labels["Block_0"]["LayerNorm_0"] == {"scale": DENSE, "bias": DENSE}
    assert labels["Block_0"]["RMSNorm_0"] == {"scale": DENSE}
    assert labels["Block_0"]["Dense_0"] == {"kernel": SPARSE, "bias": SPARSE}
    assert labels["enormous_proj"] == {"kernel": SPARSE, "bias": SPARSE}
    assert labels["final_norm"] == {"scale": DENSE, "bias": DENSE}
    assert labels["lm_head"] == {"kernel": DENSE, "bias": DENSE}
    assert find_heads(params) == ["lm_head"]
    # With the full variables dict too.
    assert find_heads({"params": params}) == ["params/lm_head"]

    # The same model with an auto-named last layer: no head is recognised, and find_heads says so.
    params = Net(head_name=None).init(jax.random.PRNGKey(0), x)["params"]
    assert nanoadam.label_params(params)["Dense_0"] == {"kernel": SPARSE, "bias": SPARSE}
    assert find_heads(params) == []
