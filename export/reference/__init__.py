"""The PyTorch reference (the oracle the graphs are tested against): the DiT, the text encoder taps, the VAE decoder,
the weight-only FP8 linear, the reference pipeline and its CLI (`python -m ideogram4_engine.export.reference`), and
the numpy model of the W8A8 numerics."""
