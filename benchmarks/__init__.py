"""Benchmark suite of nanoadam-jax: ``python benchmarks/run.py [--quick] [--out DIR]``.

Sections (one module each, each with ``run(quick) -> list[dict]`` returning table rows):

* :mod:`benchmarks.bench_update`: update time and optimizer-state bytes of ``nanoadam``
  vs ``optax.adam`` / ``optax.adamw`` on synthetic parameter trees, and the cost of a
  mask refresh.
* :mod:`benchmarks.bench_selection`: time of one selection (``select_mask``) by method.
* :mod:`benchmarks.bench_memory`: compiled peak memory of a full jitted fine-tuning step of
  a small transformer (lowered from shapes only, nothing allocated).
* :mod:`benchmarks.bench_gpu`: the same measurements on a GPU backend (empty without one).
"""
