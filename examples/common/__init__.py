"""Shared helpers for the ``nanoadam-jax`` examples: offline assets, models and loaders.

Nothing in here is part of the ``nanoadam_jax`` library itself; the examples put the ``examples``
directory on ``sys.path`` and import ``common.assets``, ``common.minilm``, ``common.mnist_cnn``,
``common.cli`` (command-line size flags) and ``common.results`` (results files).
"""
