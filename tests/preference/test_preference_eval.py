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


# ------------------------------------------------------------------------------------------------------------
# several scorers in one run: the paper's Table 2 (in-process through `hps_jax.cli.main`)
# ------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def table2_inputs(tmp_path_factory):
  """Tiny random CLIPs (one with the 768-d embedding the aesthetic head reads) and a random aesthetic head."""
  from flax import nnx

  from hps_jax.convert.aesthetic import save_aesthetic
  from hps_jax.convert.clip import save_hf
  from hps_jax.models.aesthetic import AestheticMLP
  from hps_jax.models.clip import CLIP, CLIPConfig

  d = tmp_path_factory.mktemp("table2")
  return {
    "hps": save_hf(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(1)), d / "hps_export"),
    "clip": save_hf(CLIP(CLIPConfig.tiny().replace(embed_dim=768), rngs=nnx.Rngs(2)), d / "clip-tiny"),
    "head": save_aesthetic(AestheticMLP(rngs=nnx.Rngs(3)), d / "head.safetensors"),
  }


_DATA = ["--dataset", "synthetic", "--synthetic-size", "13", "--batch-size", "4"]


def _run(tmp_path, name, *args):
  from hps_jax.cli import main

  out = tmp_path / f"{name}.json"
  assert main(["eval-preference", *map(str, args), *_DATA, "--output", str(out)]) == 0
  return json.loads(out.read_text()), out.with_suffix(".md").read_text()


def test_several_scorers_give_the_single_scorer_numbers_in_the_paper_order(table2_inputs, tmp_path):
  from hps_jax.data.synthetic import SyntheticPreference

  f = table2_inputs
  multi, table = _run(
    tmp_path,
    "multi",
    "--checkpoint",
    f"HPS={f['hps']}",
    "--aesthetic-mlp",
    f["head"],
    "--clip-checkpoint",
    f["clip"],
    "--checkpoint",
    f["clip"],  # no name: labelled by its folder's name, which starts with "clip": a CLIP row
    "--random",
  )
  singles = {
    "random": _run(tmp_path, "random", "--random")[0],
    "clip-tiny": _run(tmp_path, "clip", "--checkpoint", f["clip"])[0],
    "head.safetensors": _run(tmp_path, "aes", "--aesthetic-mlp", f["head"], "--clip-checkpoint", f["clip"])[0],
    "HPS": _run(tmp_path, "hps", "--checkpoint", f["hps"])[0],
  }
  # the single-scorer reports keep their keys and names
  assert singles["HPS"]["scorer"] == f"HPS ({f['hps']})" and singles["head.safetensors"]["scorer"].startswith(
    "aesthetic"
  )
  assert set(singles["random"]) == {
    "accuracy", "random_expectation", "pairwise_accuracy", "num_prompts", "num_pairs", "per_n", "scorer", "dataset",
    "split", "preprocess",
  }  # fmt: skip
  names = ["random", "clip-tiny", "head.safetensors", "HPS"]  # random, CLIP, aesthetic, HPS: the paper's order
  assert [r["scorer"] for r in multi["scorers"]] == names == [r["scorer"] for r in multi["table"]]
  assert [r["kind"] for r in multi["scorers"]] == ["random", "clip", "aesthetic", "hps"]
  for row, summary in zip(multi["scorers"], multi["table"]):
    one = singles[row["scorer"]]
    for k in ("accuracy", "random_expectation", "pairwise_accuracy", "num_prompts", "num_pairs", "per_n"):
      assert row[k] == one[k], (row["scorer"], k)  # exactly the single-scorer run's numbers
    assert row["preprocess"] == one["preprocess"] == ("clip" if row["kind"] == "aesthetic" else "pad")
    assert summary["accuracy"] == row["accuracy"] and summary["preprocess"] == row["preprocess"]
  assert [r["image_size"] for r in multi["scorers"]] == [32, 32, 32, 32]  # CLIPConfig.tiny()'s input size
  assert multi["scorers"][0]["seed"] == 0 and multi["scorers"][3]["checkpoint"] == str(f["hps"])
  assert multi["scorers"][2]["clip_checkpoint"] == str(f["clip"])
  # the random row's expectation is the mean of 1/n over the prompts
  src = SyntheticPreference(13, seed=0, split="test")
  want = float(np.mean([1.0 / len(src[i]["ranks"]) for i in range(13)]))
  assert multi["scorers"][0]["random_expectation"] == pytest.approx(want, abs=1e-15)
  # the markdown: the Table 2 layout, rows in the same order, accuracies in %
  lines = table.splitlines()
  assert lines[2] == "| scorer | n-way accuracy (%) | random guess (%) | pairwise accuracy (%) | prompts |"
  body = [line.split("|")[1:-1] for line in lines[4:8]]
  assert [c[0].strip() for c in body] == names
  for cells, row in zip(body, multi["scorers"]):
    assert cells[1].strip() == f"{100 * row['accuracy']:.2f}" and cells[4].strip() == "13"
    assert cells[2].strip() == f"{100 * want:.2f}"
  assert "clip-tiny: pad 32px" in table and "head.safetensors: clip 32px" in table


