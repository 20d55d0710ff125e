"""`hps-jax label` at dataset scale: a synthetic DiffusionDB of 2,000 images in 4 zip parts (prompts spanning parts)
is labelled once straight through (the reference, shared with tests/adapt/test_label_multihost.py), then by a run
SIGKILLed half way and resumed with --resume: the same manifest, extracted images and per-image scores byte for
byte, with no more than the chunk in flight redone and nothing scored twice. A resume under other settings (another
checkpoint, another alpha) is refused with one line and exit 2, leaving the partial log as it was."""

import collections
import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.cli import main

ROOT = Path(__file__).resolve().parents[2]
PARTS, PER_PART = 4, 500  # 2,000 images
BATCH = 8
ALPHA = 1.2  # the tiny random CLIP's HPS spread is small: at 1.2 about half the prompts keep each kind
BAD = {"part-000002.zip": "00777.png", "part-000003.zip": "01313.png"}  # members whose bytes are not an image


def prompt_of(k: int) -> str:
  """Images 0..1799 share 400 prompts (4 or 5 images each, spread over all parts: image k and k + 400, ...);
  1800..1999 have 150 prompts: 50 of 2 images (scored at alpha 1.2) and 100 of 1 (never scored)."""
  return f"a picture of thing {k % 400}" if k < 1800 else f"a lonely sketch {k % 150}"


def expected_candidates() -> dict[int, int]:
  """Part index -> number of its images whose prompt is scored (n >= 2 and n > alpha)."""
  counts = collections.Counter(prompt_of(k) for k in range(PARTS * PER_PART))
  ok = [counts[prompt_of(k)] >= 2 and counts[prompt_of(k)] > ALPHA for k in range(PARTS * PER_PART)]
  return {p: sum(ok[p * PER_PART : (p + 1) * PER_PART]) for p in range(PARTS)}


def _png(rng) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG", compress_level=1)
  return buf.getvalue()


def write_db(root: Path) -> Path:
  rng = np.random.default_rng(0)
  for p in range(PARTS):
    name = f"part-{p + 1:06d}.zip"
    meta = {}
    (root / "images").mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(root / "images" / name, "w") as zf:
      for k in range(p * PER_PART, (p + 1) * PER_PART):
        member = f"{k:05d}.png"
        zf.writestr(member, b"not an image at all" if BAD.get(name) == member else _png(rng))
        meta[member] = {"p": prompt_of(k), "se": k}
      zf.writestr(name.replace(".zip", ".json"), json.dumps(meta))
      if p == 0:
        zf.writestr("readme.txt", b"not an image member")
  return root


def write_checkpoint(path: Path, seed: int) -> Path:
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.models.clip import CLIP, CLIPConfig

  save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(seed)), path)
  return path


def label_env(**extra) -> dict:
  drop = ("HPS_COORDINATOR", "HPS_NUM_PROCESSES", "HPS_PROCESS_ID", "HPS_DISTRIBUTED", "SLURM_", "XLA_FLAGS")
  env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1", **extra)
  return env


def label_cmd(data: dict, out: Path, *extra) -> list[str]:
  return [
    sys.executable,
    "-m",
    "hps_jax.cli",
    "label",
    "--scorer",
    str(data["ckpt"]),
    "--images",
    str(data["db"]),
    "--regularization",
    str(data["reg"]),
    "--out",
    str(out / "manifest.jsonl"),
    "--scores",
    str(out / "scores.jsonl"),
    "--batch-size",
    str(BATCH),
    "--alpha",
    str(ALPHA),
    *map(str, extra),
  ]


def run_label(data, out: Path, *extra, env=None, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(
    label_cmd(data, out, *extra), env=env or label_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
  )


def summary_of(stdout: str) -> dict:
  return json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])


def tree(out: Path) -> dict[str, bytes]:
  """Every file the run left in its output folder (manifest, scores, extracted images), by relative path."""
  return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


_SHARED: dict = {}  # one synthetic download and one reference run per test process, whichever module asks first


