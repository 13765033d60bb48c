"""The text task: MiniLM-L6 (truncated) on Rotten Tomatoes; old task BBC News."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import assets
from flax import nnx

from benchmarks.evidence.settings import SPLIT_SEED, Settings
from benchmarks.evidence.tasks.base import Task


def load_text_task(s: Settings) -> Task:
    from common.minilm import MiniLMClassifier, MiniLMTokenizer

    n = s.text_train_examples + s.text_val_examples + s.text_test_examples
    texts, labels = assets.load_rotten_tomatoes(max_examples=n, seed=SPLIT_SEED)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(texts))
    parts = np.split(perm, [s.text_train_examples, s.text_train_examples + s.text_val_examples])
    ids, mask = MiniLMTokenizer(max_length=s.text_seq_len)(texts)
    model = MiniLMClassifier.from_pretrained(num_classes=2, num_layers=s.text_layers)
    graphdef, state = nnx.split(model, nnx.Param)
    params = jax.tree.map(jnp.asarray, nnx.to_pure_dict(state))
    # The 11.7M-entry word-embedding table is frozen for every method: training it would
    # dominate the CPU cost (and the optimizer state) of this short run.
    emb = params["encoder"]["embeddings"]
    frozen = {"encoder": {"embeddings": {"word_embeddings": emb.pop("word_embeddings")}}}

    def apply(p, input_ids, attention_mask, head_id=None):
        """Logits of the new head, or, where ``head_id == 1``, of the frozen old-task head."""
        p = dict(p)
        old = p.pop("old_head", None)
        model = nnx.merge(graphdef, p)
        if old is None:
            return model(input_ids, attention_mask)
        feats = model.encoder.embed(input_ids, attention_mask)
        old_logits = feats @ old["kernel"] + old["bias"]
        # The new task has fewer classes: pad with -1e9 (exactly zero probability in float32).
        new = model.head(feats)
        new = jnp.pad(
            new, ((0, 0), (0, old_logits.shape[-1] - new.shape[-1])), constant_values=-1e9
        )
        return jnp.where((head_id == 1)[:, None], old_logits, new)

    def take(idx):
        xs = (ids[idx], mask[idx])
        if s.text_old_examples:
            xs += (np.zeros(len(idx), np.int32),)
        return xs, labels[idx]

    evals = {"val": take(parts[1]), "new": take(parts[2])}
    info: dict[str, Any] = {
        "train": len(parts[0]),
        "val": len(parts[1]),
        "test": len(parts[2]),
        "majority_test": float(max(np.mean(labels[parts[2]]), 1 - np.mean(labels[parts[2]]))),
    }
    if s.text_old_examples:
        evals["old"], frozen["old_head"], info["old"] = _bbc_old_task(s, model)
    return Task(
        name="text",
        params=params,
        apply=apply,
        train=take(parts[0]),
        evals=evals,
        steps=s.text_steps,
        batch_size=s.text_batch_size,
        vmap_chunk=s.text_vmap_chunk,
        new_head=True,
        signature=s.text_signature(),
        eval_chunk=100,
        frozen=frozen,
        shared_head=False,
        words={
            "model": f"MiniLM-L6 ({s.text_layers} layers)",
            "new": "Rotten Tomatoes",
            "old": "BBC News",
            "unit": "reviews",
        },
        info=info,
    )


def _bbc_old_task(s: Settings, model) -> tuple[Any, dict[str, jax.Array], dict[str, Any]]:
    """The old task of ``--task text``: held-out BBC News articles and a frozen topic head.

    As in ``examples/continual_text.py``: the head is a logistic regression fitted on the frozen
    pretrained encoder's mean-pooled features of other articles. Returns the evaluation set
    (inputs with ``head_id`` 1), the head and a description.
    """
    from common.minilm import MiniLMTokenizer
    from continual_text import fit_linear_head

    texts, labels, classes = assets.load_bbc_news()
    train, test = assets.split_indices(len(texts), test_size=s.text_old_examples, seed=SPLIT_SEED)
    train = np.sort(
        np.random.default_rng(SPLIT_SEED).permutation(train)[: s.text_old_train_examples]
    )
    tok = MiniLMTokenizer(max_length=s.text_seq_len)
    embed = nnx.jit(lambda m, ids, mask: m.encoder.embed(ids, mask))
    feats = np.concatenate(
        [
            embed(model, *tok([texts[i] for i in train[j : j + 100]]))
            for j in range(0, len(train), 100)
        ]
    )
    w, b = fit_linear_head(feats, labels[train], len(classes), s.text_old_head_steps)
    ids, mask = tok([texts[i] for i in test])
    inputs = (ids, mask, np.ones(len(test), np.int32))
    train_acc = float(np.mean(np.argmax(feats @ w + b, -1) == labels[train]))
    info = {"train": len(train), "test": len(test), "classes": classes, "head_train_acc": train_acc}
    return (inputs, labels[test]), {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}, info
