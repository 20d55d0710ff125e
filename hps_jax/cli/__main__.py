"""`python -m hps_jax.cli ...` is `hps-jax ...`."""

from hps_jax.cli import entry

entry()
