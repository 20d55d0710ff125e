"""Side-by-side benchmarks (hps_jax vs the PyTorch reference, same run). Run from the repo root as modules,
e.g. `python -m bench.score --help`; the shared helpers live in bench/common.py."""