@pytest.fixture(scope="session")
def label_data(tmp_path_factory):
  if "data" in _SHARED:
    return _SHARED["data"]
  d = tmp_path_factory.mktemp("label_scale")
  reg = d / "reg"
  reg.mkdir()
  rng = np.random.default_rng(1)
  for n in ("r1.png", "r2.png"):
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(reg / n)
  (reg / "metadata.jsonl").write_text(
    json.dumps({"file_name": "r1.png", "caption": "a photo"})
    + "\n"
    + json.dumps({"file_name": "r2.png", "caption": "a drawing"})
    + "\n"
  )
  _SHARED["data"] = {
    "db": write_db(d / "db"),
    "reg": reg,
    "ckpt": write_checkpoint(d / "tiny_hf", 0),
    "ckpt2": write_checkpoint(d / "tiny_hf_other", 1),
    "dir": d,
  }
  return _SHARED["data"]


@pytest.fixture(scope="session")
def reference(label_data):
  """The uninterrupted single-process run: (its output tree, its summary, its stderr)."""
  if "reference" not in _SHARED:
    out = label_data["dir"] / "reference"
    res = run_label(label_data, out)
    assert res.returncode == 1, res.stderr[-3000:]  # done, with the bad members named as skips
    _SHARED["reference"] = tree(out), summary_of(res.stdout), res.stderr
  return _SHARED["reference"]


def test_reference_run(reference, label_data):
  files, summary, stderr = reference
  cands = sum(expected_candidates().values())
  assert cands == 1900
  assert summary["images"] == 2000 and summary["prompts"] == 550 and summary["prompts_not_scored"] == 100
  assert summary["scored"] == cands - len(BAD) and summary["skipped"] == 3  # 2 bad images, readme.txt
  assert summary["shares"] == [cands] and summary["processes"] == 1 and summary["labelled"] == cands
  n = summary["counts"]
  assert n["preferred"] > 50 and n["non_preferred"] > 50 and n["regularization"] == 2
  db = label_data["db"] / "images"
  assert f"skipped {db / 'part-000001.zip'}:readme.txt: not an image member" in stderr
  for part, member in BAD.items():
    assert f"skipped {db / part}:{member}:" in stderr
  manifest = [json.loads(line) for line in files["manifest.jsonl"].decode().splitlines()]
  assert len(manifest) == n["preferred"] + n["non_preferred"] + 2
  for row in manifest[:-2]:  # every selected image was extracted, original bytes
    assert row["image"] in files and row["image"].startswith("images/images/part-00000")
  scores = [json.loads(line) for line in files["scores.jsonl"].decode().splitlines()]
  assert len(scores) == summary["scored"]
  # nothing of the run's scratch state is left behind: only the manifest, the scores and the images
  assert set(files) == {"manifest.jsonl", "scores.jsonl"} | {r["image"] for r in manifest[:-2]}


def _complete_lines(path: Path) -> int:
  return path.read_bytes().count(b"\n") if path.exists() else 0


