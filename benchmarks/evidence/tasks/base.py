"""The fine-tuning problem every experiment trains: :class:`Task`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import nanoadam_jax as nanoadam


@dataclasses.dataclass
class Task:
    """A fine-tuning problem: initial parameters, a forward pass and the data."""

    name: str
    params: dict[str, Any]  # pretrained pure-dict parameters (a new head is drawn per seed)
    apply: Callable[..., jax.Array]  # (params, *inputs) -> logits
    train: tuple[tuple[np.ndarray, ...], np.ndarray]  # (inputs, labels)
    evals: dict[str, tuple[tuple[np.ndarray, ...], np.ndarray]]
    steps: int
    batch_size: int
    vmap_chunk: int
    new_head: bool  # draw the head from the seed (text) or keep the pretrained one (vision)
    signature: dict[str, Any]
    eval_chunk: int = 250
    frozen: dict[str, Any] = dataclasses.field(default_factory=dict)  # never trained
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
    shared_head: bool = True  # the old and the new task share the trained head (vision)
    # how the text of the results names things: model, new/old task, unit of data
    words: dict[str, str] = dataclasses.field(default_factory=dict)

    def init(self, params: dict[str, Any], seed: jax.Array) -> dict[str, Any]:
        """The run's initial parameters: ``params`` with, for text, a head drawn from ``seed``."""
        if not self.new_head:
            return params
        head = params["head"]
        kernel = 0.02 * jax.random.normal(jax.random.PRNGKey(seed), head["kernel"].shape)
        return {**params, "head": {"kernel": kernel, "bias": jnp.zeros_like(head["bias"])}}

    def data(self) -> dict[str, Any]:
        """Every array the training loop needs (passed to jit as arguments, not constants).

        The evaluation sets are concatenated: one forward pass in the compiled program, not
        one per set (compile time).
        """
        sets = list(self.evals.values())
        inputs = tuple(np.concatenate(parts) for parts in zip(*(xs for xs, _ in sets)))
        labels = np.concatenate([ys for _, ys in sets])
        return {"train": self.train, "eval": (inputs, labels), "frozen": self.frozen}

    def loss(self, params, frozen, inputs, labels) -> jax.Array:
        logits = self.apply(_merge(params, frozen), *inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def accuracies(self, params, frozen, inputs, labels) -> dict[str, jax.Array]:
        """Accuracy on each evaluation set, from the concatenated sets of :meth:`data`."""
        correct = self.correct(params, frozen, inputs, labels)
        out, start = {}, 0
        for name, (_, ys) in self.evals.items():
            out[name] = jnp.mean(correct[start : start + len(ys)])
            start += len(ys)
        return out

    def correct(self, params, frozen, inputs, labels) -> jax.Array:
        """Per-example correctness, in fixed-size chunks (``lax.map``), padded as needed."""
        n = len(labels)
        c = min(self.eval_chunk, n)
        pad = -n % c

        def padded(a):
            a = jnp.asarray(a)
            return jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]) if pad else a

        xs = tuple(padded(a).reshape(-1, c, *a.shape[1:]) for a in inputs)
        full = _merge(params, frozen)
        preds = jax.lax.map(lambda xb: jnp.argmax(self.apply(full, *xb), -1), xs).reshape(-1)
        return preds[:n] == labels

    def body_labels(self) -> dict[str, Any]:
        return nanoadam.label_params(self.params)


def _merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Recursive union of two nested dicts with disjoint leaves."""
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if k in out and isinstance(v, dict) else v
    return out
