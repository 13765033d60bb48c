"""``python -m benchmarks.evidence``: see :mod:`benchmarks.evidence`."""

from benchmarks.evidence.cli import main

if __name__ == "__main__":
    main()
