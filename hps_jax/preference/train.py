"""Training and evaluating the preference classifier (the HPS model) from an ml_collections config
(`configs/hps_classifier.py`): model, data, loss and evaluation wired into the generic `hps_jax.train_loop`.

The trained model is exported to WORKDIR/export as a Hugging Face CLIPModel dir (config.json + safetensors), which
`Scorer.from_checkpoint` and every CLIP tool load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax import parallel
from hps_jax.data import pipeline
from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.models.clip import CLIP, CLIPConfig, normalize
from hps_jax.preference.evaluate import preference_report
from hps_jax.preference.loss import preference_loss, prompt_image_cosines
from hps_jax.preference.scorer import as_dtype, resolve_tokenizer
from hps_jax.train_loop import Task, TrainResult, regex_filter, train


# ------------------------------------------------------------------------------------------------------------
# model, tokenizer, data
# ------------------------------------------------------------------------------------------------------------
def build_model(mcfg, seed: int = 0) -> CLIP:
  """A CLIP from the config's `model` section: random init of a preset, or a checkpoint in any supported format."""
  dtype, param_dtype = as_dtype(mcfg.dtype), as_dtype(mcfg.param_dtype)
  extra = {"remat": bool(mcfg.get("remat", False)), "attention_backend": mcfg.get("attention_backend", "auto")}
  if mcfg.init == "random":
    cfg = CLIPConfig.preset(mcfg.preset, **extra)
    if mcfg.get("activation"):
      cfg = cfg.replace(activation=mcfg.activation)
    return CLIP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(seed))
  if mcfg.init == "checkpoint":
    if not mcfg.checkpoint:
      raise ValueError("model.init='checkpoint' needs --config.model.checkpoint=PATH (an HPS/CLIP checkpoint)")
    from hps_jax.convert.clip import build_model as build_from_params
    from hps_jax.convert.clip import load_clip_params

    cfg, flat = load_clip_params(mcfg.checkpoint, mcfg.format, activation=mcfg.get("activation") or None)
    return build_from_params(
      cfg.replace(**extra), flat, dtype=dtype, param_dtype=param_dtype, source=str(mcfg.checkpoint)
    )
  raise ValueError(f"model.init must be 'random' or 'checkpoint', got {mcfg.init!r}")


def build_tokenizer(config) -> CLIPTokenizer:
  ckpt = config.model.checkpoint if config.model.init == "checkpoint" else None
  return resolve_tokenizer(config.data.tokenizer or None, ckpt)


def build_source(config, split: str, workdir=None):
  """A random-access source of preference records for `split` ('train' / 'test' / ...)."""
  d = config.data
  data_dir = d.data_dir or (str(Path(workdir) / "tfds") if workdir else "")
  size = d.synthetic_train_size if split == d.train_split else d.synthetic_eval_size
  return open_source(
    d.dataset,
    split,
    manual_dir=d.manual_dir,
    data_dir=data_dir,
    builder_config=d.builder_config,
    seed=config.seed,
    synthetic_size=size,
    synthetic_image_size=d.synthetic_image_size,
  )


DATASETS = ("hpd_v1", "hpd_v2", "pickapic", "preference_jsonl")  # TFDS builders in hps_jax.data.datasets


def open_source(
  dataset: str,
  split: str,
  *,
  manual_dir: str = "",
  data_dir: str = "",
  builder_config: str = "",
  seed: int = 0,
  synthetic_size: int = 200,
  synthetic_image_size: int = 48,
):
  """`synthetic` (generated on the fly; the split name seeds it) or a TFDS builder prepared from `manual_dir`."""
  if dataset == "synthetic":
    from hps_jax.data.synthetic import SyntheticPreference

    return SyntheticPreference(synthetic_size, seed=seed, split=split, image_size=synthetic_image_size)
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}: synthetic or one of {sorted(DATASETS)}")
  try:
    from hps_jax.data.datasets import data_source
  except ImportError as e:
    raise ValueError(f"dataset {dataset!r} is read through TFDS: pip install 'hps_jax[data]' ({e})") from e
  if not manual_dir:
    raise ValueError(f"dataset {dataset!r} needs its local download directory (manual_dir)")
  return data_source(dataset, split, manual_dir, data_dir or str(Path(manual_dir) / "tfds_prepared"), builder_config)


