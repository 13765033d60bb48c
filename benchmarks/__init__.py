"""Benchmark suite of nanoadam-jax: ``python benchmarks/run.py [--quick] [--out DIR]``.

Sections (one module each, each with ``run(quick) -> list[dict]`` returning table rows):

* :mod:`benchmarks.bench_update`: update time, page faults and optimizer-state bytes of
  ``nanoadam`` vs ``optax.adam`` / ``optax.adamw`` on synthetic parameter trees, and the
  cost of a refresh.
* :mod:`benchmarks.bench_compile`: compile time and HLO size of the update vs the number
  of leaves.
* :mod:`benchmarks.bench_vmap`: a vmapped step over several densities vs the runs one by
  one.
* :mod:`benchmarks.bench_chunk`: the chunk length and the selection method: ordinary and
  refresh steps vs AdamW.
* :mod:`benchmarks.bench_selection`: time of one leaf's selection by scope and method.
* :mod:`benchmarks.bench_memory`: compiled peak memory and compile time of a full jitted
  fine-tuning step of a small transformer (lowered from shapes only, nothing allocated).
* :mod:`benchmarks.bench_gpu`: the same measurements on a GPU backend (empty without one).

The entry scripts (``run.py``, ``bench_sharding.py``, ``diag_update_cost.py``,
``evidence.py``) run as ``python benchmarks/<name>.py`` from anywhere (only then do they put
the repository root on ``sys.path``, for ``import benchmarks``) or as
``python -m benchmarks.<name>`` from the repository root; ``nanoadam_jax`` comes from the
installed package.
"""
