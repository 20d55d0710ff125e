"""LoRA adaptation of Stable Diffusion on HPS-labelled images (paper Sec. 5, `hps-jax train-lora`).

The UNet gets LoRA adapters (hps_jax.lora); the VAE, the text encoder and every base UNet weight stay frozen. Each
step: VAE posterior sample of the image (or its cached moments), DDPM noise at a uniform random timestep, the
denoiser's regression target (epsilon for SD 1.x), mean squared error, optionally min-SNR-gamma weighted. All
randomness of an example (latent sample, noise, timestep, crop) comes from a per-example seed the data pipeline
derives from (config seed, position in the global stream): a resumed run, or a run on another number of processes,
sees exactly the same examples and noise.

Training runs in the generic loop (hps_jax.train_loop: sharded AOT step, orbax checkpoints with the Grain iterator,
resume, NaN stop, metrics). The export is `WORKDIR/export/pytorch_lora_weights.safetensors` in today's
diffusers / PEFT layout (diffusers' `load_lora_weights` and `hps-jax sample --lora` read it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image
from tqdm import tqdm

from hps_jax import lora
from hps_jax.adapt.label import read_manifest as read
from hps_jax.convert.diffusers import load_text_encoder, load_unet, load_vae
from hps_jax.data import pipeline
from hps_jax.data import webdataset as wds
from hps_jax.data.images import ImageError, load_image
from hps_jax.data.skips import Skips
from hps_jax.data.synthetic import SyntheticPreference, write_lora_manifest
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.diffusion import schedulers as sch
from hps_jax.diffusion.tiny import TINY_UNET, write_tiny_sd
from hps_jax.errors import InputError
from hps_jax.files import atomic_write
from hps_jax.lora import save_peft
from hps_jax.models.dtypes import as_dtype
from hps_jax.models.unet import UNet2DConditionModel, UNetConfig
from hps_jax.train_loop import Task, TrainResult, train

CONTEXT_LENGTH = 77


class SDTrainModel(nnx.Module):
  """The three SD networks as one module for the train loop; only the UNet's LoRA adapters train."""

  def __init__(self, unet, vae, text_encoder):
    self.unet, self.vae, self.text_encoder = unet, vae, text_encoder


# ------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------
def base_model_dir(config, workdir) -> Path:
  """The diffusers-layout folder the run adapts (tiny: written once to WORKDIR/base_model)."""
  m = config.model
  if m.init == "tiny":
    d = Path(workdir) / "base_model"
    if not (d / "model_index.json").exists():
      if jax.process_index() == 0:
        write_tiny_sd(d, seed=config.seed)
    return d
  if m.init != "pretrained":
    raise ValueError(f"model.init must be 'pretrained' or 'tiny', got {m.init!r}")
  if not m.dir:
    raise ValueError("model.init='pretrained' needs --config.model.dir=PATH (a diffusers-layout SD v1.x folder)")
  d = Path(m.dir)
  if not (d / "unet").is_dir():
    raise ValueError(f"{d}: not a diffusers-layout Stable Diffusion folder (no unet/)")
  return d


def lora_config(config) -> lora.LoRAConfig:
  lc = config.lora
  return lora.LoRAConfig(
    rank=int(lc.rank), alpha=float(lc.alpha) or None, init=lc.init, targets=lc.targets, seed=int(config.seed)
  )


