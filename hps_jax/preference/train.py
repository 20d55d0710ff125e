"""Training and evaluating the preference classifier (the HPS model) from an ml_collections config
(`configs/hps_classifier.py`): model, data, loss and evaluation wired into the generic `hps_jax.train_loop`.

The trained model is exported to WORKDIR/export as a Hugging Face CLIPModel dir (config.json + safetensors), which
`Scorer.from_checkpoint` and every CLIP tool load.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from hps_jax import parallel
from hps_jax.convert.clip import build_model as build_from_params
from hps_jax.convert.clip import load_clip_params, save_hf
from hps_jax.data import pipeline
from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.sources import limit, open_source
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.models.clip import CLIP, CLIPConfig
from hps_jax.models.dtypes import as_dtype
from hps_jax.preference.evaluate import evaluate_clip
from hps_jax.preference.loss import preference_loss
from hps_jax.preference.scorer import resolve_tokenizer
from hps_jax.train_loop import Task, TrainResult, count_params, make_optimizer, regex_filter, train


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


def make_transform(config, model_cfg: CLIPConfig, tokenizer) -> pipeline.RecordTransform:
  pre = PreprocessConfig(mode=config.data.preprocess, size=model_cfg.image_size, fill=config.data.fill)
  return pipeline.RecordTransform(
    tokenizer, pre, max_images=config.data.max_images, context_length=model_cfg.context_length
  )


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------
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

  # one example fixes the batch's shapes (the loop adds the batch axis); ranks stay on the host
  example = {k: v for k, v in transform(train_src[0]).items() if k in ("pixels", "ids", "mask", "chosen")}

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
    loss_fn=preference_loss,
    make_iterator=make_iterator,
    example=example,
    checksum_key="ids",
    evaluate=evaluate,
    export=export,
  )


def export_model(model: CLIP, directory, tokenizer_source=None) -> Path:
  """Writes an HF CLIPModel dir; copies the HF tokenizer files when the model came with them."""

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

  mcfg = config.model
  if mcfg.init == "checkpoint" and mcfg.checkpoint:
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
