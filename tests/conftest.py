import os

import pytest

# Tests run on the CPU with deterministic single-device defaults; tests that need several devices start a
# subprocess with XLA_FLAGS set (the device count is fixed when JAX initializes).
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="session")
def aesthetic_weights():
  """The real LAION aesthetic heads: $HPS_JAX_WEIGHTS/aesthetic or ../shared/weights/aesthetic."""
  from hps_jax.convert.aesthetic import default_weights_dir
  d = default_weights_dir() / "aesthetic"
  if not (d / "sac+logos+ava1-l14-linearMSE.pth").exists():
    pytest.skip(f"aesthetic weights not found in {d} (set HPS_JAX_WEIGHTS)")
  return d
