"""Build side: checkpoint I/O, PyTorch reference modules, synthetic checkpoints, export (torch allowed)."""
