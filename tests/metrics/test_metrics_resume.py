"""`hps-jax metrics --resume`: a run SIGKILLed half-way and resumed from its work folder gives exactly the JSON of an
uninterrupted run (FID / IS / KID from the same float32 features in the same order, float64 accumulation; CLIP
score and HPS from the same per-image cosines), redoes only the chunks its log does not hold (counted from the
resumed run's own report), keeps the skips of the chunks it reads back, survives a torn last log line, and refuses to
continue with another resize or other Inception weights (exit 2, one line) without touching the saved chunks."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main as cli

N_IMAGES, N_REF, CHUNK, BATCH = 48, 8, 8, 8  # 6 chunks of one Inception batch; images 48x48, reference 40x40
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.convert.inception import save_inception_torch
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.models.inception import FIDInception

  root = tmp_path_factory.mktemp("resume")
  inc = save_inception_torch(FIDInception(rngs=nnx.Rngs(0)), root / "inception.safetensors")
  other = save_inception_torch(FIDInception(rngs=nnx.Rngs(1)), root / "other_inception.safetensors")
  clip = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(3)), root / "clip")
  rng = np.random.default_rng(0)
  (root / "imgs").mkdir()
  rows = []
  for i in range(N_IMAGES):
    p = root / "imgs" / f"img_{i:03d}.png"
    if i == 5:  # a corrupt image in the first chunk: its skip must survive the resume (read back from the log)
      p.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    else:
      Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(p)
    rows.append({"image": f"imgs/{p.name}", "prompt": f"a photo of thing {i % 7}"})
  (root / "imgs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (root / "ref").mkdir()
  for i in range(N_REF):
    Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / "ref" / f"r_{i:03d}.png")
  return {"root": root, "inception": inc, "other": other, "clip": clip}


def argv(s, output, *extra):
  return [
    "metrics",
    "--images",
    str(s["root"] / "imgs.jsonl"),
    "--metrics",
    "fid,is,kid,clip,hps",
    "--reference",
    str(s["root"] / "ref"),
    "--inception-weights",
    str(s["inception"]),
    "--clip-checkpoint",
    str(s["clip"]),
    "--checkpoint",
    str(s["clip"]),
    "--batch-size",
    str(BATCH),
    "--chunk-size",
    str(CHUNK),
    "--is-splits",
    "4",
    "--kid-subsets",
    "5",
    "--kid-subset-size",
    "8",
    "--output",
    str(output),
    *extra,
  ]


def reuse_counts(err: str, name: str = "images") -> tuple[int, int, int]:
  m = re.search(rf"^{name}: (\d+) chunks reused from .*, (\d+) computed \((\d+) images\)$", err, re.M)
  assert m, err
  return tuple(int(x) for x in m.groups())


def log_lines(log: Path) -> int:
  return log.read_bytes().count(b"\n") if log.exists() else 0


def test_killed_run_resumes_to_the_same_numbers(setup, tmp_path, capsys):
  s = setup
  # the uninterrupted run (in this process)
  t0 = time.perf_counter()
  assert cli(argv(s, tmp_path / "full.json")) == 1  # 1: the corrupt image was skipped (named and counted)
  err = capsys.readouterr().err
  assert "img_005.png" in err and "47 images processed, 1 skipped" in err
  assert reuse_counts(err) == (0, N_IMAGES // CHUNK, N_IMAGES)
  assert reuse_counts(err, "reference") == (0, 1, N_REF)
  assert not (tmp_path / "full.json.work").exists()  # removed once the result was written
  full = json.loads((tmp_path / "full.json").read_text())
  assert full["num_images"] == 47 and full["skipped"] == 1 and full["fid"] > 0 and full["clip"]["num_images"] == 47
  t1 = time.perf_counter()

  # the same run in a subprocess, SIGKILLed once half the chunks are logged
  out = tmp_path / "resumed.json"
  log = tmp_path / "resumed.json.work" / "images.chunks.jsonl.partial"
  cmd = [sys.executable, "-m", "hps_jax.cli", *argv(s, out)]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
  deadline = time.time() + 300
  try:
    while log_lines(log) < 3:
      assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
      assert time.time() < deadline, "no chunk was logged"
      time.sleep(0.02)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
  assert proc.returncode == -signal.SIGKILL and not out.exists()
  done = log_lines(log)
  assert 3 <= done < N_IMAGES // CHUNK, done  # killed half-way: chunks left to do
  with open(log, "ab") as f:  # as if the kill had torn a line mid-write: the resumed run cuts it off
    f.write(b'{"chunk": 99, "fi')
  t2 = time.perf_counter()

  # resuming with another resize or other Inception weights is refused (exit 2, one line), the chunks kept
  for extra, what in (
    (["--resize", "torch"], "resize"),
    (["--inception-weights", str(s["other"])], "inception_sha256"),
  ):
    args = argv(s, out, "--resume", *extra)  # a later option wins
    assert cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and what in err, err
    assert log_lines(log) == done
  t3 = time.perf_counter()

  # the real resume: only the chunks the log does not hold are computed, and the JSON is the uninterrupted one's
  assert cli(argv(s, out, "--resume")) == 1
  err = capsys.readouterr().err
  reused, computed, computed_images = reuse_counts(err)
  assert (reused, computed) == (done, N_IMAGES // CHUNK - done)
  assert computed_images == N_IMAGES - done * CHUNK  # what the killed run had finished is not redone
  assert "img_005.png" in err and "47 images processed, 1 skipped" in err  # the skip read back from chunk 0's record
  assert json.loads(out.read_text()) == full
  assert out.read_text() == (tmp_path / "full.json").read_text()  # identical to the last digit
  assert not (tmp_path / "resumed.json.work").exists()
  t4 = time.perf_counter()
  print(f"full {t1 - t0:.1f} s, killed run {t2 - t1:.1f} s, refusals {t3 - t2:.1f} s, resume {t4 - t3:.1f} s")


def test_resume_usage(setup, tmp_path, capsys):
  s = setup
  args = argv(s, tmp_path / "x.json", "--resume")
  i = args.index("--output")
  del args[i : i + 2]
  assert cli(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and "--resume needs --output" in err


def write_shards(root: Path, s, n: int, per_shard: int) -> list[Path]:
  """The first `n` images of the set (the corrupt one included) as webdataset shards, with their prompts as captions."""
  import io
  import tarfile

  rows = [json.loads(line) for line in (s["root"] / "imgs.jsonl").read_text().splitlines()][:n]
  root.mkdir()
  shards = []
  for k in range(0, n, per_shard):
    shards.append(root / f"{k // per_shard:05d}.tar")
    with tarfile.open(shards[-1], "w") as tf:
      for i in range(k, min(k + per_shard, n)):
        for name, data in (
          (f"{i:06d}.png", (s["root"] / rows[i]["image"]).read_bytes()),
          (f"{i:06d}.txt", rows[i]["prompt"].encode()),
        ):
          info = tarfile.TarInfo(name)
          info.size = len(data)
          tf.addfile(info, io.BytesIO(data))
  (root.parent / "first.jsonl").write_text(
    "".join(json.dumps({"image": str(s["root"] / r["image"]), "prompt": r["prompt"]}) + "\n" for r in rows)
  )
  return shards


def test_shards_give_the_folder_numbers_and_resume(setup, tmp_path, capsys, monkeypatch):
  pytest.importorskip("webdataset")
  from hps_jax.errors import Interrupted
  from hps_jax.metrics import compute

  s = setup
  n = 12
  write_shards(tmp_path / "shards", s, n, per_shard=5)
  common = ["--chunk-size", "8"]

  def run(source, output, *extra):
    args = argv(s, output, *common, *extra)
    i = args.index("--images")
    args[i : i + 2] = source
    return cli(args)

  assert run(["--images", str(tmp_path / "first.jsonl")], tmp_path / "folder.json") == 1
  capsys.readouterr()
  folder = json.loads((tmp_path / "folder.json").read_text())
  assert folder["num_images"] == n - 1 and folder["skipped"] == 1

  spec = str(tmp_path / "shards" / "{00000..00002}.tar")
  # a run stopped (SIGTERM-like) after its first chunk, then resumed: the shards are read again up to where it
  # goes on, and the numbers equal the folder's
  real = compute.ChunkExtractor.__call__
  calls = []

  def stop_after_one(self, decoded, skipped):
    if self.scorers and calls:
      raise Interrupted(15)
    calls.append(1)
    return real(self, decoded, skipped)

  monkeypatch.setattr(compute.ChunkExtractor, "__call__", stop_after_one)
  assert run(["--shards", spec], tmp_path / "shards.json") == 143
  monkeypatch.setattr(compute.ChunkExtractor, "__call__", real)
  capsys.readouterr()
  assert run(["--shards", spec], tmp_path / "shards.json", "--resume") == 1
  err = capsys.readouterr().err
  assert reuse_counts(err) == (1, 1, n - 8)  # chunks of 8: the first read back, the second computed
  assert "00001.tar/000005.png" in err and "1 skipped" in err  # the corrupt sample, named by shard and key
  shards = json.loads((tmp_path / "shards.json").read_text())
  assert shards.pop("shards") == spec and folder.pop("images") == str(tmp_path / "first.jsonl")
  assert shards == folder
