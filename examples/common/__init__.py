"""Shared helpers for the ``nanoadam-jax`` examples: offline assets, models, loaders, CLI.

Nothing in here is part of the ``nanoadam_jax`` library itself. A script run as
``python examples/x.py`` has ``examples/`` on ``sys.path`` (Python puts the script's folder
there), so it imports ``common.assets``, ``common.minilm``, ``common.mnist_cnn``,
``common.cli`` (command line), ``common.plans`` (NanoAdam's plan, printed at the start),
``common.progress`` (progress bars) and ``common.results`` (results files) without any path
set-up; ``nanoadam_jax`` comes from the (editable) install.
"""

import os as _os

# XLA:CPU runs copy insertion before scheduling, so the optimizer's in-place scatter into a
# weight that the backward pass also reads makes it copy the weight; region analysis orders
# the read first instead (benchmarks/results/train_step.md: a 336M transformer's compiled
# train-step peak 0.93x -> 0.71x AdamW's, no parameter-sized copy left). GPU and TPU
# compilers re-run copy removal after scheduling and need no flag. XLA reads XLA_FLAGS when
# the backend starts, so this takes effect for scripts (imported before the first
# computation), not for an interpreter that already ran one.
_FLAG = "--xla_cpu_copy_insertion_use_region_analysis=true"
if "xla_cpu_copy_insertion_use_region_analysis" not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = f"{_os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
