"""The vision task: the pretrained MNIST CNN fine-tuned on rotated MNIST (old task: upright)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import assets
from flax import nnx

from benchmarks.evidence.settings import SPLIT_SEED, Settings
from benchmarks.evidence.tasks.base import Task


def _conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """3x3 'SAME' convolution as im2col + one matmul (HWIO kernel, NHWC input)."""
    _, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = [xp[:, dy : dy + h, dx : dx + w, :] for dy in range(3) for dx in range(3)]
    return jnp.concatenate(patches, axis=-1) @ kernel.reshape(9 * c, -1) + bias


def _max_pool2(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    h2, w2 = h // 2, w // 2  # floor, like torch and nnx.max_pool 'VALID'
    return x[:, : 2 * h2, : 2 * w2].reshape(n, h2, 2, w2, 2, c).max(axis=(2, 4))


def cnn_logits(params: dict[str, Any], images: jax.Array) -> jax.Array:
    """:class:`common.mnist_cnn.MnistCNN`'s forward pass on its pure-dict parameters.

    Same arithmetic as the Flax module (checked at start-up), written with im2col so that
    its gradients, and its ``jax.vmap`` over per-run weights, are fast on CPU.
    """
    from common.mnist_cnn import normalize_images

    x = normalize_images(jnp.asarray(images, jnp.float32)[..., None])
    for name in ("conv1", "conv2", "conv3"):
        x = _max_pool2(jax.nn.relu(_conv3x3(x, params[name]["kernel"], params[name]["bias"])))
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(x @ params["fc"]["kernel"] + params["fc"]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def load_vision_task(s: Settings) -> Task:
    from common.mnist_cnn import load_mnist_cnn

    images, labels = assets.load_mnist_subset()
    pool, test = assets.split_indices(len(images), test_size=1000, seed=SPLIT_SEED)
    rng = np.random.default_rng(SPLIT_SEED)
    test = np.sort(rng.permutation(test)[: s.test_examples])  # the file is sorted by digit
    perm = rng.permutation(pool)
    train = np.sort(perm[: s.train_examples])
    val = np.sort(perm[s.train_examples : s.train_examples + s.val_examples])

    def rot(a):
        return np.ascontiguousarray(np.rot90(a, 1, axes=(1, 2)))

    model = load_mnist_cnn()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    params = jax.tree.map(jnp.asarray, params)
    probe = images[test[:64]]
    err = float(jnp.max(jnp.abs(model(probe) - cnn_logits(params, probe))))
    if err > 1e-4:
        raise RuntimeError(f"im2col CNN differs from common.mnist_cnn.MnistCNN by {err}")
    return Task(
        name="vision",
        params=params,
        apply=cnn_logits,
        train=((rot(images[train]),), labels[train]),
        evals={
            "val": ((rot(images[val]),), labels[val]),
            "new": ((rot(images[test]),), labels[test]),
            "old": ((images[test],), labels[test]),
        },
        steps=s.steps,
        batch_size=s.batch_size,
        vmap_chunk=s.vmap_chunk,
        new_head=False,
        signature=s.vision_signature(),
        words={
            "model": "pretrained CNN",
            "new": "rotated MNIST",
            "old": "upright MNIST",
            "unit": "images",
        },
        info={
            "im2col_max_abs_error": err,
            "train": len(train),
            "val": len(val),
            "test": len(test),
        },
    )