def test_sigkill_and_resume_is_byte_identical(reference, label_data, capsys):
  ref_files, ref_summary, _ = reference
  out = label_data["dir"] / "killed"
  partial = out / "manifest.jsonl.scores.0-of-1.partial"
  total = sum(expected_candidates().values())
  proc = subprocess.Popen(
    label_cmd(label_data, out),
    env=label_env(),
    cwd=ROOT,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    start_new_session=True,
  )
  deadline = time.time() + 240
  try:
    while (seen := _complete_lines(partial)) < total // 2:
      assert proc.poll() is None, "the run ended before it could be killed"
      assert time.time() < deadline, "the score log did not grow"
      time.sleep(0.01)
  finally:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert not (out / "manifest.jsonl").exists()  # the manifest only ever appears whole, at the end
  kept = _complete_lines(partial)
  assert total // 2 <= seen <= kept < total

  # resuming under other settings is refused: one line, exit 2, the partial log untouched
  before = partial.read_bytes()
  for flag, value, differ in (("--alpha", 1.5, "label"), ("--scorer", label_data["ckpt2"], "checkpoint")):
    argv = label_cmd(label_data, out, "--resume")[3:]
    if flag == "--scorer":
      argv[argv.index("--scorer") + 1] = str(value)
    else:
      argv[argv.index("--alpha") + 1] = str(value)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot resume" in err and f"({differ} differ)" in err, err
    assert partial.read_bytes() == before

  res = run_label(label_data, out, "--resume")
  assert res.returncode == 1, res.stderr[-3000:]
  line = next(s for s in res.stderr.splitlines() if s.startswith("resumed: "))
  done, to_go = (int(w) for w in line.removeprefix("resumed: ").replace(" scored,", "").replace(" to go", "").split())
  # the resumed run kept every complete line (a torn one is cut) and redid less than one chunk: the log is written
  # in whole chunks of BATCH rows, so the killed run lost at most the chunk it was scoring
  assert done == kept - kept % BATCH and done % BATCH == 0 and done + to_go == total
  print(f"killed with {seen} rows seen, {kept} kept; resumed: {done} done, {to_go} to go (chunks of {BATCH})")
  summary = summary_of(res.stdout)
  assert (summary["resumed"], summary["labelled"]) == (done, to_go)  # nothing scored twice
  assert summary["shares"] == [total]
  files = tree(out)
  assert files.keys() == ref_files.keys()
  for name, data in ref_files.items():
    assert files[name] == data, name  # manifest, scores and every extracted image: byte for byte
  assert {k: v for k, v in summary.items() if k not in ("manifest", "resumed", "labelled")} == {
    k: v for k, v in ref_summary.items() if k not in ("manifest", "resumed", "labelled")
  }


@pytest.mark.parametrize("per_lookup", [1, 2, 64])
def test_streamed_listing_equals_the_whole_listing(tmp_path, monkeypatch, per_lookup):
  """`iter_record_units` (what `label` reads, a part at a time) gives `read_records`' records and skips, in order,
  whatever the number of parts per parquet lookup; JSONL rows come in blocks of JSONL_UNIT."""
  from hps_jax.data import diffusiondb as ddb
  from tests.data.test_diffusiondb import Skips, encode, pixels, write_parquet, write_part

  monkeypatch.setattr(ddb, "PARTS_PER_LOOKUP", per_lookup)
  root = tmp_path / "db"
  rows = []
  for p in (3, 1, 2):
    members = {f"{p}-{k}.png": encode(pixels(p * 10 + k)) for k in range(5)}
    members[f"{p}-x.txt"] = b"text"
    meta = {n: {"p": f"json {n}"} for n in list(members)[:3]} | {f"{p}-ghost.png": {"p": "g"}}
    write_part(root / "images" / f"part-{p:06d}.zip", members, meta)
    rows += [{"image_name": f"{p}-{k}.png", "prompt": f"parquet {p}-{k}", "part_id": p} for k in (1, 3)]
  write_parquet(root / "metadata.parquet", rows)
  whole_skips, streamed_skips = Skips(), Skips()
  whole = ddb.read_records(root, whole_skips)
  units = list(ddb.iter_record_units(root, streamed_skips))
  assert [len(u) for u in units] == [4, 4, 4]  # per part: 5 images, the one without a prompt skipped
  assert [r for u in units for r in u] == whole and streamed_skips == whole_skips and len(whole_skips) == 9
  assert [r.prompt for r in units[0]] == ["json 1-0.png", "parquet 1-1", "json 1-2.png", "parquet 1-3"]

  lines = [json.dumps({"image": f"{k}.png", "prompt": f"p{k}"}) for k in range(7)]
  (tmp_path / "l.jsonl").write_text("\n".join(lines[:3] + ["{bad"] + lines[3:]) + "\n")
  monkeypatch.setattr(ddb, "JSONL_UNIT", 3)
  a, b = Skips(), Skips()
  units = list(ddb.iter_record_units(tmp_path / "l.jsonl", a))
  assert [len(u) for u in units] == [3, 3, 1]
  assert [r for u in units for r in u] == ddb.read_records(tmp_path / "l.jsonl", b) and a == b and len(a) == 1
