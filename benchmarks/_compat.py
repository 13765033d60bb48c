"""Work-arounds for library problems that the benchmarks apply, recorded in their results.

None is needed at present, so :func:`apply` applies nothing and answers ``["none"]``. It
stays because ``benchmarks/run.py`` writes its answer into every results file
(``machine.library_workarounds``), so that a reader can tell what was measured; a future
work-around belongs here, applied only when a probe shows the problem and named in that list.

Removed (both probes passed with jax 0.10.2, flax 0.12.8 and optax 0.2.8, library commit
a5b8284):

* a patch of ``transform._Selector.layout`` (compact buffers sized with ``int()`` of a
  traced value, so ``nanoadam(...).update`` could not be jitted): the update jits, and the
  patched class no longer exists;
* the note that ``select_mask(..., method="top_k")`` needed a concrete ``k`` under
  ``jax.jit``: it jits with a Python-float density.
"""

from __future__ import annotations


def apply() -> list[str]:
    """The work-arounds applied, for the results' ``machine.library_workarounds``."""
    return ["none"]
