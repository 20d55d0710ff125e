"""A tiny random-init Stable Diffusion for offline tests, the demo and the notebooks, written in the diffusers folder
layout (unet/ vae/ text_encoder/ tokenizer/ scheduler/) by our own savers: no PyTorch and no download needed, and
`StableDiffusion.from_pretrained` (or diffusers itself) loads it like a real checkpoint.

Architecture: every SD 1.x block type (CrossAttnDownBlock2D, DownBlock2D, the cross-attention mid block, UpBlock2D,
CrossAttnUpBlock2D) at 32/64 channels, a 3-level VAE (latents 4x smaller than images) and a 2-layer, 32-wide CLIP
text tower over the real CLIP vocabulary. The images it draws are noise; the point is the machinery.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax.convert.diffusers import save_text_encoder, save_unet, save_vae
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.diffusion.schedulers import SchedulerConfig
from hps_jax.models.clip import CLIPConfig, CLIPTextEncoder
from hps_jax.models.unet import UNet2DConditionModel, UNetConfig
from hps_jax.models.vae import AutoencoderKL, VAEConfig

TINY_UNET = UNetConfig(
  sample_size=8,
  block_out_channels=(32, 64),
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
  norm_num_groups=8,
  cross_attention_dim=32,
  attention_head_dim=2,
)
TINY_VAE = VAEConfig(
  block_out_channels=(32, 32, 64),
  down_block_types=("DownEncoderBlock2D",) * 3,
  up_block_types=("UpDecoderBlock2D",) * 3,
  layers_per_block=1,
  norm_num_groups=8,
  sample_size=32,
)
TINY_TEXT = CLIPConfig.tiny(text_width=32, text_layers=2, text_heads=2, text_mlp_dim=64)


def build_tiny_sd(seed: int = 0, *, dtype=jnp.float32):
  """(unet, vae, text_encoder) with random weights, drawn on the host: the modules are built abstractly and every
  parameter filled with numpy (norm scales 1, biases 0, embeddings N(0, 0.02²), other weights N(0, 1/fan_in),
  fan_in = prod(shape[:-1])). Eager `jax.random` init would compile one small XLA program per parameter shape,
  close to a minute on a 2-core CPU for these three models."""

  def build():
    rngs = nnx.Rngs(0)
    return (
      UNet2DConditionModel(TINY_UNET, dtype=dtype, rngs=rngs),
      AutoencoderKL(TINY_VAE, dtype=dtype, rngs=rngs),
      CLIPTextEncoder(TINY_TEXT, dtype=dtype, rngs=rngs),
    )

  models = nnx.eval_shape(build)
  rng = np.random.default_rng(seed)
  graphdef, state = nnx.split(models)
  for path, var in nnx.to_flat_state(state):
    name, shape = str(path[-1]), var.shape
    if name == "scale":
      value = np.ones(shape, np.float32)
    elif name == "bias":
      value = np.zeros(shape, np.float32)
    elif "embedding" in name:
      value = 0.02 * rng.standard_normal(shape, dtype=np.float32)
    else:
      value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(max(1, int(np.prod(shape[:-1])))))
    var.set_value(jnp.asarray(value, var.dtype))
  return nnx.merge(graphdef, state)


def save_sd(out_dir, unet, vae, text_encoder, tokenizer, scheduler: SchedulerConfig | None = None) -> Path:
  """Writes a complete diffusers-layout Stable Diffusion folder from our modules."""

  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  save_unet(unet, out / "unet")
  save_vae(vae, out / "vae")
  save_text_encoder(text_encoder, out / "text_encoder")
  tokenizer.save_hf_dir(out / "tokenizer")
  scheduler = scheduler or SchedulerConfig()
  (out / "scheduler").mkdir(exist_ok=True)
  (out / "scheduler" / "scheduler_config.json").write_text(
    json.dumps({"_class_name": "PNDMScheduler", **scheduler.to_dict()}, indent=2)
  )
  (out / "model_index.json").write_text(
    json.dumps(
      {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
      },
      indent=2,
    )
  )
  return out


def write_tiny_sd(out_dir, seed: int = 0) -> Path:
  """A tiny random-init SD folder at `out_dir` (images of 32x32 make 8x8 latents)."""

  tok = CLIPTokenizer.default()
  tok = CLIPTokenizer(
    tok.vocab,
    [m for m, _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])],
    start_token="<start_of_text>",
    end_token="<end_of_text>",
    pad_id=tok.end_id,
    clean="hf",
  )
  return save_sd(out_dir, *build_tiny_sd(seed), tok)
