"""Tests of the leaf labelling (sparse / dense / frozen)."""

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn
from flax import nnx

import nanoadam_jax as nanoadam


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
