"""`hps-jax score --output ... --resume`: a run SIGKILLed halfway continues from OUTPUT.partial and gives the
uninterrupted run's file byte for byte, redoing no recorded input; a resume with other settings or other inputs is
refused in one line (exit 2)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main

N, BATCH = 200, 8
_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.models.clip import CLIP, CLIPConfig

  d = tmp_path_factory.mktemp("resume")
  imgs = d / "imgs"
  imgs.mkdir()
  rng = np.random.default_rng(0)
  for i in range(N):
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(imgs / f"{i:04d}.png")
  ck = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), d / "ck")
  (d / "other").symlink_to(ck, target_is_directory=True)
  return {
    "dir": d,
    "imgs": imgs,
    "ck": ck,
    "other": d / "other",  # another checkpoint path (a resume is refused before any model is loaded)
  }


def _args(ck, imgs, out, *extra):
  base = ["score", "--checkpoint", str(ck), "--prompt", "a cat", str(imgs), "--batch-size", str(BATCH)]
  return [*base, "--output", str(out), *extra]


def _lines(path: Path) -> int:
  try:
    return path.read_bytes().count(b"\n")
  except FileNotFoundError:
    return 0


def _kill_halfway(cmd, partial: Path, at: int, timeout: float = 240) -> int:
  """Runs `cmd` in its own process group, SIGKILLs it once `partial` holds `at` complete rows; -> rows kept."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
    cmd, env=env, cwd=_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
  )
  deadline = time.time() + timeout
  try:
    while _lines(partial) < at:
      assert proc.poll() is None, "the run ended before it could be killed"
      assert time.time() < deadline, "no rows appeared"
      time.sleep(0.002)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  return _lines(partial)


