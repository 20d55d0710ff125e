"""Generator metrics over image sets: FID, IS, KID (FID Inception-v3), CLIP score, aesthetic score, mean HPS.

An image set is a directory (searched recursively for image files, sorted by path), a JSONL of {"image", "prompt"}
rows (needed for the prompt-conditioned metrics: CLIP score, HPS), or — as a FID reference only — a `.npz` of
statistics (`mu`, `sigma`, as pytorch-fid writes them). Unreadable images are skipped, counted and named; the
metrics are computed on the rest.

Inception features stream through in fixed-size batches grouped by image size (each size compiles the resize once;
the network compiles once), so memory holds the running FID statistics plus, when IS/KID are asked for, the logits
and pool3 features (KID needs the features themselves).

`generator_metrics` (`hps-jax metrics`) streams the images in chunks (`chunked_pass`): each chunk is decoded once and
gives every per-image value the metrics need (Inception pool3 and logits, CLIP / HPS cosines, aesthetic ratings).
With a `WorkDir` each finished chunk is saved (`.npz`, atomic and fsynced) and logged (a fsynced JSONL line, with its
skips), so a killed run resumed from the folder redoes at most the chunk in flight, and its numbers are exactly
those of an uninterrupted run: the same features in the same (input) order, FID sums accumulated chunk by chunk.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import functools
import hashlib
import io
import itertools
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from hps_jax import files, weights
from hps_jax.data import webdataset
from hps_jax.data.images import ImageError, image_files, load_image
from hps_jax.data.pairs import read_image_rows
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError, check_stop
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
  chunk_size: int | None = None,
) -> "SetResult":
  """The FID Inception over (image, prompt) `items`, streamed in memory (`chunked_pass`, chunks of `chunk_size`,
  default `default_chunk_size(batch_size)`): -> `SetResult` with `count`, the float64 FID statistics `stats` and the
  `keep` arrays ("pool3" for KID, "logits_unbiased" for IS) in input order. The same numbers as `generator_metrics`
  gives for the same set, batch and chunk size (`hps-jax fid` and `hps-jax metrics` agree to the last digit)."""
  return chunked_pass(
    image_set(items),
    ChunkExtractor(inception=model, resize=resize, batch_size=batch_size),
    skipped,
    chunk_size=chunk_size or default_chunk_size(batch_size),
    store=ChunkStore(desc, {}),
    fid=True,
    keep=keep,
    desc=desc,
    progress=progress,
  )


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


# ------------------------------------------------------------------------------------------------------------
# Chunked, resumable extraction (the `hps-jax metrics` pass)
# ------------------------------------------------------------------------------------------------------------
CHUNK_FORMAT = 1  # the layout of the chunk files and their log; recorded in the settings


def default_chunk_size(batch_size: int) -> int:
  """Images per chunk when not given: 8 Inception batches (400 at the default batch of 50)."""
  return 8 * batch_size


class ImageSet:
  """An image set as a stream in a fixed order: `iterate(start)` yields (name, source, prompt) from item `start` on
  (`name` is what a skip report shows; `source` anything `load_image` reads). `identity` is a sha256 of what
  decides the list (each image's name, prompt and file size; a shard's path and size), `count` the number of items
  or None when only the stream knows it (tar shards), `label` the set as the user gave it."""

  def __init__(self, label: str, identity: str, count: int | None, iterate):
    self.label = label
    self.identity = identity
    self.count = count
    self._iterate = iterate

  def iterate(self, start: int = 0) -> Iterator[tuple[str, object, str | None]]:
    return self._iterate(start)


def _size(path) -> int | None:
  try:
    return os.stat(path).st_size
  except (OSError, ValueError):
    return None


def image_set(items, label: str = "images") -> ImageSet:
  """An `ImageSet` of (image path, prompt or None) pairs (`list_images`)."""
  items = [(str(src), prompt) for src, prompt in items]
  h = hashlib.sha256()
  for src, prompt in items:
    h.update(json.dumps([src, prompt, _size(src)], ensure_ascii=False).encode("utf-8") + b"\n")
  return ImageSet(
    label,
    h.hexdigest(),
    len(items),
    lambda start: ((src, src, prompt) for src, prompt in items[start:]),
  )


def shard_set(spec, skipped: Skips) -> ImageSet:
  """An `ImageSet` of the samples of webdataset tar shards (`hps_jax.data.webdataset.expand_shards`'s spec: a tar,
  a folder of tars or a brace range), in shard order then member order, each caption its prompt (None without one).
  A sample is named `SHARD/KEY.EXT`; what the reader cannot use goes to `skipped` as it reads. The identity is the
  shard list with each shard's size; a resumed run reads the shards again from the start up to where it goes on
  (decoding nothing it skips)."""
  shards = webdataset.expand_shards(spec)
  h = hashlib.sha256()
  for s in shards:
    h.update(json.dumps([str(s), _size(s)], ensure_ascii=False).encode("utf-8") + b"\n")

  def iterate(start: int):
    samples = webdataset.iter_samples(shards, skipped)
    for sample in itertools.islice(samples, start, None):
      yield sample.where, sample.image, sample.caption

  return ImageSet(str(spec), h.hexdigest(), None, iterate)


def checkpoint_identity(path) -> str | None:
  """What a resumed run checks a checkpoint against: the sha256 of a file; for a folder (a Hugging Face checkpoint)
  the sha256 of its files' names and sha256s; else the name as given (a registry name)."""
  if path is None:
    return None
  p = Path(path)
  if p.is_file():
    return file_sha256(p)
  if p.is_dir():
    h = hashlib.sha256()
    for f in sorted(x for x in p.rglob("*") if x.is_file()):
      h.update(f"{f.relative_to(p).as_posix()} {file_sha256(f)}\n".encode("utf-8"))
    return h.hexdigest()
  return str(path)


