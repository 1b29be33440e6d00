"""Tools around the library (never imported by it): benchmarks, the PyTorch reference, sweeps, plots."""
