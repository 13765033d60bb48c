"""The fine-tuning tasks: :mod:`.vision` (MNIST CNN) and :mod:`.text` (MiniLM)."""