def build_model(config, model_dir):
  """(SDTrainModel with LoRA'd UNet, tokenizer, scheduler config)."""

  dtype = as_dtype(config.model.dtype)
  d = Path(model_dir)
  unet = load_unet(d, dtype=dtype, remat=bool(config.model.remat))
  lora.apply_lora(unet, lora_config(config))
  model = SDTrainModel(unet, load_vae(d, dtype=dtype), load_text_encoder(d / "text_encoder", dtype=dtype))
  return (
    model,
    CLIPTokenizer.from_hf_dir(d / "tokenizer"),
    sch.SchedulerConfig.from_json(d / "scheduler" / "scheduler_config.json"),
  )


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------
def read_manifest(path, *, allow_outside: bool = False) -> list[dict]:
  """`hps-jax label`'s manifest rows, image paths resolved against its folder; a malformed row, or a relative
  image path that leaves the manifest's folder (unless `allow_outside`, `--allow-outside-paths`; absolute paths
  are taken as written), raises InputError naming the line."""

  p = Path(path)
  if not p.is_file():
    raise InputError(f"{p}: no such manifest (write one with `hps-jax label`)")
  rows = read(p, allow_outside=allow_outside)
  if not rows:
    raise InputError(f"{p}: the manifest has no rows")
  return rows


def manifest_path(config, workdir) -> Path:
  d = config.data
  if d.manifest:
    return Path(d.manifest)
  if d.synthetic_size > 0:
    out = Path(workdir) / "synthetic_data"
    if not (out / "manifest.jsonl").exists() and jax.process_index() == 0:
      write_lora_manifest(
        SyntheticPreference(d.synthetic_size, seed=config.seed, split="lora", image_size=d.resolution), out
      )
    return out / "manifest.jsonl"
  raise ValueError("no training data: set --config.data.manifest=MANIFEST.jsonl (from `hps-jax label`)")


def crop_and_scale(image: np.ndarray, resolution: int, rng: np.random.Generator | None, flip: bool) -> np.ndarray:
  """uint8 (H, W, 3) -> float32 (R, R, 3) in [-1, 1]: shorter side resized to R (bicubic), then a random crop
  (with `rng`) or the center crop, optional random horizontal flip."""

  h, w = image.shape[:2]
  s = resolution / min(h, w)
  nh, nw = max(resolution, round(h * s)), max(resolution, round(w * s))
  if (nh, nw) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  if rng is None:
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
  else:
    top, left = int(rng.integers(nh - resolution + 1)), int(rng.integers(nw - resolution + 1))
  image = image[top : top + resolution, left : left + resolution]
  if flip and rng is not None and rng.random() < 0.5:
    image = image[:, ::-1]
  return image.astype(np.float32) / 127.5 - 1.0


@dataclasses.dataclass(frozen=True)
class ExampleTransform:
  """(manifest row, rng) -> {pixels (R,R,3) f32 in [-1,1], ids (77,) i32, seed u32}; or, over a cached source
  ({moments, context}), -> {moments, context, seed}."""

  tokenizer: object
  resolution: int
  random_crop: bool = True
  random_flip: bool = False

  def __call__(self, row, rng: np.random.Generator) -> dict:
    seed = np.uint32(rng.integers(0, 2**32, dtype=np.uint64))
    if "moments" in row:
      return {"moments": row["moments"], "context": row["context"], "seed": seed}
    return {**self.encode_row(row, rng if self.random_crop else None, self.random_flip), "seed": seed}

  def encode_row(self, row, rng=None, flip=False) -> dict:

    try:
      image = load_image(row["image"])
    except ImageError as e:
      raise ImageError(f"manifest image {row['image']}", e.message) from e
    ids = np.asarray(self.tokenizer([row["caption"]], context_length=CONTEXT_LENGTH)[0], np.int32)
    return {"pixels": crop_and_scale(image, self.resolution, rng, flip), "ids": ids}


class CachedSource:
  """Random-access {moments, context} per manifest row (VAE posterior mean ‖ logvar, text encoder output)."""

  def __init__(self, moments: np.ndarray, context: np.ndarray):
    self.moments, self.context = moments, context

  def __len__(self):
    return len(self.moments)

  def __getitem__(self, i):
    return {"moments": self.moments[i], "context": self.context[i]}


