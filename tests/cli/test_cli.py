"""`hps-jax score` on a corrupt-input corpus: every bad input is named in the summary, nothing crashes, exit codes
tell the story; unusual-but-valid images (CMYK, 16-bit, RGBA) are converted and scored."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hps_jax.convert.clip import save_hf
from hps_jax.models.clip import CLIP, CLIPConfig


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  from flax import nnx

  d = tmp_path_factory.mktemp("cli") / "tiny_hf"
  save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), d)
  return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  d = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(d / "ok.png")
  (d / "zero.jpg").write_bytes(b"")
  Image.fromarray(rgb).save(d / "full.jpg", quality=90)
  data = (d / "full.jpg").read_bytes()
  (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
  Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
  Image.fromarray(rng.integers(0, 65536, (20, 50), dtype=np.uint16)).save(d / "deep16.png")
  assert Image.open(d / "deep16.png").mode.startswith("I")
  Image.fromarray(np.dstack([rgb, rng.integers(0, 256, (40, 30), dtype=np.uint8)])).save(d / "rgba.png")
  (d / "text.png").write_text("this is not an image")
  lines = [
    json.dumps({"image": n, "prompt": f"prompt for {n}"})
    for n in ["ok.png", "zero.jpg", "truncated.jpg", "cmyk.jpg", "deep16.png", "rgba.png", "missing.png", "text.png"]
  ]
  lines.insert(3, '{"image": "ok.png", "prompt": ')  # line 4: broken JSON
  lines.insert(5, json.dumps({"image": "ok.png"}))  # line 6: no prompt
  lines.insert(6, "")  # blank lines are ignored
  (d / "pairs.jsonl").write_text("\n".join(lines) + "\n")
  return d


GOOD = ["ok.png", "cmyk.jpg", "deep16.png", "rgba.png"]
BAD = {
  "zero.jpg": "",
  "truncated.jpg": "",
  "missing.png": "",
  "text.png": "",
  "pairs.jsonl:4": "not valid JSON",
  "pairs.jsonl:6": '"prompt"',
}


def _cli(*args, cwd=None):
  exe = Path(sys.executable).with_name("hps-jax")
  cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "hps_jax.cli"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_corrupt_corpus_pairs(checkpoint, corpus, tmp_path):
  out = tmp_path / "scores.jsonl"
  res = _cli(
    "score", "--checkpoint", checkpoint, "--pairs", corpus / "pairs.jsonl", "--output", out, "--batch-size", "4"
  )
  assert res.returncode == 1, res.stderr
  assert "Traceback" not in res.stderr
  summary = res.stderr[res.stderr.index("done:") :]
  assert summary.splitlines()[0] == f"done: {len(GOOD)} images processed, {len(BAD)} skipped"
  for name, why in BAD.items():
    line = next((l for l in summary.splitlines() if name in l), None)
    assert line is not None and line.strip().startswith("skipped"), (name, summary)
    assert why in line
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert [Path(r["image"]).name for r in rows] == GOOD
  for r in rows:
    assert set(r) == {"image", "prompt", "hps", "cosine", "rank"}
    assert r["rank"] == 1  # every image has its own prompt here
    assert r["prompt"] == f"prompt for {Path(r['image']).name}"
    assert np.isfinite(r["hps"]) and r["hps"] == pytest.approx(100 * r["cosine"], rel=1e-9)
    assert "img/s" in res.stderr  # the progress bar reports a rate

  # the CLI's numbers are the library's numbers
  from hps_jax.preference.scorer import Scorer

  want = Scorer.from_checkpoint(checkpoint, batch_size=4).score(
    [corpus / n for n in GOOD], [f"prompt for {n}" for n in GOOD]
  )
  np.testing.assert_allclose([r["hps"] for r in rows], want, rtol=1e-5, atol=1e-4)


def test_prompt_mode_stdout_and_clean_exit(checkpoint, corpus):
  res = _cli(
    "score",
    "--checkpoint",
    checkpoint,
    "--prompt",
    "a cat",
    corpus / "ok.png",
    corpus / "rgba.png",
    "--preprocess",
    "clip",
  )
  assert res.returncode == 0, res.stderr
  rows = [json.loads(l) for l in res.stdout.splitlines()]
  assert [r["prompt"] for r in rows] == ["a cat", "a cat"]
  assert "done: 2 images processed, 0 skipped" in res.stderr


def test_folders_ranks_and_output_formats(checkpoint, corpus, tmp_path, capsys):
  """A folder argument scores every image below it; `rank` orders the images of one prompt (1 = highest HPS); the
  .csv and .parquet outputs hold the same rows as .jsonl; an existing output is refused without --overwrite."""
  from hps_jax.cli import main

  good = tmp_path / "good"
  (good / "sub").mkdir(parents=True)
  for i, name in enumerate(GOOD):
    (good / ("sub" if i % 2 else ".") / name).write_bytes((corpus / name).read_bytes())
  base = ["score", "--checkpoint", str(checkpoint), "--prompt", "a cat", str(good), "--batch-size", "4"]
  assert main([*base, "--output", str(tmp_path / "s.jsonl")]) == 0
  rows = [json.loads(l) for l in (tmp_path / "s.jsonl").read_text().splitlines()]
  assert sorted(Path(r["image"]).name for r in rows) == sorted(GOOD)  # the folder, recursively
  order = np.argsort([-r["hps"] for r in rows], kind="stable")
  assert [rows[i]["rank"] for i in order] == sorted(r["rank"] for r in rows)
  assert sorted(r["rank"] for r in rows) == [1, 2, 3, 4]

  import csv

  import pyarrow.parquet as pq

  assert main([*base, "--output", str(tmp_path / "s.csv")]) == 0
  assert main([*base, "--output", str(tmp_path / "s.parquet")]) == 0
  with open(tmp_path / "s.csv", newline="", encoding="utf-8") as f:
    from_csv = list(csv.DictReader(f))
  from_parquet = pq.read_table(tmp_path / "s.parquet").to_pylist()
  for want, c, p in zip(rows, from_csv, from_parquet):
    assert c["image"] == p["image"] == want["image"] and int(c["rank"]) == p["rank"] == want["rank"]
    assert float(c["hps"]) == p["hps"] == want["hps"]  # repr round trip: the same float64
  capsys.readouterr()
  assert main([*base, "--output", str(tmp_path / "s.csv")]) == 2  # exists
  assert "pass --overwrite" in capsys.readouterr().err
  assert main([*base, "--output", str(tmp_path / "s.csv"), "--overwrite"]) == 0
  assert main([*base, "--output", str(tmp_path / "s.txt")]) == 2
  assert "unknown format .txt" in capsys.readouterr().err


@pytest.mark.parametrize(
  "args, message",
  [
    (["--checkpoint", "{tmp}/nope", "--prompt", "x", "a.png"], "nope"),
    (["--checkpoint", "{ckpt}", "--prompt", "x"], "--prompt needs at least one IMAGE"),
    (["--checkpoint", "{ckpt}", "--pairs", "{tmp}/absent.jsonl"], "absent.jsonl: No such file or directory"),
    (["--checkpoint", "{tmp}/garbage.pt", "--prompt", "x", "a.png"], "garbage.pt"),
    (["--checkpoint", "{ckpt}", "--prompt", "x", "a.png", "--batch-size", "0"], "--batch-size"),
  ],
)
def test_usage_errors_are_one_line(checkpoint, tmp_path, args, message):
  (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
  args = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in args]
  res = _cli("score", *args)
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr
  errors = [l for l in res.stderr.splitlines() if "error" in l]
  assert len(errors) == 1 and message in errors[0], res.stderr


@pytest.mark.parametrize(
  "args",
  [
    [
      "eval-generator",
      "--model",
      "m",
      "--prompts",
      "missing.txt",
      "--metrics",
      "hps",
      "--hps-checkpoint",
      "c",
      "--output",
      "o.json",
    ],
    ["label", "--scorer", "c", "--images", "missing", "--regularization", "r", "--out", "m.jsonl"],
  ],
)
def test_python_dash_m_usage_errors_from_other_modules(args, tmp_path):
  """`python -m hps_jax.cli`: a UsageError raised by a subcommand defined outside cli.py (hps_jax.adapt) is the one
  main() catches: exit 2 with one line, no traceback."""
  res = subprocess.run(
    [sys.executable, "-m", "hps_jax.cli", *args],
    capture_output=True,
    text=True,
    timeout=120,
    cwd=tmp_path,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert res.returncode == 2, res.stderr
  assert "Traceback" not in res.stderr and res.stderr.startswith(f"hps-jax {args[0]}: error:"), res.stderr


def test_aesthetic_head_and_clip_size_mismatch_is_one_line(checkpoint, corpus, tmp_path, capsys):
  """A 768-input aesthetic head on a CLIP whose embedding is smaller: exit 2 naming both sizes, before any image."""
  from flax import nnx

  from hps_jax.cli import main
  from hps_jax.convert.aesthetic import save_aesthetic
  from hps_jax.models.aesthetic import AestheticMLP

  head = save_aesthetic(AestheticMLP(rngs=nnx.Rngs(0)), tmp_path / "head.safetensors")
  rc = main(["aesthetic", "--aesthetic-mlp", str(head), "--clip-checkpoint", str(checkpoint), str(corpus / "ok.png")])
  assert rc == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "expects 768-d embeddings" in err[0], err
