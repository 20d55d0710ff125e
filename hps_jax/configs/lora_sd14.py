"""LoRA adaptation of Stable Diffusion v1.4 on HPS-labelled images: `--config lora_sd14:{tiny,paper}` (or the
file's path, configs/lora_sd14.py:tiny).

  tiny   offline: a tiny random-init SD (written to WORKDIR/base_model) trained on a synthetic labelled set; rank 4,
         32x32 images, 200 steps; a couple of minutes on 2 CPU cores.
  paper  the paper's recipe: SD v1.4 in diffusers layout (--config.model.dir), LoRA rank 32 (the released adapter
         used rank 4) on to_q/to_k/to_v/to_out.0 of every attn1/attn2, AdamW lr 1e-5 constant, weight decay 1e-2,
         gradient clipping 1.0, batch 40, 10k steps, random 512 crops, on the manifest `hps-jax label` wrote
         (--config.data.manifest).

Override anything with --config.key=value, e.g. --config.lora.rank=4 --config.data.cache=True.
"""

import ml_collections

from hps_jax.configs import common
from hps_jax.lora import DEFAULT_TARGETS

PRESETS = ("tiny", "paper")


def base():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.init = "pretrained"  # pretrained (model.dir) | tiny (random, written to WORKDIR/base_model)
  c.model.dir = ""  # diffusers-layout SD folder: unet/ vae/ text_encoder/ tokenizer/ scheduler/
  c.model.dtype = "bfloat16"  # compute dtype of the frozen base (adapters are float32)
  c.model.remat = False  # recompute UNet blocks in the backward pass (memory for compute)

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 32
  c.lora.alpha = 0.0  # 0 = rank (scale 1, the diffusers / HPS v1 convention)
  c.lora.init = "kaiming"  # kaiming (PEFT) | normal (std 1/rank)
  c.lora.targets = DEFAULT_TARGETS  # regex on layer paths

  c.data = ml_collections.ConfigDict()
  c.data.manifest = ""  # hps-jax label output: {image, caption, kind} rows
  c.data.resolution = 512
  c.data.random_crop = True  # False: center crop
  c.data.random_flip = False
  c.data.cache = False  # precompute VAE posteriors + text embeddings once (center crop, no flip)
  c.data.prefetch_threads = 4
  c.data.synthetic_size = 0  # > 0 and no manifest: a synthetic labelled set of this many prompts
  c.data.allow_outside_paths = False  # True: manifest rows' relative image paths may leave its folder ('..')
  c.data.eval_examples = 0  # > 0: held-out loss on the manifest's first N rows (fixed noise) at eval
  # regularization images from webdataset shards, added to the manifest's rows (which may already hold the ones
  # `hps-jax label --regularization` put there): a .tar, a folder of .tar files or a brace pattern; "" = none
  c.data.regularization = ""
  c.data.regularization_limit = 0  # > 0: only the first N usable samples of the shards

  c.loss = ml_collections.ConfigDict()
  c.loss.min_snr_gamma = 0.0  # > 0: min-SNR-gamma loss weighting (5.0 is the usual choice)

  c.batch_size = 40
  c.num_steps = 10_000

  c.optim = common.optimizer(1e-5, 1e-2, "constant", grad_clip=1.0)
  common.mesh_and_rules(c)
  common.cadence(c, log_every=50, checkpoint_every=1000)
  return c


def get_config(arg: str = "tiny"):
  c = base()
  if arg == "paper":
    return c
  if arg == "tiny":
    c.model.init = "tiny"
    c.model.dtype = "float32"
    c.lora.rank = 4
    c.data.resolution = 32
    c.data.synthetic_size = 16
    c.data.prefetch_threads = 2
    c.batch_size = 8
    c.num_steps = 200
    c.optim.lr = 1e-3
    c.log_every = 10
    c.checkpoint_every = 50
    return c
  raise ValueError(f"unknown preset {arg!r}; choose from {', '.join(PRESETS)}")
