"""Synthetic checkpoints in the official Ideogram 4 layout (no real weights can be downloaded here)."""
