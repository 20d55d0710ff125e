"""hps_jax.plotting: a missing matplotlib is one usage line before any work, for every command that draws."""

import sys

import pytest

from hps_jax.errors import InputError
from hps_jax.plotting import pyplot, require_matplotlib


def test_missing_matplotlib_is_one_line(monkeypatch):
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
  with pytest.raises(
    InputError, match=r"^leaderboard.png needs matplotlib: pip install matplotlib \(or pass --no-plot\)$"
  ):
    require_matplotlib("leaderboard.png", " (or pass --no-plot)")


def test_pyplot_draws_to_files_only():
  pytest.importorskip("matplotlib")
  plt = pyplot()
  import matplotlib

  assert matplotlib.get_backend().lower() == "agg" and hasattr(plt, "subplots")
