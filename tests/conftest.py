import json
import os
import signal
import subprocess
import time
from pathlib import Path

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


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
  """A tiny random-init Stable Diffusion folder (`hps_jax.diffusion.tiny.write_tiny_sd`, seed 3), written once per
  session (per xdist worker) for tests/convert/test_lora_interop.py and tests/diffusion/test_tiny_sd.py. Shared: read it, never write
  into it."""
  from hps_jax.diffusion.tiny import write_tiny_sd

  return write_tiny_sd(tmp_path_factory.mktemp("tiny_sd"), seed=3)


# ------------------------------------------------------------------------------------------------------------
# training subprocesses (tests/preference/test_train.py, tests/adapt/test_train_lora.py): logged metrics and the SIGKILL + resume
# harness. A test runs the uninterrupted reference, kills a second run with `sigkill_after_checkpoint`, resumes it
# in the same workdir and compares with `assert_same_trajectory`.
# ------------------------------------------------------------------------------------------------------------
def train_metrics(workdir) -> dict[int, dict]:
  """step -> the row logged in workdir/metrics.jsonl (rows with a loss); when a resumed run re-logs a step, the
  later row wins. {} while the file does not exist."""
  rows = {}
  path = Path(workdir) / "metrics.jsonl"
  for line in path.read_text().splitlines() if path.exists() else []:
    row = json.loads(line)
    if "loss" in row:
      rows[row["step"]] = row
  return rows


def sigkill_after_checkpoint(cmd, env, workdir, checkpoint: int, ready, timeout: float = 600) -> int:
  """Starts the training command `cmd` (writing to `workdir`) in its own process group from the repo root, waits until
  workdir/checkpoints/<checkpoint> exists and `ready(workdir)` holds (the run has gone on past the checkpoint), then
  SIGKILLs the whole group and checks that the signal ended it. Returns the last step the killed run logged."""
  workdir = Path(workdir)
  proc = subprocess.Popen(
    cmd, env=env, cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
  )
  deadline = time.time() + timeout
  try:
    while not (workdir / "checkpoints" / str(checkpoint)).exists() or not ready(workdir):
      assert proc.poll() is None, "training ended before it could be killed"
      assert time.time() < deadline, "no checkpoint appeared"
      time.sleep(0.05)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  return max(train_metrics(workdir))


def assert_same_trajectory(resumed: dict[int, dict], reference: dict[int, dict], num_steps: int):
  """The killed-and-resumed run logged every step 1..num_steps, each with the uninterrupted run's loss (bit for bit)
  and data checksum (same examples, same order, same noise)."""
  assert sorted(resumed) == list(range(1, num_steps + 1))
  for step in range(1, num_steps + 1):
    assert resumed[step]["loss"] == reference[step]["loss"], step  # bit-identical trajectory
    assert resumed[step]["data_checksum"] == reference[step]["data_checksum"], step  # same data order


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