def build_cache(
  model: SDTrainModel, rows, transform: ExampleTransform, path: Path, batch_size: int = 8
) -> CachedSource:
  """Encodes every row once (center crop) and stores the result in `path` (.npz); a later run (or a resume)
  reuses the file when it covers the same rows."""
  key = json.dumps([[r["image"], r["caption"]] for r in rows] + [transform.resolution])
  if path.exists():
    cached = _load_cache(path, key, len(rows))
    if cached is not None:
      return cached
  graphdef, state = nnx.split((model.vae, model.text_encoder))

  @jax.jit
  def encode(state, pixels, ids):
    vae, text = nnx.merge(graphdef, state)
    mean, logvar = vae.encode(pixels)
    return jnp.concatenate([mean, logvar], -1).astype(jnp.float32), text(ids).astype(jnp.float32)

  moments, context = [], []
  for start in tqdm(
    range(0, len(rows), batch_size), desc="caching latents", unit="batch", disable=jax.process_index() != 0
  ):
    ex = [transform.encode_row(r) for r in rows[start : start + batch_size]]
    m, c = encode(state, np.stack([e["pixels"] for e in ex]), np.stack([e["ids"] for e in ex]))
    moments.append(np.asarray(m))
    context.append(np.asarray(c))
  cache = CachedSource(np.concatenate(moments), np.concatenate(context))
  if jax.process_index() == 0:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, moments=cache.moments, context=cache.context, key=np.asarray(key))
    tmp.replace(path)
  return cache


def _load_cache(path: Path, key: str, n: int) -> CachedSource | None:
  """The cache in `path` when it holds these rows (None when it holds others: it is rebuilt). Arrays only, never
  pickled objects; a file that is not such a cache raises InputError naming it."""
  errors = (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError)
  try:
    z = np.load(path, allow_pickle=False)
  except errors as e:
    raise InputError(f"{path}: not a readable latent cache ({e}); delete it to rebuild it") from e
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise InputError(f"{path}: not a latent cache (a .npy array, expected an .npz); delete it to rebuild it")
  try:
    with z:
      if not {"key", "moments", "context"} <= set(z.files):
        raise ValueError(f"arrays {sorted(z.files)[:5]}, expected key, moments and context")
      if z.zip.getinfo("key.npy").file_size > 4 * len(key) + 4096:
        return None  # a longer key than these rows' (and never loaded whole)
      stored = z["key"]
      if stored.dtype.kind != "U" or stored.ndim != 0 or str(stored) != key:
        return None
      moments, context = z["moments"], z["context"]
  except errors as e:
    raise InputError(f"{path}: not a readable latent cache ({e}); delete it to rebuild it") from e
  if (
    moments.dtype != np.float32 or context.dtype != np.float32 or moments.shape[:1] != (n,) or context.shape[:1] != (n,)
  ):
    raise InputError(
      f"{path}: not a readable latent cache (float32 moments and context of {n} rows expected, got "
      f"{moments.dtype} {moments.shape} and {context.dtype} {context.shape}); delete it to rebuild it"
    )
  return CachedSource(moments, context)