def test_killed_run_resumes_to_the_same_bytes(setup, tmp_path, capsys):
  ck, imgs = setup["ck"], setup["imgs"]
  ref = tmp_path / "ref.jsonl"
  assert main(_args(ck, imgs, ref)) == 0
  assert len(ref.read_text().splitlines()) == N
  assert not list(tmp_path.glob("*.partial*"))  # the partial files are removed once the result is in place

  out = tmp_path / "out.jsonl"
  partial = tmp_path / "out.jsonl.partial"
  cmd = [sys.executable, "-m", "hps_jax.cli", *_args(ck, imgs, out)]
  kept = _kill_halfway(cmd, partial, at=N // 2 - BATCH)
  assert not out.exists()
  assert N // 2 - BATCH <= kept < N and kept % BATCH == 0, kept  # whole chunks, each fsynced as it was scored
  meta = (tmp_path / "out.jsonl.partial.json").read_text()

  # another checkpoint: refused before any model is loaded, one line, the partial run left as it was
  capsys.readouterr()
  assert main(_args(setup["other"], imgs, out, "--resume")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot resume" in err[0] and "checkpoint differ" in err[0], err
  assert _lines(partial) == kept

  # --resume needs --output
  assert main(["score", "--checkpoint", str(ck), "--prompt", "x", str(imgs), "--resume"]) == 2
  assert "--resume continues a run written to a file" in capsys.readouterr().err

  assert main(_args(ck, imgs, out, "--resume")) == 0
  err = capsys.readouterr().err
  assert out.read_bytes() == ref.read_bytes()  # byte-identical to the uninterrupted run
  assert f"resumed: {kept} done, {N - kept} to go" in err
  assert f"resumed run: {N - kept} inputs scored now, {kept} taken from the partial run" in err  # nothing redone
  assert "done: 200 images processed, 0 skipped" in err
  assert not partial.exists() and not (tmp_path / "out.jsonl.partial.json").exists()

  # a partial run whose rows do not match the inputs (an image renamed, rows reordered): refused, named
  rows = ref.read_text().splitlines()[:16]
  rows[3], rows[4] = rows[4], rows[3]
  other = tmp_path / "other.jsonl"
  Path(str(other) + ".partial").write_text("".join(r + "\n" for r in rows))
  Path(str(other) + ".partial.json").write_text(meta)
  assert main(_args(ck, imgs, other, "--resume")) == 2
  err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
  assert len(err) == 1 and "other.jsonl.partial:4: cannot resume" in err[0] and "0004.png" in err[0], err


SMALL = 24


@pytest.fixture(scope="module")
def small(setup, tmp_path_factory):
  """The first SMALL images and their uninterrupted run's output, and the settings that run recorded."""
  from hps_jax import files

  d = tmp_path_factory.mktemp("small")
  shutil.copytree(setup["imgs"], d / "imgs", ignore=lambda _, names: [n for n in names if n >= f"{SMALL:04d}.png"])
  recorded = []
  real_init = files.JsonlAppender.__init__

  def spy(self, path, settings, *, resume=False):  # the settings a run records (its output's name is not one)
    recorded.append(settings)
    real_init(self, path, settings, resume=resume)

  files.JsonlAppender.__init__ = spy
  try:
    assert main(_args(setup["ck"], d / "imgs", d / "ref.jsonl")) == 0
  finally:
    files.JsonlAppender.__init__ = real_init
  return {"imgs": d / "imgs", "ref": d / "ref.jsonl", "settings": recorded[0]}


def test_torn_last_line_is_redone_once_into_a_csv(setup, small, tmp_path, capsys):
  """A partial run whose last line was torn by a kill mid-write: that line is cut off and its input scored again;
  the CSV result holds each image once, in order, with the ranks over all of them."""
  import csv

  ck, sub = setup["ck"], small["imgs"]
  full = [json.loads(line) for line in small["ref"].read_text().splitlines()]
  lines = [json.dumps({k: v for k, v in r.items() if k != "rank"}) for r in full[:9]]
  out = tmp_path / "out.csv"
  Path(str(out) + ".partial").write_text("\n".join(lines[:8]) + "\n" + lines[8][:20])  # 8 rows + a torn one
  Path(str(out) + ".partial.json").write_text(json.dumps({"settings": small["settings"]}))
  capsys.readouterr()
  assert main(_args(ck, sub, out, "--resume")) == 0
  err = capsys.readouterr().err
  assert f"resumed: 8 done, {SMALL - 8} to go" in err and f"resumed run: {SMALL - 8} inputs scored now" in err, err
  with open(out, newline="") as f:
    got = list(csv.DictReader(f))
  assert [r["image"] for r in got] == [r["image"] for r in full]  # each once, in order
  assert [int(r["rank"]) for r in got] == [r["rank"] for r in full]
  assert [float(r["hps"]) for r in got] == [r["hps"] for r in full]


def test_a_stop_keeps_the_partial_result(setup, small, tmp_path, capsys, monkeypatch):
  """SIGTERM / SIGINT (an `Interrupted` raised mid-stream, as the CLI's handler raises it): the chunks done are kept
  in OUT.partial (exit 143; OUT itself is not written) and --resume finishes with the uninterrupted run's bytes; a
  run without --resume starts afresh."""
  from hps_jax.cli import common
  from hps_jax.errors import Interrupted

  ck, sub, ref = setup["ck"], small["imgs"], small["ref"]
  real = common._identified

  def stopping(inputs, score):
    for n, pair in enumerate(real(inputs, score)):
      if n == 2 * BATCH + 3:
        raise Interrupted(15)
      yield pair

  monkeypatch.setattr(common, "_identified", stopping)
  out, plain = tmp_path / "out.jsonl", tmp_path / "plain.jsonl"
  capsys.readouterr()
  assert main(_args(ck, sub, plain)) == 143
  assert f"kept in {plain}.partial: rerun with --resume" in capsys.readouterr().err
  assert not plain.exists() and _lines(Path(f"{plain}.partial")) == 2 * BATCH
  assert main(_args(ck, sub, out)) == 143
  assert f"kept in {out}.partial: rerun with --resume" in capsys.readouterr().err
  assert _lines(Path(f"{out}.partial")) == 2 * BATCH  # the chunks written before the stop
  monkeypatch.setattr(common, "_identified", real)
  assert main(_args(ck, sub, out, "--resume")) == 0
  assert f"resumed: {2 * BATCH} done, {SMALL - 2 * BATCH} to go" in capsys.readouterr().err
  assert out.read_bytes() == ref.read_bytes()