class ChunkExtractor:
  """What one chunk of decoded images yields: Inception pool3 and 1008-way unbiased logits (`inception`, the
  images grouped by size into padded batches of `batch_size` within the chunk, results put back in input order),
  per-image cosines of the `scorers` ({"clip": Scorer, "hps": Scorer}: image and prompt) and the `aesthetic`
  rating. Every value depends only on the chunk's images, so the same chunk gives the same numbers in any run."""

  def __init__(self, *, inception=None, resize: str = "tf1", batch_size: int = 50, scorers=None, aesthetic=None):
    self.inception, self.resize, self.batch_size = inception, resize, batch_size
    self.scorers = dict(scorers or {})
    self.aesthetic = aesthetic

  def __call__(self, decoded: list[tuple[int, str, np.ndarray, str | None]], skipped: list) -> dict[str, np.ndarray]:
    """`decoded`: (position in the set, name, uint8 image, prompt) of the readable images of a chunk; a value a
    scorer cannot give is added to `skipped` as (name, why) and the image left out of that metric only."""
    out: dict[str, np.ndarray] = {"index": np.array([d[0] for d in decoded], np.int64)}
    if self.inception is not None:
      out.update(self._inception([d[2] for d in decoded]))
    for name, scorer in self.scorers.items():
      vals, idx = [], []
      rows = scorer.iter_scores([(img, prompt) for _, _, img, prompt in decoded])
      for (pos, src, _, _), row in zip(decoded, rows):
        if "cosine" in row:
          vals.append(row["cosine"])
          idx.append(pos)
        else:
          skipped.append((src, f"{name}: {row.get('error')}"))
      out[name] = np.asarray(vals, np.float64)
      out[name + "_index"] = np.asarray(idx, np.int64)
    if self.aesthetic is not None:
      vals, idx = [], []
      for (pos, src, _, _), row in zip(decoded, self.aesthetic.iter_scores([d[2] for d in decoded])):
        if "aesthetic" in row:
          vals.append(row["aesthetic"])
          idx.append(pos)
        else:
          skipped.append((src, f"aesthetic: {row.get('error')}"))
      out["aesthetic"] = np.asarray(vals, np.float64)
      out["aesthetic_index"] = np.asarray(idx, np.int64)
    return out

  def _inception(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
    n_classes = self.inception.config.num_classes
    pool3 = np.zeros((len(images), POOL3_DIM), np.float32)
    logits = np.zeros((len(images), n_classes), np.float32)
    groups: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
      groups.setdefault(img.shape, []).append(i)
    for members in groups.values():
      for lo in range(0, len(members), self.batch_size):
        idx = members[lo : lo + self.batch_size]
        batch = [images[i] for i in idx]
        batch += [batch[-1]] * (self.batch_size - len(batch))  # pad: one network compile for every batch
        res = extract(self.inception, np.stack(batch), self.resize)
        pool3[idx] = np.asarray(res["pool3"][: len(idx)], np.float32)
        logits[idx] = np.asarray(res["logits_unbiased"][: len(idx)], np.float32)
        check_stop()
    return {"pool3": pool3, "logits_unbiased": logits}


def _decode(chunk: list[tuple[int, str, object, str | None]], skipped: list, workers: int = 4, need_prompt=False):
  """(position, name, uint8 image, prompt) of the readable items of a chunk, in order; the others go to `skipped`
  as (name, why)."""

  def one(item):
    if need_prompt and item[3] is None:
      return None, "no prompt (caption): clip / hps need one"
    try:
      return load_image(item[2]), None
    except ImageError as e:
      return None, e.message

  with cf.ThreadPoolExecutor(max(1, workers)) as pool:
    loaded = list(pool.map(one, chunk))
  out = []
  for (pos, name, _, prompt), (img, err) in zip(chunk, loaded):
    if err is not None:
      skipped.append((name, err))
    else:
      out.append((pos, name, img, prompt))
  return out


class WorkDir:
  """Where a resumable `metrics` run keeps its progress: per image set (`images`, `reference`) one `.npz` per
  finished chunk (written atomically and fsynced, the folder fsynced after the rename) and a JSONL log of the
  finished chunks (`hps_jax.files.JsonlAppender`: `SET.chunks.jsonl.partial`, one line per chunk appended and
  fsynced after its file is in place; the settings that decide the chunks' contents in
  `SET.chunks.jsonl.partial.json`). A lock file keeps two runs from sharing it. `remove()` deletes what the run
  wrote (after the final result is safely written)."""

  def __init__(self, path, *, resume: bool):
    self.path, self.resume = Path(path), resume
    self.created = not self.path.exists()  # by this run: removed again if it fails before finishing a chunk
    if self.path.exists() and not self.path.is_dir():
      raise InputError(f"{self.path}: the work folder is a file")
    self.path.mkdir(parents=True, exist_ok=True)
    self._lock = open(self.path / "lock", "a")
    try:
      fcntl.flock(self._lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._lock.close()
      raise InputError(f"{self.path}: another run is using this work folder") from None
    self.stores: list[ChunkStore] = []

  def store(self, name: str, settings: dict) -> "ChunkStore":
    s = ChunkStore(name, settings, self)
    self.stores.append(s)
    return s

  def close(self) -> None:
    for s in self.stores:
      s.close()
    if not self._lock.closed:
      self._lock.close()

  def remove(self) -> None:
    """Deletes the chunk files, logs and lock this kind of run writes, and the folder when that leaves it empty."""
    self.close()
    patterns = ("*.chunk-*.npz", ".*.chunk-*.npz.*.tmp", "*.chunks.jsonl", "*.chunks.jsonl.partial*")
    for pattern in patterns:
      for f in self.path.glob(pattern):
        f.unlink(missing_ok=True)
    (self.path / "lock").unlink(missing_ok=True)
    with contextlib.suppress(OSError):
      self.path.rmdir()


def _fsync_dir(path: Path) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(path, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


class ChunkStore:
  """The finished chunks of one image set: in memory (`work` None) or in a `WorkDir`, where a resumed run finds
  them (`done`: the log's rows, chunk k on line k; their files checked against the recorded sha256)."""

  def __init__(self, name: str, settings: dict, work: WorkDir | None = None):
    self.name, self.work = name, work
    self.done: list[dict] = []
    self.log = None
    self.reused = self.computed = self.computed_images = 0  # chunks read back, chunks and images computed now
    if work is None:
      return
    path = work.path / f"{name}.chunks.jsonl"
    had_partial = path.with_name(path.name + ".partial").exists()
    if had_partial and not work.resume:
      print(f"note: {work.path}: starting over (pass --resume to continue the run left there)", file=sys.stderr)
    self.log = files.JsonlAppender(path, settings, resume=work.resume)
    for k, row in enumerate(self.log.rows):
      if not (isinstance(row, dict) and row.get("chunk") == k and isinstance(row.get("file"), str)):
        raise files.ResumeError(f"{self.log.partial}:{k + 1}: cannot resume, not the record of chunk {k}")
    self.done = list(self.log.rows)

  def load(self, k: int) -> tuple[dict[str, np.ndarray], list]:
    """Chunk k's arrays and skips, as a finished run wrote them."""
    row = self.done[k]
    f = self.work.path / Path(row["file"]).name
    try:
      data = f.read_bytes()
    except OSError as e:
      raise files.ResumeError(
        f"{f}: cannot resume, a finished chunk's file is unreadable ({e.strerror or e})"
      ) from None
    if hashlib.sha256(data).hexdigest() != row.get("sha256"):
      raise files.ResumeError(f"{f}: cannot resume, the chunk file is not the one the log records (damaged?)")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
      arrays = {k2: z[k2] for k2 in z.files}
    return arrays, [tuple(s) for s in row.get("skipped", [])]

  def save(self, k: int, start: int, stop: int, arrays: dict[str, np.ndarray], skipped: list) -> None:
    if self.log is None:
      return
    name = f"{self.name}.chunk-{k:06d}.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    _write_bytes(self.work.path / name, data)
    _fsync_dir(self.work.path)
    row = {
      "chunk": k,
      "start": start,
      "stop": stop,
      "file": name,
      "sha256": hashlib.sha256(data).hexdigest(),
      "num_images": int(arrays["index"].shape[0]),
      "skipped": [list(s) for s in skipped],
    }
    self.log.write([row])

  def close(self) -> None:
    if self.log is not None:
      self.log.close()


def _write_bytes(path: Path, data: bytes) -> None:
  with files.atomic_write(path, "wb") as f:
    f.write(data)


class SetResult:
  """What the chunked pass over one image set gives: `count` readable images, FID statistics (`stats`, float64
  sums updated chunk by chunk in order), and the per-image arrays asked to be kept, concatenated in input order."""

  def __init__(self, keep):
    self.count = 0
    self.stats = FeatureStats()
    self._kept: dict[str, list[np.ndarray]] = {k: [] for k in keep}

  def add(self, arrays: dict[str, np.ndarray], fid: bool) -> None:
    self.count += int(arrays["index"].shape[0])
    if fid and arrays["pool3"].shape[0]:
      self.stats.update(arrays["pool3"])
    for k in self._kept:
      if k in arrays:
        self._kept[k].append(arrays[k])

  def kept(self, key: str) -> np.ndarray:
    parts = self._kept.get(key) or []
    return np.concatenate(parts) if parts else np.zeros((0,), np.float64)


def chunked_pass(
  images: ImageSet,
  extractor: ChunkExtractor,
  skipped: Skips,
  *,
  chunk_size: int,
  store: ChunkStore,
  fid: bool = False,
  keep=(),
  desc: str = "images",
  progress: bool = True,
  need_prompt: bool = False,
) -> SetResult:
  """The images of `images` in chunks of `chunk_size` (by position in the set): each chunk is decoded, run through
  `extractor` and handed to `store` (saved, when it has a work folder, before the next chunk starts); chunks the
  store already holds (a resumed run) are read back instead of computed. So a killed run redoes at most the chunk
  in flight, and the results are the same arrays in the same order whether or not the run was interrupted.
  `need_prompt`: an item without a prompt is skipped (a tar sample without a caption, for clip / hps)."""
  result = SetResult(keep)
  expected = {"pool3", "logits_unbiased"} if extractor.inception is not None else set()
  expected |= set(extractor.scorers) | ({"aesthetic"} if extractor.aesthetic is not None else set())
  for k in range(len(store.done)):
    arrays, skips = store.load(k)
    missing = expected - set(arrays)
    if missing:
      raise files.ResumeError(f"{store.work.path}: cannot resume, chunk {k} lacks {sorted(missing)}")
    for what, why in skips:
      skipped.add(what, why)
    result.add(arrays, fid)
    store.reused += 1
  start = len(store.done) * chunk_size
  reused_images = start
  total = images.count
  with tqdm(
    total=total, initial=min(reused_images, total or reused_images), desc=desc, unit="img", disable=not progress,
    dynamic_ncols=True, file=sys.stderr,
  ) as bar:  # fmt: skip
    stream = images.iterate(start)
    k = len(store.done)
    while True:
      chunk = [
        (start + i, name, src, prompt) for i, (name, src, prompt) in enumerate(itertools.islice(stream, chunk_size))
      ]
      if not chunk:
        break
      skips: list = []
      decoded = _decode(chunk, skips, need_prompt=need_prompt)
      arrays = extractor(decoded, skips)
      store.save(k, start, start + len(chunk), arrays, skips)
      for what, why in skips:
        skipped.add(what, why)
      result.add(arrays, fid)
      store.computed += 1
      store.computed_images += len(chunk)
      bar.update(len(chunk))
      check_stop()
      start += len(chunk)
      k += 1
  return result


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
  chunk_size: int | None = None,
  work: WorkDir | None = None,
  progress: bool = True,
  report: dict | None = None,
) -> dict:
  """The `wanted` metrics (fid, is, kid, clip, aesthetic, hps) of one image set: `items` are (image, prompt or
  None) pairs, or an `ImageSet` (e.g. `shard_set`); fid/kid compare with `reference` (images, or saved statistics for
  fid) through the `inception` model; clip uses `clip_checkpoint` (CLIP preprocessing), hps `hps_checkpoint` (the
  paper's pad preprocessing), aesthetic the LAION head `aesthetic_mlp` on `clip_checkpoint`. clip and hps come on
  both scales (`cosine_scales`: result["clip"] / result["hps"] = {"cosine", "x100", ...}; "clip_score" / "hps_mean"
  are their x100 values, the keys of before). Unreadable images are skipped into `skipped`.

  The images stream through in chunks of `chunk_size` (default `default_chunk_size(batch_size)`), each decoded once
  for every metric (`chunked_pass`); with a `work` folder every finished chunk is saved there and a run resumed
  from it (`WorkDir(..., resume=True)`) reads them back, so its numbers are the ones an uninterrupted run gives: the
  FID statistics are float64 sums updated chunk by chunk in order, IS and KID see the same features in input
  order. What decides the chunks (the image list, chunk and batch size, resize, the Inception's sha256, the
  checkpoints' identity, which extractors run) must match on resume (`ResumeError`, an InputError); the IS / KID
  options may change. `report`, when given, receives {"num_images": readable images, "sets": {name: {"reused",
  "computed", "computed_images"}}}.
  Raises ValueError for a missing input a metric needs (InputError, one of them, for bad input files: a statistics
  reference is validated before the Inception pass)."""
  wanted = set(wanted)
  result: dict = {}
  if "kid" in wanted and reference is not None and str(reference).endswith(".npz"):
    raise InputError(f"{reference}: kid needs reference images (their features), not saved statistics")
  saved = None  # a statistics reference, read (and validated) now rather than after the pass over every image
  if {"fid"} & wanted and reference is not None and str(reference).endswith(".npz"):
    saved = load_stats(reference, dim=POOL3_DIM)
  images = items if isinstance(items, ImageSet) else image_set(items)
  if {"clip", "hps"} & wanted and not isinstance(items, ImageSet):
    missing = [src for src, prompt in items if prompt is None]
    if missing:
      raise InputError(
        f"clip/hps need a prompt per image: give the images as a JSONL of {{image, prompt}} rows "
        f"({len(missing)} images have none, e.g. {missing[0]})"
      )
  use_inception = bool({"fid", "is", "kid"} & wanted)
  if use_inception and inception is None:
    raise ValueError("fid / is / kid need the Inception model")
  if {"fid", "kid"} & wanted and reference is None:
    raise InputError("fid and kid need a reference (images, or saved statistics for fid)")
  for metric, ckpt in (("clip", clip_checkpoint), ("hps", hps_checkpoint)):
    if metric in wanted and not ckpt:
      raise ValueError(f"the {metric} metric needs a checkpoint")
  if "aesthetic" in wanted and not (aesthetic_mlp and clip_checkpoint):
    raise ValueError("the aesthetic metric needs the aesthetic head and a CLIP ViT-L/14 checkpoint")
  chunk_size = chunk_size or default_chunk_size(batch_size)
  identities: dict = {}
  ident = functools.partial(_identity_cached, cache=identities) if work is not None else (lambda p: None)

  def store(name: str, image_list: ImageSet, *, inception_on: bool, metrics=frozenset()) -> ChunkStore:
    """The set's chunk store, with what decides a chunk's contents: a resumed run must have the same (checked
    here, before any model is loaded: `ResumeError` naming what differs)."""
    settings = {
      "format": CHUNK_FORMAT,
      "set": name,
      "image_list": image_list.identity,
      "chunk_size": chunk_size,
      "batch_size": batch_size,
      "inception_sha256": inception_sha256 if inception_on else None,
      "resize": resize if inception_on else None,
      "clip_checkpoint": ident(clip_checkpoint) if {"clip", "aesthetic"} & metrics else None,
      "hps_checkpoint": ident(hps_checkpoint) if "hps" in metrics else None,
      "aesthetic_mlp": ident(aesthetic_mlp) if "aesthetic" in metrics else None,
    }
    return work.store(name, settings) if work is not None else ChunkStore(name, settings)

  image_store = store("images", images, inception_on=use_inception, metrics=wanted)
  ref_set = ref_store = None
  if use_inception and {"fid", "kid"} & wanted and saved is None:
    ref_set = image_set(list_images(reference, skipped, allow_outside=allow_outside), str(reference))
    ref_store = store("reference", ref_set, inception_on=True)

  def one_set(name, image_list, store, extractor, keep, fid):
    run = chunked_pass(
      image_list, extractor, skipped, chunk_size=chunk_size, store=store, fid=fid, keep=keep, desc=name,
      progress=progress, need_prompt=bool(extractor.scorers),
    )  # fmt: skip
    if report is not None:
      report.setdefault("sets", {})[name] = {
        "reused": store.reused,
        "computed": store.computed,
        "computed_images": store.computed_images,
      }
    return run

  scorers = {
    metric: Scorer.from_checkpoint(ckpt, preprocess=mode)
    for metric, ckpt, mode in (("clip", clip_checkpoint, "clip"), ("hps", hps_checkpoint, "pad"))
    if metric in wanted
  }
  aesthetic = AestheticScorer.from_checkpoint(aesthetic_mlp, clip_checkpoint) if "aesthetic" in wanted else None
  keep = [k for m, k in (("is", "logits_unbiased"), ("kid", "pool3")) if m in wanted] + [*scorers]
  keep += ["aesthetic"] if aesthetic is not None else []
  extractor = ChunkExtractor(
    inception=inception if use_inception else None, resize=resize, batch_size=batch_size, scorers=scorers,
    aesthetic=aesthetic,
  )  # fmt: skip
  run = one_set("images", images, image_store, extractor, keep, "fid" in wanted)
  if report is not None:
    report["num_images"] = run.count
  if use_inception:
    result["num_images"] = run.count
    result["resize"] = resize
    if "is" in wanted:
      result["is_mean"], result["is_std"] = inception_score(run.kept("logits_unbiased"), splits=is_splits)
    if {"fid", "kid"} & wanted:
      if "fid" in wanted and run.count < 2:
        raise InputError(f"{images.label}: fewer than two readable images (FID needs a covariance)")
      if saved is not None:
        (mu_r, sigma_r), ref = saved, None
        check_stats_meta(reference, resize=resize, inception_sha256=inception_sha256)
      else:
        ref_extractor = ChunkExtractor(inception=inception, resize=resize, batch_size=batch_size)
        ref_keep = ["pool3"] if "kid" in wanted else []
        ref = one_set("reference", ref_set, ref_store, ref_extractor, ref_keep, "fid" in wanted)
        if ref.count < 2:
          raise InputError(f"{reference}: fewer than two readable images")
        mu_r, sigma_r = ref.stats.mu_sigma() if "fid" in wanted else (None, None)
      result["reference"] = str(reference)
      if "fid" in wanted:
        mu, sigma = run.stats.mu_sigma()
        result["fid"] = frechet_distance(mu, sigma, mu_r, sigma_r)
      if "kid" in wanted:
        result["kid_mean"], result["kid_std"] = kernel_inception_distance(
          run.kept("pool3"), ref.kept("pool3"), subsets=kid_subsets, subset_size=kid_subset_size
        )
  for metric in scorers:
    cos = run.kept(metric)
    if not cos.size:
      raise InputError(f"{metric}: no readable image to score")
    result[metric] = cosine_scales(cos, clamp=metric == "clip")
    # the keys of before, kept for compatibility: CLIP score and mean HPS, both x100
    result["clip_score" if metric == "clip" else "hps_mean"] = result[metric]["x100"]
  if aesthetic is not None:
    vals = run.kept("aesthetic")
    if not vals.size:
      raise InputError("aesthetic: no readable image to score")
    result["aesthetic_mean"] = float(np.mean(vals))
  return result


def _identity_cached(path, cache: dict):
  if path not in cache:
    cache[path] = checkpoint_identity(path)
  return cache[path]
