"""Generator metrics over image sets: FID, IS, KID (FID Inception-v3), CLIP score, aesthetic score, mean HPS.

An image set is a directory (searched recursively for image files, sorted by path), a JSONL of {"image", "prompt"}
rows (needed for the prompt-conditioned metrics: CLIP score, HPS), or — as a FID reference only — a `.npz` of
statistics (`mu`, `sigma`, as pytorch-fid writes them). Unreadable images are skipped, counted and named; the
metrics are computed on the rest.

Inception features stream through in fixed-size batches grouped by image size (each size compiles the resize once;
the network compiles once), so memory holds the running FID statistics plus, when IS/KID are asked for, the logits
and pool3 features (KID needs the features themselves).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm import tqdm

from hps_jax import weights
from hps_jax.data.images import ImageError, describe, image_files, load_image
from hps_jax.data.pairs import read_image_rows
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError
from hps_jax.metrics.fid import FeatureStats, frechet_distance, load_stats, load_stats_meta
from hps_jax.metrics.inception_features import extract
from hps_jax.metrics.scores import clip_score, inception_score, kernel_inception_distance
from hps_jax.models.inception import POOL3_DIM
from hps_jax.preference.scorer import AestheticScorer, Scorer


def default_inception_weights() -> Path:
  """$HPS_JAX_INCEPTION_WEIGHTS, else the copy pytorch-fid / torch hub keep in ~/.cache/torch/hub/checkpoints, else
  the weights cache's `inception-fid` (sha256-checked; never downloaded here: `hps-jax weights path inception-fid
  --download` or `hps_jax.fid` fetch it). Missing: FileNotFoundError, one line saying what to download and where."""
  env = os.environ.get("HPS_JAX_INCEPTION_WEIGHTS")
  if env:
    return Path(env)
  torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
  hub = torch_home / "hub" / "checkpoints" / weights.INCEPTION_FILE
  if hub.exists():
    return hub
  try:
    return weights.resolve("inception-fid", download_missing=False)
  except weights.WeightsError as e:
    raise FileNotFoundError(f"no FID Inception weights (pass --inception-weights PATH): {e}") from e


def set_statistics(
  model,
  path,
  skipped: Skips,
  *,
  resize: str,
  batch_size: int,
  desc="set A",
  keep=(),
  progress=True,
  allow_outside=False,
):
  """The Inception pass over one image set (needs at least two readable images); `allow_outside`: see
  `list_images`."""
  run = inception_pass(
    model, list_images(path, skipped, allow_outside=allow_outside), skipped, resize=resize, batch_size=batch_size, keep=keep, desc=desc,
    progress=progress,
  )  # fmt: skip
  if run.count < 2:
    raise InputError(f"{path}: fewer than two readable images")
  return run


def list_images(path, skipped: Skips | None = None, *, allow_outside: bool = False) -> list[tuple[str, str | None]]:
  """(image path, prompt or None) for a directory of images or a JSONL of {"image", "prompt"} rows (relative paths
  stay inside the JSONL's folder unless `allow_outside`, `--allow-outside-paths`)."""
  p = Path(path)
  if p.is_dir():
    return [(str(f), None) for f in image_files(p)]
  if p.suffix == ".jsonl":
    skip = skipped.add if skipped is not None else (lambda *_: None)
    return list(read_image_rows(p, skip, require_prompt=False, allow_outside=allow_outside))
  if not p.exists():
    raise FileNotFoundError(f"{p}: no such file or directory")
  raise InputError(f'{p}: expected a directory of images or a .jsonl of {{"image", "prompt"}} rows')


def load_images(
  items: Iterable[tuple[str, str | None]], skipped: Skips, workers: int = 4
) -> Iterator[tuple[str, str | None, np.ndarray]]:
  """Decodes images on host threads, in order; unreadable ones go to `skipped`."""

  items = list(items)

  def one(item):
    try:
      return item, load_image(item[0]), None
    except ImageError as e:
      return item, None, e

  with cf.ThreadPoolExecutor(max(1, workers)) as pool:
    for (src, prompt), arr, err in pool.map(one, items):
      if err is not None:
        skipped.add(describe(src), err.message)
      else:
        yield src, prompt, arr


class InceptionFeatures:
  """Streams uint8 images through the FID Inception in fixed-size batches grouped by image size."""

  def __init__(self, model, resize: str = "tf1", batch_size: int = 50, keep: tuple[str, ...] = ()):

    self.model, self.resize, self.batch_size = model, resize, batch_size
    self.stats = FeatureStats()
    self.keep = {k: [] for k in keep}  # "pool3" (KID), "logits_unbiased" (IS)
    self._pending: dict[tuple, list] = {}
    self.count = 0

  def add(self, image: np.ndarray):
    group = self._pending.setdefault(image.shape, [])
    group.append(image)
    if len(group) == self.batch_size:
      self._flush(image.shape)

  def _flush(self, shape):

    group = self._pending.pop(shape, [])
    if not group:
      return
    n = len(group)
    batch = np.stack(group + [group[-1]] * (self.batch_size - n))  # pad: one network compile for every batch
    out = extract(self.model, batch, self.resize)
    pool3 = np.asarray(out["pool3"][:n], np.float64)
    self.stats.update(pool3)
    for k in self.keep:
      self.keep[k].append(np.asarray(out[k][:n], np.float32))
    self.count += n

  def finish(self) -> "InceptionFeatures":
    for shape in list(self._pending):
      self._flush(shape)
    return self

  def kept(self, key: str) -> np.ndarray:
    return np.concatenate(self.keep[key]) if self.keep[key] else np.zeros((0, 0), np.float32)


def inception_pass(
  model,
  items,
  skipped: Skips,
  *,
  resize: str,
  batch_size: int,
  keep=(),
  desc: str = "inception",
  progress: bool = True,
) -> InceptionFeatures:

  runner = InceptionFeatures(model, resize, batch_size, keep)
  items = list(items)
  with tqdm(total=len(items), desc=desc, unit="img", disable=not progress, dynamic_ncols=True) as bar:
    for _, _, img in load_images(items, skipped):
      runner.add(img)
      bar.update(1)
  return runner.finish()


class StatsMismatchWarning(UserWarning):
  """Saved FID statistics made with another resize or other Inception weights than the set they are compared with."""


def file_sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def stats_meta(*, resize: str, inception_sha256: str | None, num_images: int) -> dict:
  """What a saved statistics file records about how it was made."""
  return {"resize": resize, "inception_sha256": inception_sha256, "num_images": num_images}


def check_stats_meta(path, *, resize: str, inception_sha256: str | None) -> list[str]:
  """Warns (StatsMismatchWarning, one line each) when saved statistics were made another way; -> the messages."""
  meta = load_stats_meta(path)
  if meta is None:
    return []
  problems = []
  if meta.get("resize") not in (None, resize):
    problems.append(f"{path} was made with --resize {meta['resize']}, this run uses {resize}: FID is not comparable")
  theirs = meta.get("inception_sha256")
  if theirs and inception_sha256 and theirs != inception_sha256:
    problems.append(
      f"{path} was made with other Inception weights (sha256 {theirs[:12]}..., this run {inception_sha256[:12]}...)"
    )
  for msg in problems:
    warnings.warn(msg, StatsMismatchWarning, stacklevel=2)
  return problems


def reference_stats(
  path,
  model,
  skipped: Skips,
  *,
  resize: str,
  batch_size: int,
  keep=(),
  progress=True,
  inception_sha256=None,
  dim: int | None = POOL3_DIM,
  allow_outside: bool = False,
):
  """FID reference: a stats .npz (mu, sigma) or an image set. Returns (mu, sigma, InceptionFeatures or None).
  A stats file is validated (`hps_jax.metrics.fid.check_stats`; `dim`-dimensional features, the Inception pool3's by
  default): InputError naming it. A stats file recording another resize or other Inception weights
  (`inception_sha256`) gives a warning."""

  if str(path).endswith(".npz"):
    mu, sigma = load_stats(path, dim=dim)
    check_stats_meta(path, resize=resize, inception_sha256=inception_sha256)
    return mu, sigma, None
  run = set_statistics(
    model,
    path,
    skipped,
    resize=resize,
    batch_size=batch_size,
    desc="reference",
    keep=keep,
    progress=progress,
    allow_outside=allow_outside,
  )
  mu, sigma = run.stats.mu_sigma()
  return mu, sigma, run


def cosine_scales(cosines, *, clamp: bool) -> dict:
  """One image-text similarity on both of the scales in use, labelled: {"cosine": the mean cosine, "x100": 100 times
  it, "clamp", "num_images"}. The paper's Table 4 prints cosines (CLIP score 0.2816, HPS 0.1898); HPS as a score is
  100 · cos (`hps-jax score`), and CLIP score is usually quoted x100 (torchmetrics). clamp=True (the CLIP score):
  each image's cosine is clamped at 0 before the mean (`hps_jax.metrics.scores.clip_score`'s per-image definition;
  the same as the raw mean when no cosine is negative, the usual case for trained CLIP); clamp=False (HPS): the raw
  mean. x100 is exactly 100 * cosine."""
  c = np.asarray(cosines, np.float64).reshape(-1)
  mean = clip_score(c, clamp="per_image", scale=1.0) if clamp else float(c.mean())
  return {"cosine": mean, "x100": 100.0 * mean, "clamp": "per_image" if clamp else "none", "num_images": int(c.size)}


def generator_metrics(
  items,
  wanted,
  skipped: Skips,
  *,
  reference=None,
  inception=None,
  resize: str = "tf1",
  batch_size: int = 50,
  is_splits: int = 10,
  kid_subsets: int = 100,
  kid_subset_size: int = 1000,
  clip_checkpoint=None,
  aesthetic_mlp=None,
  hps_checkpoint=None,
  inception_sha256: str | None = None,
  allow_outside: bool = False,
) -> dict:
  """The `wanted` metrics (fid, is, kid, clip, aesthetic, hps) of one image set: `items` are (image, prompt or
  None) pairs; fid/kid compare with `reference` (images, or saved statistics for fid) through the `inception`
  model; clip uses `clip_checkpoint` (CLIP preprocessing), hps `hps_checkpoint` (the paper's pad preprocessing),
  aesthetic the LAION head `aesthetic_mlp` on `clip_checkpoint`. clip and hps come on both scales
  (`cosine_scales`: result["clip"] / result["hps"] = {"cosine", "x100", ...}; "clip_score" / "hps_mean" are their
  x100 values, the keys of before). Unreadable images are skipped into `skipped`.
  Raises ValueError for a missing input a metric needs (InputError, one of them, for bad input files: a statistics
  reference is validated before the Inception pass)."""
  wanted = set(wanted)
  result: dict = {}
  if "kid" in wanted and reference is not None and str(reference).endswith(".npz"):
    raise InputError(f"{reference}: kid needs reference images (their features), not saved statistics")
  saved = None  # a statistics reference, read (and validated) now rather than after the pass over every image
  if {"fid"} & wanted and reference is not None and str(reference).endswith(".npz"):
    saved = load_stats(reference, dim=POOL3_DIM)
  if {"clip", "hps"} & wanted:
    missing = [src for src, prompt in items if prompt is None]
    if missing:
      raise InputError(
        f"clip/hps need a prompt per image: give the images as a JSONL of {{image, prompt}} rows "
        f"({len(missing)} images have none, e.g. {missing[0]})"
      )
  if {"fid", "is", "kid"} & wanted:
    if inception is None:
      raise ValueError("fid / is / kid need the Inception model")
    keep = tuple(k for m, k in (("is", "logits_unbiased"), ("kid", "pool3")) if m in wanted)
    run = inception_pass(inception, items, skipped, resize=resize, batch_size=batch_size, keep=keep)
    result["num_images"] = run.count
    result["resize"] = resize
    if "is" in wanted:
      result["is_mean"], result["is_std"] = inception_score(run.kept("logits_unbiased"), splits=is_splits)
    if {"fid", "kid"} & wanted:
      if reference is None:
        raise InputError("fid and kid need a reference (images, or saved statistics for fid)")
      if saved is not None:
        (mu_r, sigma_r), ref = saved, None
        check_stats_meta(reference, resize=resize, inception_sha256=inception_sha256)
      else:
        mu_r, sigma_r, ref = reference_stats(
          reference,
          inception,
          skipped,
          resize=resize,
          batch_size=batch_size,
          keep=("pool3",) if "kid" in wanted else (),
          inception_sha256=inception_sha256,
          allow_outside=allow_outside,
        )
      result["reference"] = str(reference)
      if "fid" in wanted:
        mu, sigma = run.stats.mu_sigma()
        result["fid"] = frechet_distance(mu, sigma, mu_r, sigma_r)
      if "kid" in wanted:
        result["kid_mean"], result["kid_std"] = kernel_inception_distance(
          run.kept("pool3"), ref.kept("pool3"), subsets=kid_subsets, subset_size=kid_subset_size
        )
  bad_names = {w for w, _ in skipped.items}
  readable = [(src, p) for src, p in items if src not in bad_names]
  if {"clip", "hps"} & wanted:
    for metric, ckpt, mode in (("clip", clip_checkpoint, "clip"), ("hps", hps_checkpoint, "pad")):
      if metric not in wanted:
        continue
      if not ckpt:
        raise ValueError(f"the {metric} metric needs a checkpoint")
      scorer = Scorer.from_checkpoint(ckpt, preprocess=mode)
      rows = tqdm(scorer.iter_scores(readable), total=len(readable), desc=metric, unit="img", dynamic_ncols=True)
      cos = np.array([r["cosine"] for r in rows if "cosine" in r])
      if not cos.size:
        raise InputError(f"{metric}: no readable image to score")
      result[metric] = cosine_scales(cos, clamp=metric == "clip")
      # the keys of before, kept for compatibility: CLIP score and mean HPS, both x100
      result["clip_score" if metric == "clip" else "hps_mean"] = result[metric]["x100"]
  if "aesthetic" in wanted:
    if not (aesthetic_mlp and clip_checkpoint):
      raise ValueError("the aesthetic metric needs the aesthetic head and a CLIP ViT-L/14 checkpoint")

    aes = AestheticScorer.from_checkpoint(aesthetic_mlp, clip_checkpoint)
    rows = aes.iter_scores([src for src, _ in readable])
    rows = tqdm(rows, total=len(readable), desc="aesthetic", unit="img", dynamic_ncols=True)
    vals = [r["aesthetic"] for r in rows if "aesthetic" in r]
    result["aesthetic_mean"] = float(np.mean(vals))
  return result