def test_several_scorers_names_and_errors(table2_inputs, tmp_path, capsys):
  import shutil

  from hps_jax.cli import main

  f = table2_inputs
  odd = tmp_path / "run=1"  # an existing path holding '=' is a path, not NAME=CKPT
  shutil.copytree(f["hps"], odd)
  rep, table = _run(tmp_path, "odd", "--checkpoint", odd, "--checkpoint", f"ViT-L/14 (CLIP)={f['clip']}")
  assert [r["scorer"] for r in rep["scorers"]] == ["run=1", "ViT-L/14 (CLIP)"]  # not named CLIP...: HPS rows
  single, _ = _run(tmp_path, "odd1", "--checkpoint", odd)
  assert single["scorer"] == f"HPS ({odd})" and single["accuracy"] == rep["scorers"][0]["accuracy"]
  named, table = _run(tmp_path, "named", "--checkpoint", f"CLIP tiny={f['hps']}")  # one named scorer
  assert named["scorer"] == "CLIP tiny" and table.startswith("### CLIP tiny on synthetic/test")

  def fails(*args):
    capsys.readouterr()
    assert main(["eval-preference", *map(str, args), *_DATA]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hps-jax eval-preference: error: "), err
    return err[0]

  assert "named 'a'" in fails("--checkpoint", f"a={f['hps']}", "--checkpoint", f"a={f['clip']}")
  assert "label them" in fails("--checkpoint", f["hps"], "--checkpoint", f"hps_export={f['clip']}")
  assert "nope/x" in fails("--checkpoint", f"A={tmp_path / 'nope' / 'x'}", "--random")
  assert "--clip-checkpoint" in fails("--aesthetic-mlp", f"aes={f['head']}", "--random")
  assert "choose a scorer" in fails()


def test_resnet_clip_row_at_its_own_resolution(table2_inputs, tmp_path):
  """Table 2's CLIP RN50x64 row: a ModifiedResNet CLIP (OpenAI layout, here a 64 px tiny one) is a CLIP row scored at
  its own input size, with the same numbers as when it runs alone."""
  from flax import nnx

  from hps_jax.convert.clip import model_params, params_to_openai
  from hps_jax.convert.io import save_safetensors
  from hps_jax.models.clip import CLIP, CLIPConfig

  cfg = CLIPConfig.tiny_resnet()
  rn = tmp_path / "RN50x64.safetensors"
  save_safetensors(params_to_openai(model_params(CLIP(cfg, rngs=nnx.Rngs(4))), cfg), rn)
  multi, table = _run(
    tmp_path, "rn", "--checkpoint", f"HPS={table2_inputs['hps']}", "--checkpoint", f"CLIP RN50x64={rn}", "--random"
  )
  assert [(r["scorer"], r["kind"], r["image_size"]) for r in multi["scorers"]] == [
    ("random", "random", 32),
    ("CLIP RN50x64", "clip", 64),
    ("HPS", "hps", 32),
  ]
  alone, _ = _run(tmp_path, "rn1", "--checkpoint", rn)
  assert alone["accuracy"] == multi["scorers"][1]["accuracy"]
  assert alone["pairwise_accuracy"] == multi["scorers"][1]["pairwise_accuracy"]
  assert "CLIP RN50x64: pad 64px" in table
