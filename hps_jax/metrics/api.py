"""The one-liners behind `hps_jax.score` and `hps_jax.fid`.

import hps_jax
hps_jax.score(["a.png", "b.png"], "a red bicycle")              # HPS v2.1 from the weights cache
hps_jax.fid("generated/", "reference_stats.npz")                  # FID against saved statistics
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from hps_jax import weights
from hps_jax.convert.inception import load_inception
from hps_jax.data.skips import Skips
from hps_jax.metrics import compute
from hps_jax.metrics.fid import frechet_distance
from hps_jax.preference.scorer import Scorer

_SCORERS: dict = {}  # the last scorer built, so repeated one-liner calls with one model load it once


def _scorer(model, kw) -> Scorer:
  key = (os.fspath(model) if isinstance(model, os.PathLike) else model, repr(sorted(kw.items())))
  if key not in _SCORERS:
    _SCORERS.clear()
    _SCORERS[key] = Scorer.from_pretrained(model, **kw)
  return _SCORERS[key]


def score(images, prompts, model="hps-v2.1", **kw) -> np.ndarray:
  """HPS (100 * cosine) of each image against its prompt (one prompt for all, or one per image). `model`: a name
  from `hps_jax.weights.REGISTRY` (cached / downloaded, sha256-checked) or a checkpoint path; `kw`:
  `Scorer.from_checkpoint`'s arguments (preprocess, dtype, tokenizer, batch_size, ...)."""
  return np.asarray(_scorer(model, kw).score(images, prompts))


def inception_weights_path(inception_weights=None) -> Path:
  """The FID Inception weights: the given path, else `compute.default_inception_weights()` (environment, torch hub
  copy, the weights cache), else the registry's `inception-fid` downloaded into the cache."""
  if inception_weights is not None:
    return Path(inception_weights)
  try:
    return compute.default_inception_weights()
  except FileNotFoundError:
    return weights.resolve("inception-fid")  # the Python one-liner may download (sha256-checked)


def fid(
  path_a, path_b_or_stats, *, inception_weights=None, resize: str = "tf1", batch_size: int = 50, progress: bool = False
) -> float:
  """FID between image set `path_a` (a directory or a JSONL of {image} rows) and a second set or a statistics
  .npz (mu, sigma). Unreadable images are skipped (as `hps-jax fid` does); fewer than two readable images in a
  set is a ValueError."""
  if batch_size < 1:
    raise ValueError("batch_size must be >= 1")
  model = load_inception(inception_weights_path(inception_weights))
  skips = Skips()
  a = compute.set_statistics(model, path_a, skips, resize=resize, batch_size=batch_size, progress=progress)
  mu_b, sigma_b, _ = compute.reference_stats(
    path_b_or_stats, model, skips, resize=resize, batch_size=batch_size, progress=progress
  )
  mu_a, sigma_a = a.stats.mu_sigma()
  return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))