# ------------------------------------------------------------------------------------------------------------
# loss
# ------------------------------------------------------------------------------------------------------------
def example_keys(seeds) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-example (latent sample, noise, timestep) keys from uint32 seeds."""
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(seeds)
  return keys[:, 0], keys[:, 1], keys[:, 2]


def snr(config: sch.SchedulerConfig, timesteps) -> jax.Array:
  ac = jnp.asarray(sch.alphas_cumprod(config), jnp.float32)[timesteps]
  return ac / (1.0 - ac)


def diffusion_loss(model: SDTrainModel, batch: dict, sched: sch.SchedulerConfig, min_snr_gamma: float = 0.0):
  """Mean (optionally min-SNR weighted) squared error of the UNet's prediction against the DDPM target."""
  k_lat, k_noise, k_t = example_keys(batch["seed"])
  if "moments" in batch:
    mean, logvar = jnp.split(batch["moments"], 2, axis=-1)
    context = batch["context"]
  else:
    mean, logvar = model.vae.encode(batch["pixels"])
    context = model.text_encoder(batch["ids"])
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  eps = jax.vmap(lambda k: jax.random.normal(k, mean.shape[1:], jnp.float32))(k_lat)
  z = mean + jnp.exp(0.5 * logvar) * eps
  vcfg = model.vae.config
  if vcfg.shift_factor is not None:
    z = z - vcfg.shift_factor
  latents = jax.lax.stop_gradient(z * vcfg.scaling_factor)
  context = jax.lax.stop_gradient(context)
  noise = jax.vmap(lambda k: jax.random.normal(k, latents.shape[1:], jnp.float32))(k_noise)
  t = jax.vmap(lambda k: jax.random.randint(k, (), 0, sched.num_train_timesteps))(k_t)
  noisy = sch.add_noise(sched, latents, noise, t)
  target = sch.training_target(sched, latents, noise, t)
  pred = model.unet(noisy, t, context).astype(jnp.float32)
  per_example = jnp.mean((pred - target) ** 2, axis=(1, 2, 3))
  weights = jnp.ones_like(per_example)
  if min_snr_gamma > 0:
    s = snr(sched, t)
    clipped = jnp.minimum(s, min_snr_gamma)
    weights = clipped / (s + 1.0) if sched.prediction_type == "v_prediction" else clipped / s
  loss = jnp.mean(weights * per_example)
  return loss, {
    "mse": jnp.mean(per_example),
    "timestep_mean": jnp.mean(t.astype(jnp.float32)),
  }


def regularization_rows(config, workdir) -> list[dict]:
  """Regularization images from webdataset shards (`config.data.regularization`: a .tar, a folder of .tar files or
  a brace pattern; the paper used LAION images of aesthetic score >= 6.5) as manifest rows `{image, caption,
  kind: "regularization"}`, appended after the manifest's own rows. The samples (the first
  `data.regularization_limit` usable ones, 0 = all) are decoded once and their original bytes written to
  WORKDIR/regularization/images/NNNNNNNN.EXT (atomically) with an index, rows.jsonl, reused while the shards and
  the limit are the same. A sample without a caption or whose image does not decode is skipped and named on
  stderr; shards that name no usable sample raise InputError. Every process writes the same bytes to the same
  names, so processes sharing a workdir need no coordination."""
  spec = str(config.data.get("regularization", "") or "")
  if not spec:
    return []
  limit = int(config.data.get("regularization_limit", 0))
  if limit < 0:
    raise ValueError(f"data.regularization_limit must be >= 0 (0 = every sample), got {limit}")
  shards = wds.expand_shards(spec)
  out = Path(workdir) / "regularization"
  index = out / "rows.jsonl"
  header = {"shards": [str(Path(x).resolve()) for x in shards], "limit": limit}
  if index.is_file():
    lines = index.read_text(encoding="utf-8").splitlines()
    with contextlib.suppress(ValueError, IndexError):
      if json.loads(lines[0]) == header:
        rows = [json.loads(line) for line in lines[1:]]
        return [{**r, "image": str(out / r["image"]), "kind": "regularization"} for r in rows]
  skips = Skips()
  rows = []
  for sample in wds.iter_samples(shards, skips):
    where = f"{sample.shard}:{sample.key}.{sample.ext}"
    if sample.caption is None:
      skips.add(where, "no caption (.txt member)")
      continue
    try:
      load_image(sample.image)
    except ImageError as e:
      skips.add(where, e.message)
      continue
    name = f"images/{len(rows):08d}.{sample.ext}"
    target = out / name
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(target, "wb") as f:
      f.write(sample.image)
    rows.append({"image": name, "caption": sample.caption})
    if limit and len(rows) == limit:
      break
  for what, why in skips.items:
    print(f"train-lora: regularization: skipped {what}: {why}", file=sys.stderr)
  if not rows:
    raise InputError(f"{spec}: no usable regularization sample (image + .txt caption) in {len(shards)} shard(s)")
  with atomic_write(index) as f:
    f.write(json.dumps(header) + "\n")
    for r in rows:
      f.write(json.dumps(r, ensure_ascii=False) + "\n")
  print(
    f"train-lora: {len(rows)} regularization images from {len(shards)} shard(s), {len(skips.items)} skipped",
    file=sys.stderr,
  )
  return [{**r, "image": str(out / r["image"]), "kind": "regularization"} for r in rows]


