"""matplotlib, an optional dependency, for the commands that draw PNGs (leaderboards, scatter plots, study reports,
dataset histograms): one place that loads it on the file-only Agg backend, and one check a command runs before any
work so that a missing matplotlib is a one-line usage error, not a crash at the end of a long run."""

from __future__ import annotations

from hps_jax.errors import InputError

INSTALL = "pip install matplotlib"


def require_matplotlib(what: str, alternative: str = "") -> None:
  """Raises InputError ("<what> needs matplotlib: pip install matplotlib<alternative>") when it is not installed."""
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    raise InputError(f"{what} needs matplotlib: {INSTALL}{alternative}") from None


def pyplot():
  """`matplotlib.pyplot` on the Agg backend (PNG files, no display)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt
