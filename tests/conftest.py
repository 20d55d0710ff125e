import os

import pytest

# Tests run on the CPU with deterministic single-device defaults; tests that need several devices start a
# subprocess with XLA_FLAGS set (the device count is fixed when JAX initializes).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole run, shared by the xdist workers and every subprocess they
# start: the tiny UNet / VAE / CLIP programs that many tests compile are compiled once.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def aesthetic_weights():
  """The real LAION aesthetic heads: $HPS_JAX_WEIGHTS/aesthetic or ../shared/weights/aesthetic."""
  from hps_jax.convert.aesthetic import default_weights_dir

  d = default_weights_dir() / "aesthetic"
  if not (d / "sac+logos+ava1-l14-linearMSE.pth").exists():
    pytest.skip(f"aesthetic weights not found in {d} (set HPS_JAX_WEIGHTS)")
  return d


_PARITY: dict[str, tuple[float, float]] = {}


@pytest.fixture
def parity(request):
  """`parity(name, measured, tolerance)`: asserts measured <= tolerance and records the number (through the test
  report, so it also reaches the controller under pytest-xdist); the run's summary prints every measured error."""

  def check(name: str, measured, tolerance: float):
    measured = float(measured)
    request.node.user_properties.append(("parity", (name, measured, tolerance)))
    assert measured <= tolerance, f"{name}: {measured:.3g} > {tolerance:.3g}"

  return check


def pytest_runtest_logreport(report):
  for key, value in getattr(report, "user_properties", ()):
    if key == "parity":
      name, measured, tol = value
      _PARITY[name] = (measured, tol)


def pytest_terminal_summary(terminalreporter):
  if not _PARITY:
    return
  terminalreporter.section("measured parity errors (max abs)")
  for name, (measured, tol) in sorted(_PARITY.items()):
    terminalreporter.write_line(f"{name:<72} {measured:10.3g}   (tolerance {tol:.0e})")