# ------------------------------------------------------------------------------------------------------------
# task
# ------------------------------------------------------------------------------------------------------------
def build_task(config, workdir) -> Task:
  workdir = Path(workdir)
  model_dir = base_model_dir(config, workdir)
  allow_outside = bool(config.data.get("allow_outside_paths", False))  # --allow-outside-paths
  rows = read_manifest(manifest_path(config, workdir), allow_outside=allow_outside)
  rows += regularization_rows(config, workdir)
  model, tokenizer, sched = build_model(config, model_dir)
  d = config.data
  transform = ExampleTransform(tokenizer, int(d.resolution), bool(d.random_crop), bool(d.random_flip))
  source = build_cache(model, rows, transform, workdir / "latent_cache.npz") if d.cache else rows
  b, total = int(config.batch_size), int(config.num_steps)
  if total <= 0:
    raise ValueError(f"num_steps must be > 0, got {total}")
  epochs = -(-total * b // len(source))

  def make_iterator():
    ds = pipeline.train_dataset(
      source, transform, global_batch_size=b, seed=config.seed, num_epochs=epochs, random=True
    )
    return pipeline.to_iterator(ds, prefetch_threads=d.prefetch_threads)

  # one example fixes the batch's shapes (the loop adds the batch axis)
  example = transform(source[0], np.random.default_rng(0))
  gamma = float(config.loss.min_snr_gamma)
  loss_fn = lambda model, batch: diffusion_loss(model, batch, sched, gamma)  # noqa: E731

  evaluate = None
  if d.eval_examples > 0:
    held = [transform.encode_row(r) for r in rows[: d.eval_examples]]
    eval_batch = {
      "pixels": np.stack([e["pixels"] for e in held]),
      "ids": np.stack([e["ids"] for e in held]),
      "seed": np.arange(len(held), dtype=np.uint32),
    }  # fixed noise: comparable across evaluations
    eval_loss = nnx.jit(lambda m, bt: diffusion_loss(m, bt, sched, gamma)[0])

    def evaluate(model):
      return {"loss": float(eval_loss(model, eval_batch))}

  def export(model, directory):

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = save_peft(model.unet, directory / "pytorch_lora_weights.safetensors")
    (directory / "lora_config.json").write_text(
      json.dumps({"base_model": str(model_dir), **dataclasses.asdict(lora_config(config))}, indent=2)
    )
    return out

  return Task(
    model=model,
    trainable=lora.LORA,
    loss_fn=loss_fn,
    make_iterator=make_iterator,
    example=example,
    checksum_key="seed",
    evaluate=evaluate,
    export=export,
  )


def run(config, workdir) -> TrainResult:
  return train(build_task(config, workdir), config, workdir)


def adapter_counts(config, workdir) -> dict:
  """LoRA layers and adapter parameters of the configured UNet, on abstract shapes (no weights are read)."""
  if config.model.init == "tiny":
    ucfg = TINY_UNET
  else:
    ucfg = UNetConfig.from_diffusers(json.loads((base_model_dir(config, workdir) / "unet" / "config.json").read_text()))
  unet = nnx.eval_shape(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0)))
  paths = lora.apply_lora(unet, lora_config(config))
  return {"lora_layers": len(paths), "lora_params": lora.count_lora_params(unet)}