def make_transform(config, model_cfg: CLIPConfig, tokenizer) -> pipeline.RecordTransform:
  pre = PreprocessConfig(mode=config.data.preprocess, size=model_cfg.image_size, fill=config.data.fill)
  return pipeline.RecordTransform(
    tokenizer, pre, max_images=config.data.max_images, context_length=model_cfg.context_length
  )


def limit(source, n: int):
  """The first n records of a source (n <= 0: all)."""
  if n <= 0 or n >= len(source):
    return source
  return _Prefix(source, n)


class _Prefix:
  def __init__(self, source, n):
    self.source, self.n = source, n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    if not 0 <= i < self.n:
      raise IndexError(i)
    return self.source[i]


# ------------------------------------------------------------------------------------------------------------
# evaluation: per-image scores grouped by prompt -> the Table 2 report
# ------------------------------------------------------------------------------------------------------------
def slot_scores(score_batch: Callable, source, transform, batch_size: int, progress: bool = False):
  """Runs `score_batch(batch) -> (B, K) scores` over the source in order; returns per-prompt (scores, ranks)
  lists of the valid image slots."""
  ds = pipeline.eval_dataset(source, transform, batch_size=batch_size)
  scores, ranks = [], []
  bar = None
  if progress and jax.process_index() == 0:
    from tqdm import tqdm

    bar = tqdm(total=len(source), desc="eval", unit="prompt", dynamic_ncols=True)
  for batch in ds:
    batch, n = pipeline.pad_batch(batch, batch_size)
    s = np.asarray(score_batch(batch))[:n]
    for row in range(n):
      m = batch["mask"][row]
      scores.append(s[row][m])
      ranks.append(batch["ranks"][row][m])
    if bar is not None:
      bar.update(n)
  if bar is not None:
    bar.close()
  return scores, ranks


def _slot_score_fn(model, per_image: Callable, mesh, batch_size: int) -> Callable:
  """batch -> (B, K) scores. `per_image(model, pixels (B,K,S,S,3), ids (B,T)) -> (B, K)`; the batch (the same full
  batch on every process) is sharded over the mesh's batch axes, params keep whatever sharding they have."""
  mesh = mesh if mesh is not None else parallel.local_mesh()
  if batch_size % parallel.batch_divisor(mesh):
    raise ValueError(
      f"eval batch size {batch_size} must be a multiple of the {parallel.batch_divisor(mesh)} batch shards"
    )
  graphdef, state = nnx.split(model)

  @jax.jit
  def fn(state, pixels, ids):
    out = per_image(nnx.merge(graphdef, state), pixels, ids)
    return jax.lax.with_sharding_constraint(out, parallel.replicated(mesh))

  def score(batch):
    pixels, ids = parallel.put_global(mesh, (batch["pixels"], batch["ids"]))
    return fn(state, pixels, ids)

  return score


def clip_score_fn(model: CLIP, mesh=None, batch_size: int = 16) -> Callable:
  """HPS / CLIP: the cosine of each image slot with its prompt."""
  return _slot_score_fn(model, prompt_image_cosines, mesh, batch_size)


def aesthetic_score_fn(clip_model: CLIP, head, mesh=None, batch_size: int = 16) -> Callable:
  """The LAION aesthetic rating of each image slot (the prompt is ignored)."""

  def per_image(models, pixels, ids):
    clip, mlp = models
    b, k = pixels.shape[:2]
    emb = normalize(clip.encode_image(pixels.reshape((b * k,) + pixels.shape[2:])))
    return mlp(emb).reshape(b, k)

  return _slot_score_fn((clip_model, head), per_image, mesh, batch_size)


def evaluate_clip(model: CLIP, source, transform, *, batch_size: int, mesh=None, progress: bool = False) -> dict:
  scores, ranks = slot_scores(clip_score_fn(model, mesh, batch_size), source, transform, batch_size, progress)
  return preference_report(scores, ranks)


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
def loss_with_checksum(model, batch):
  """The choice loss plus a checksum of the batch's token ids, logged so a resumed run's data order can be
  compared with the uninterrupted one's."""
  loss, metrics = preference_loss(model, batch)
  rows = jnp.arange(1, batch["ids"].shape[0] + 1, dtype=jnp.int32)
  metrics["data_checksum"] = jnp.sum(jnp.sum(batch["ids"], axis=1) * rows)
  return loss, metrics


