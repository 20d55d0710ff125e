"""Runs one corpus case through the real CLI in a subprocess (tests/hostile/runner.py) and checks the contract:
the promised exit code and message, no traceback on stderr (an exit-3 traceback goes to its log file), no NaN /
infinite / negative-distance number in the outputs of a run that reports success, peak memory under the cap for
the bomb and hostile-size cases, and no file written outside the output root."""

from __future__ import annotations

import json
import os
import re
import signal as signals
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.hostile.corpus import Assets, Case

ROOT = Path(os.environ.get("HOSTILE_REPO") or Path(__file__).resolve().parents[2])  # the tree whose CLI runs
MEMORY_CAP_KIB = 1024 * 1024  # 1 GiB peak resident memory for the bomb / hostile-size cases
TIMEOUT = 300
_NON_FINITE = re.compile(r"\bNaN\b|-?\bInfinity\b|\bnan\b|-?\binf\b")
_ERROR_LINE = re.compile(r"^hps-jax( [\w-]+)*: (error|internal error): ")


def build_assets(root: Path, *, inception: bool) -> Assets:
  from flax import nnx
  from PIL import Image

  from hps_jax.convert.aesthetic import save_aesthetic
  from hps_jax.convert.clip import save_hf
  from hps_jax.diffusion.tiny import write_tiny_sd
  from hps_jax.models.aesthetic import AestheticMLP
  from hps_jax.models.clip import CLIP, CLIPConfig

  root.mkdir(parents=True, exist_ok=True)
  ckpt = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), root / "ckpt")
  img_dir = root / "images"
  img_dir.mkdir(exist_ok=True)
  images = []
  for i in range(3):
    arr = np.random.default_rng(i).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    images.append(img_dir / f"im{i}.png")
    Image.fromarray(arr).save(images[-1])
  pairs = root / "pairs.jsonl"
  pairs.write_text("".join(json.dumps({"image": str(p), "prompt": "a cat"}) + "\n" for p in images))
  inc = root / "inception.safetensors"
  if inception:
    from hps_jax.convert.inception import save_inception_torch
    from hps_jax.models.inception import FIDInception

    save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), inc)
  return Assets(
    ckpt=Path(ckpt),
    images=images,
    pairs=pairs,
    sd=Path(write_tiny_sd(root / "sd", seed=1)),
    inception=inc,
    aesthetic=save_aesthetic(AestheticMLP(rngs=nnx.Rngs(0)), root / "aesthetic.safetensors"),
  )


def _tree(d: Path, skip=("out", "logs", "tmp")) -> set[str]:
  found = set()
  for dirpath, dirnames, filenames in os.walk(d, followlinks=False):
    rel = Path(dirpath).relative_to(d)
    if rel.parts and rel.parts[0] in skip:
      continue
    if not rel.parts:
      dirnames[:] = [n for n in dirnames if n not in skip]
    found.update(str(rel / n) for n in filenames + dirnames)
  return found


KILL_RSS_KIB = 3 * 1024 * 1024  # a case past this is killed (and fails): a bomb must not take the machine down


