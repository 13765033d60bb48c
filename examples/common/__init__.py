"""Shared helpers for the ``nanoadam-jax`` examples: offline assets, models, loaders, CLI.

Nothing in here is part of the ``nanoadam_jax`` library itself. A script run as
``python examples/x.py`` has ``examples/`` on ``sys.path`` (Python puts the script's folder
there), so it imports ``common.assets``, ``common.minilm``, ``common.mnist_cnn``,
``common.cli`` (command line), ``common.plans`` (NanoAdam's plan, printed at the start),
``common.progress`` (progress bars) and ``common.results`` (results files) without any path
set-up; ``nanoadam_jax`` comes from the (editable) install.
"""
