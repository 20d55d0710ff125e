"""The choice loss by hand, and `hps-jax eval-preference` end to end (the metric itself: tests/preference/test_evaluate.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.preference.evaluate import preference_report
from hps_jax.preference.loss import choice_loss

ROOT = Path(__file__).resolve().parents[2]


def test_choice_loss_matches_hand_computation():
  cos = jnp.array([[0.30, 0.29, 0.0, 0.0], [0.20, 0.21, 0.19, 0.215]])
  mask = jnp.array([[True, True, False, False], [True, True, True, True]])
  chosen = jnp.array([0, 3])
  logit_scale = jnp.log(jnp.float32(100.0)) + 1.0  # above the clamp: exp(.) is clamped to 100
  loss, m = choice_loss(cos, logit_scale, mask, chosen)
  l0 = -np.log(np.exp(30) / (np.exp(30) + np.exp(29)))  # padded slots take no probability
  z = np.exp(100 * np.array([0.20, 0.21, 0.19, 0.215]))
  l1 = -np.log(z[3] / z.sum())
  np.testing.assert_allclose(float(loss), (l0 + l1) / 2, rtol=1e-5)
  assert float(m["accuracy"]) == 1.0 and float(m["logit_scale"]) == pytest.approx(100.0)
  # padded rows (weight 0) do not count
  loss_w, _ = choice_loss(cos, logit_scale, mask, chosen, weights=jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(float(loss_w), l0, rtol=1e-5)


def _eval(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(
    [sys.executable, "-m", "hps_jax.cli", "eval-preference", *map(str, args)],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=ROOT,
  )


def test_eval_command_on_a_jsonl_dataset(tmp_path):
  """A checkpoint scored through the command equals the report computed from Scorer scores in-process."""
  pytest.importorskip("tensorflow_datasets")
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.data.synthetic import SyntheticPreference, write_jsonl
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.preference.scorer import Scorer

  src = SyntheticPreference(12, seed=3, split="test")
  write_jsonl(src, tmp_path / "data", "test")
  ckpt = save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(1)), tmp_path / "ckpt")
  res = _eval(
    "--checkpoint",
    ckpt,
    "--dataset",
    "preference_jsonl",
    "--manual-dir",
    tmp_path / "data",
    "--output",
    tmp_path / "out" / "report.json",
  )
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.loads((tmp_path / "out" / "report.json").read_text())
  for key in ("accuracy", "random_expectation", "pairwise_accuracy", "num_prompts", "per_n"):
    assert key in report
  assert (tmp_path / "out" / "report.md").read_text().startswith("### HPS")
  scorer = Scorer.from_checkpoint(ckpt)
  scores = [scorer.score(list(src[i]["images"]), src[i]["prompt"]) for i in range(len(src))]
  want = preference_report(scores, [src[i]["ranks"] for i in range(len(src))])
  assert report["num_prompts"] == 12
  assert report["accuracy"] == want["accuracy"] and report["pairwise_accuracy"] == want["pairwise_accuracy"]


def test_eval_command_random_baseline_and_errors(tmp_path):
  res = _eval("--random", "--dataset", "synthetic", "--synthetic-size", "400", "--output", tmp_path / "r.json")
  assert res.returncode == 0, res.stderr[-3000:]
  rep = json.loads((tmp_path / "r.json").read_text())
  assert rep["num_prompts"] == 400 and abs(rep["accuracy"] - rep["random_expectation"]) < 0.07
  assert abs(rep["pairwise_accuracy"] - 0.5) < 0.07
  bad = _eval("--random", "--dataset", "nope")
  assert bad.returncode == 2 and "Traceback" not in bad.stderr and "unknown dataset" in bad.stderr
  bad = _eval("--aesthetic", "x.pth", "--dataset", "synthetic")
  assert bad.returncode == 2 and "--clip-checkpoint" in bad.stderr


def test_eval_command_aesthetic_baseline(tmp_path, aesthetic_weights):
  """The aesthetic predictor as a baseline: per-image ratings from the same command, equal to AestheticScorer's."""
  from flax import nnx

  from hps_jax.convert.clip import save_hf
  from hps_jax.data.synthetic import SyntheticPreference
  from hps_jax.models.clip import CLIP, CLIPConfig
  from hps_jax.preference.scorer import AestheticScorer

  clip = save_hf(CLIP(CLIPConfig.tiny().replace(embed_dim=768), rngs=nnx.Rngs(2)), tmp_path / "clip")
  mlp = aesthetic_weights / "sac+logos+ava1-l14-linearMSE.pth"
  res = _eval(
    "--aesthetic",
    mlp,
    "--clip-checkpoint",
    clip,
    "--dataset",
    "synthetic",
    "--synthetic-size",
    "10",
    "--output",
    tmp_path / "aes.json",
  )
  assert res.returncode == 0, res.stderr[-3000:]
  report = json.loads((tmp_path / "aes.json").read_text())
  src = SyntheticPreference(10, seed=0, split="test")
  scorer = AestheticScorer.from_checkpoint(mlp, clip)
  want = preference_report(
    [scorer.score(list(src[i]["images"])) for i in range(10)], [src[i]["ranks"] for i in range(10)]
  )
  assert report["scorer"].startswith("aesthetic") and report["preprocess"] == "clip"
  assert report["accuracy"] == want["accuracy"] and report["pairwise_accuracy"] == want["pairwise_accuracy"]