def _rss_kib(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _wait_watching_memory(proc, timeout: float) -> int:
  t0 = time.time()
  while True:
    try:
      return proc.wait(timeout=0.2)
    except subprocess.TimeoutExpired:
      if time.time() - t0 > timeout:
        raise
    rss = _rss_kib(proc.pid)
    if rss > KILL_RSS_KIB:
      proc.kill()
      proc.wait()
      pytest.fail(f"peak resident memory over {rss // 1024} MiB: killed (cap {MEMORY_CAP_KIB // 1024} MiB)")


def _default_signals() -> None:
  signals.signal(signals.SIGINT, signals.SIG_DFL)
  signals.signal(signals.SIGTERM, signals.SIG_DFL)


def _wait_ready(proc, err_path: Path, ready: str, timeout: float) -> None:
  t0 = time.time()
  rx = re.compile(ready)
  while time.time() - t0 < timeout:
    if proc.poll() is not None:
      return
    if rx.search(err_path.read_text(errors="replace")):
      time.sleep(0.5)  # well inside the work, not at its first line
      return
    time.sleep(0.1)
  pytest.fail(f"the command never reached {ready!r}")


def _check_outputs(d: Path, stdout: str) -> None:
  texts = {"stdout": stdout}
  for p in (d / "out").rglob("*"):
    if p.is_file() and p.suffix in (".json", ".jsonl", ".md", ".csv", ".txt"):
      texts[str(p.relative_to(d))] = p.read_text(errors="replace")
  for name, text in texts.items():
    m = _NON_FINITE.search(text)
    assert m is None, f"{name} holds a non-finite number ({m.group(0)!r}) at exit 0/1"
    for key in ("fid", "kid"):
      for v in re.findall(rf'"{key}": (-?[\d.eE+-]+)', text):
        assert float(v) >= 0, f"{name}: {key} = {v} is impossible"


def run_case(case: Case, assets: Assets, d: Path) -> None:
  for sub in ("in", "out", "logs", "tmp"):
    (d / sub).mkdir(parents=True, exist_ok=True)
  argv = [str(x) for x in case.build(assets, d)]
  before = _tree(d)
  peak = d / "tmp" / "peak"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    PYTHONPATH=str(ROOT),
    HPS_JAX_LOG_DIR=str(d / "logs"),
    TMPDIR=str(d / "tmp"),
    HOSTILE_PEAK_FILE=str(peak),
    HPS_JAX_OFFLINE="1",
    HF_HUB_OFFLINE="1",
    HPS_JAX_CACHE=str(d / "tmp" / "cache"),
    PYTHONWARNINGS="ignore",
  )
  env.update(case.env or {})
  if case.fault:
    env["HOSTILE_FAULT"] = case.fault
  cmd = [sys.executable, "-m", "tests.hostile.runner", *argv]
  err_path = d / "tmp" / "stderr"
  with open(err_path, "w") as err, open(d / "tmp" / "stdout", "w") as out:
    proc = subprocess.Popen(
      cmd,
      cwd=d / "out",
      env=env,
      stdout=out,
      stderr=err,
      stdin=subprocess.DEVNULL,
      preexec_fn=_default_signals,  # an xdist worker ignores SIGINT, and children inherit ignored signals
    )
    try:
      if case.signal is not None:
        _wait_ready(proc, err_path, case.ready, TIMEOUT)
        proc.send_signal(case.signal)
      rc = _wait_watching_memory(proc, TIMEOUT)
    except BaseException:
      proc.kill()
      proc.wait()
      raise
  stderr = err_path.read_text(errors="replace")
  stdout = (d / "tmp" / "stdout").read_text(errors="replace")
  where = f"\n$ hps-jax {' '.join(argv)}\n--- stderr (rc {rc}) ---\n{stderr[-3000:]}"
  if "Traceback" in stderr:
    i = stderr.index("Traceback")
    pytest.fail(f"a traceback on stderr:\n{stderr[max(0, i - 300) : i + 3000]}{where}")
  if rc in (0, 1):  # first: a success that prints an impossible number is worse than a wrong exit code
    _check_outputs(d, stdout)
  assert rc == case.code, f"exit {rc}, expected {case.code}{where}"
  if case.code in (2, 3) and case.words:
    lines = [line for line in stderr.splitlines() if _ERROR_LINE.match(line)]
    assert len(lines) == 1, f"expected exactly one error line{where}"
    assert re.search(case.words, lines[0]), f"the error line does not match {case.words!r}{where}"
  elif case.words:
    assert re.search(case.words, stderr), f"stderr does not match {case.words!r}{where}"
  if case.code == 3:
    logs = list((d / "logs").glob("*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text(), f"no traceback log in {d / 'logs'}{where}"
    assert str(logs[0]) in stderr
  if case.memory:
    kib = int(peak.read_text()) if peak.exists() else -1
    assert 0 < kib < MEMORY_CAP_KIB, f"peak resident memory {kib / 1024:.0f} MiB (cap {MEMORY_CAP_KIB // 1024}){where}"
  new = sorted(_tree(d) - before)
  assert not new, f"files written outside the output root: {new}{where}"
  if case.check is not None:
    case.check(assets, d)


def signal_name(n: int | None) -> str:
  return signals.Signals(n).name if n else ""