def build_task(config, workdir) -> Task:
  model = build_model(config.model, config.seed)
  mcfg = model.config
  tokenizer = build_tokenizer(config)
  transform = make_transform(config, mcfg, tokenizer)
  train_src = build_source(config, config.data.train_split, workdir)
  num_steps = int(config.num_steps)
  if num_steps < 0:
    num_steps = config.num_epochs * (len(train_src) // config.batch_size)
    config.num_steps = num_steps  # the loop and the LR schedule read it
  if num_steps <= 0:
    raise ValueError(f"no training steps: {len(train_src)} records, batch {config.batch_size}")
  epochs_needed = -(-num_steps * config.batch_size // len(train_src))

  def make_iterator():
    ds = pipeline.train_dataset(
      train_src,
      transform,
      global_batch_size=config.batch_size,
      seed=config.seed,
      num_epochs=max(epochs_needed, config.num_epochs),
    )
    return pipeline.to_iterator(ds, prefetch_threads=config.data.prefetch_threads)

  b, k, s, t = config.batch_size, config.data.max_images, mcfg.image_size, mcfg.context_length
  shapes = {
    "pixels": jax.ShapeDtypeStruct((b, k, s, s, 3), jnp.float32),
    "ids": jax.ShapeDtypeStruct((b, t), jnp.int32),
    "mask": jax.ShapeDtypeStruct((b, k), jnp.bool_),
    "chosen": jax.ShapeDtypeStruct((b,), jnp.int32),
  }

  evaluate = None
  if config.data.eval_split:
    eval_src = limit(build_source(config, config.data.eval_split, workdir), config.data.get("eval_max_prompts", 0))

    def evaluate(model):
      mesh = parallel.make_mesh(**dict(config.mesh))
      rep = evaluate_clip(model, eval_src, transform, batch_size=config.eval_batch_size, mesh=mesh)
      return {
        "accuracy": rep["accuracy"],
        "pairwise_accuracy": rep["pairwise_accuracy"],
        "random_expectation": rep["random_expectation"],
        "num_prompts": rep["num_prompts"],
      }

  def export(model, directory):
    return export_model(
      model,
      directory,
      tokenizer_source=config.data.tokenizer
      or (config.model.checkpoint if config.model.init == "checkpoint" else None),
    )

  return Task(
    model=model,
    trainable=regex_filter(list(config.trainable)),
    loss_fn=loss_with_checksum,
    make_iterator=make_iterator,
    batch_shapes=shapes,
    evaluate=evaluate,
    export=export,
  )


def export_model(model: CLIP, directory, tokenizer_source=None) -> Path:
  """Writes an HF CLIPModel dir; copies the HF tokenizer files when the model came with them."""
  import shutil

  from hps_jax.convert.clip import save_hf

  out = save_hf(model, directory)
  if tokenizer_source and Path(tokenizer_source).is_dir():
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
      if (Path(tokenizer_source) / name).exists():
        shutil.copy(Path(tokenizer_source) / name, Path(out) / name)
  return Path(out)


def run(config, workdir) -> TrainResult:
  return train(build_task(config, workdir), config, workdir)


def parameter_counts(config) -> dict:
  """Trainable / frozen parameter counts and optimizer-state size of the configured model, computed on abstract
  shapes (no weights are read or allocated; a checkpoint-initialized config counts its architecture preset)."""
  from hps_jax.train_loop import count_params, make_optimizer

  mcfg = config.model
  if mcfg.init == "checkpoint" and mcfg.checkpoint:
    from hps_jax.convert.clip import load_clip_params

    cfg = load_clip_params(mcfg.checkpoint, mcfg.format)[0]
  else:
    cfg = CLIPConfig.preset(mcfg.preset)
  model = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
  _, trainable, frozen = nnx.split(model, regex_filter(list(config.trainable)), ...)
  tx, _ = make_optimizer(config.optim, max(int(config.num_steps), 1))
  opt = jax.eval_shape(tx.init, trainable)
  opt_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(opt) if len(x.shape))  # moments, not step counts
  return {
    "trainable": count_params(trainable),
    "frozen": count_params(frozen),
    "optimizer_state": opt_params,
    "architecture": cfg,
  }


def describe_counts(counts: dict) -> str:
  t, f = counts["trainable"], counts["frozen"]
  return (
    f"parameters: {t:,} trainable, {f:,} frozen ({100 * t / (t + f):.1f}% of {t + f:,}); "
    f"optimizer state: {counts['optimizer_state']:,} values (trainable parameters only)"
  )
