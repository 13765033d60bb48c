"""Benchmark suite of nanoadam-jax: ``python benchmarks/run.py [--quick] [--out DIR]``.

Sections (one module each, each with ``run(quick) -> list[dict]`` returning table rows):

* :mod:`benchmarks.bench_update`: update time and optimizer-state bytes of ``nanoadam``
  vs ``optax.adam`` / ``optax.adamw`` on synthetic parameter trees, and the cost of a
  mask refresh.
* :mod:`benchmarks.bench_selection`: time of one selection (``select_mask``) by method.
* :mod:`benchmarks.bench_memory`: compiled peak memory of a full jitted fine-tuning step of
  a small transformer (lowered from shapes only, nothing allocated).
* :mod:`benchmarks.bench_gpu`: the same measurements on a GPU backend (empty without one).

The entry scripts (``run.py``, ``bench_sharding.py``, ``diag_update_cost.py``,
``evidence.py``) run as ``python benchmarks/<name>.py`` from anywhere (only then do they put
the repository root on ``sys.path``, for ``import benchmarks``) or as
``python -m benchmarks.<name>`` from the repository root; ``nanoadam_jax`` comes from the
installed package.
"""
