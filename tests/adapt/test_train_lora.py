"""LoRA training of the tiny SD (configs/lora_sd14.py:tiny): the loss falls over 200 steps, only adapters train and
the export reloads; SIGKILL + resume reproduces the uninterrupted trajectory bit for bit; the latent cache holds what
the encoders compute. Training runs in subprocesses (sharing the test run's XLA compilation cache)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import assert_same_trajectory, sigkill_after_checkpoint, train_metrics

ROOT = Path(__file__).resolve().parents[2]
TINY = f"{ROOT}/configs/lora_sd14.py:tiny"


@pytest.fixture(scope="module")
def env():
  e = dict(os.environ, JAX_PLATFORMS="cpu")  # with conftest's shared compilation cache: one compile for all runs
  e.pop("XLA_FLAGS", None)
  return e


def _cmd(workdir, *overrides):
  return [
    sys.executable,
    "-m",
    "hps_jax.cli",
    "train-lora",
    "--config",
    TINY,
    "--workdir",
    str(workdir),
    "--config.progress=False",
    *overrides,
  ]


def _train(env, workdir, *overrides, timeout=900):
  res = subprocess.run(_cmd(workdir, *overrides), env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-4000:]
  return json.loads(res.stdout.strip().splitlines()[-1]), res.stderr


@pytest.fixture(scope="module")
def straight(env, tmp_path_factory):
  """The uninterrupted 200-step run (constant LR: its first steps are any shorter run's steps too)."""
  wd = tmp_path_factory.mktemp("straight")
  summary, _ = _train(env, wd, "--config.log_every=1")
  return wd, summary, train_metrics(wd)


def test_loss_falls_only_adapters_train_and_export_reloads(straight):
  wd, summary, rows = straight
  assert summary["status"] == "done" and summary["step"] == 200
  losses = np.array([rows[s]["loss"] for s in range(1, 201)])
  first, last = losses[:20].mean(), losses[-20:].mean()
  assert last < 0.85 * first, (first, last)
  # trainable = the adapters alone: 4 transformer blocks x 8 projections at rank 4 (tests/test_lora.py counts)
  assert summary["trainable_params"] == 9984
  from hps_jax import lora
  from hps_jax.convert.diffusers import load_unet
  from hps_jax.convert.lora import load_lora

  adapters, info = load_lora(summary["export"])
  assert len(adapters) == 32 and {a.down.shape[1] for a in adapters.values()} == {4}
  assert all(np.abs(a.up).max() > 0 for a in adapters.values())  # every adapter moved away from B = 0
  unet = load_unet(wd / "base_model")  # the base stays what it was
  lora.set_adapters(unet, adapters)
  assert len(lora.lora_layers(unet)) == 32


def test_sigkill_and_resume_reproduce_the_uninterrupted_run(env, straight, tmp_path):
  _, _, reference = straight
  common = ["--config.num_steps=30", "--config.log_every=1", "--config.checkpoint_every=10"]
  wd = tmp_path / "killed"
  # killed once checkpoint 10 is written and at least 13 steps have logged a loss
  killed_at = sigkill_after_checkpoint(_cmd(wd, *common), env, wd, 10, lambda wd: len(train_metrics(wd)) >= 13)
  assert 10 < killed_at < 30 and not (wd / "checkpoints" / "30").exists()

  summary, log = _train(env, wd, *common)
  assert "resumed from" in log and summary["step"] == 30
  assert_same_trajectory(train_metrics(wd), reference, 30)


def test_latent_cache_holds_the_encoders_outputs(tmp_path, parity):
  """data.cache: the stored VAE moments and text embeddings are what the step would compute from the images."""
  from flax import nnx

  from hps_jax.adapt import train_lora as tl
  from hps_jax.configs import load_config

  config = load_config(TINY, ["--config.data.synthetic_size=3"])  # an in-process override (demo, notebooks)
  model_dir = tl.base_model_dir(config, tmp_path)
  rows = tl.read_manifest(tl.manifest_path(config, tmp_path))
  assert len(rows) == 6  # 3 prompts: a preferred + a non-preferred each
  rows = rows[:5]
  model, tok, _ = tl.build_model(config, model_dir)
  tf = tl.ExampleTransform(tok, config.data.resolution, random_crop=False)
  cache = tl.build_cache(model, rows, tf, tmp_path / "cache.npz", batch_size=3)  # 2 batches, the last one short
  assert cache.moments.shape == (5, 8, 8, 8) and cache.context.shape == (5, 77, 32)
  enc = [tf.encode_row(r) for r in rows]
  mean, logvar = nnx.jit(lambda v, x: v.encode(x))(model.vae, np.stack([e["pixels"] for e in enc]))
  context = nnx.jit(lambda t, i: t(i))(model.text_encoder, np.stack([e["ids"] for e in enc]))
  want = np.concatenate([np.asarray(mean), np.asarray(logvar)], -1)
  parity("LoRA latent cache vs VAE encode (moments)", np.abs(cache.moments - want).max(), 1e-5)
  parity("LoRA latent cache vs text encoder", np.abs(cache.context - np.asarray(context)).max(), 1e-5)
  again = tl.build_cache(model, rows, tf, tmp_path / "cache.npz")  # reused from the file
  np.testing.assert_array_equal(again.moments, cache.moments)
  other = tl.build_cache(model, rows[:4], tf, tmp_path / "cache.npz")  # other rows: rebuilt, not reused
  assert len(other) == 4


def test_dry_run_counts_adapters(tmp_path):
  res = subprocess.run(
    [
      sys.executable,
      "-m",
      "hps_jax.cli",
      "train-lora",
      "--config",
      TINY,
      "--workdir",
      str(tmp_path),
      "--dry-run",
      "--config.lora.rank=8",
    ],
    capture_output=True,
    text=True,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    timeout=300,
  )
  assert res.returncode == 0, res.stderr
  assert json.loads(res.stdout.splitlines()[0]) == {"lora_layers": 32, "lora_params": 2 * 9984}


def test_data_parallel_losses_equal_single_device(env, straight, tmp_path):
  """Batch sharded over 2 devices (frozen base sharded by the logical rules, adapters replicated): the same losses."""
  _, _, reference = straight
  _train(
    dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
    tmp_path / "dp",
    "--config.num_steps=8",
    "--config.log_every=1",
    "--config.checkpoint_every=0",
    "--config.mesh.data=2",
  )
  got = train_metrics(tmp_path / "dp")
  np.testing.assert_allclose(
    [got[s]["loss"] for s in range(1, 9)], [reference[s]["loss"] for s in range(1, 9)], rtol=2e-5, atol=0
  )
  assert [got[s]["data_checksum"] for s in range(1, 9)] == [reference[s]["data_checksum"] for s in range(1, 9)]


def test_webdataset_regularization_rows(tmp_path, capsys):
  """data.regularization = webdataset shards: the usable samples become regularization rows (original bytes written
  under WORKDIR/regularization/), bad ones are named on stderr, the index is reused, the limit caps the count."""
  pytest.importorskip("webdataset")
  import io
  import tarfile

  from PIL import Image

  from hps_jax.adapt.train_lora import regularization_rows
  from hps_jax.configs.lora_sd14 import get_config

  images = {}
  with tarfile.open(tmp_path / "00000.tar", "w") as tf:
    for k, caption in enumerate(["a lake", None, "a hill", "a broken one"]):
      buf = io.BytesIO()
      Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(buf, "PNG")
      data = buf.getvalue() if k != 3 else b"not an image"
      images[k] = data
      for name, payload in ((f"{k:03d}.png", data), (f"{k:03d}.txt", caption.encode() if caption else None)):
        if payload is None:
          continue
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
  config = get_config("tiny")
  assert config.data.regularization == "" and regularization_rows(config, tmp_path / "wd") == []
  config.data.regularization = str(tmp_path / "00000.tar")
  rows = regularization_rows(config, tmp_path / "wd")
  err = capsys.readouterr().err
  out = tmp_path / "wd" / "regularization"
  assert rows == [
    {"image": str(out / "images/00000000.png"), "caption": "a lake", "kind": "regularization"},
    {"image": str(out / "images/00000001.png"), "caption": "a hill", "kind": "regularization"},
  ]
  assert [Path(r["image"]).read_bytes() for r in rows] == [images[0], images[2]]
  assert "skipped" in err and "001.png: no caption" in err and "003.png" in err and "2 skipped" in err
  (out / "images/00000000.png").write_bytes(b"kept")  # the index is reused: nothing is extracted again
  assert regularization_rows(config, tmp_path / "wd") == rows and (out / "images/00000000.png").read_bytes() == b"kept"
  config.data.regularization_limit = 1
  assert [r["caption"] for r in regularization_rows(config, tmp_path / "wd")] == ["a lake"]
