"""Stable Diffusion v1.x text-to-image sampling: classifier-free guidance with a negative prompt (the paper samples
with PNDM, 50 steps, guidance 7.5 and "Weird image." as the negative prompt of the adapted model).

The whole denoising loop is one jitted `lax.scan` (UNet on [negative; positive] conditioning, guidance, scheduler
step), then the VAE decodes. Initial latents come from one PRNG key per image (`seeds`), so an image depends only on
its own seed and prompt, never on the batch it was drawn in. The batch is sharded over the mesh's batch axes.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax import lora, parallel
from hps_jax.convert.diffusers import load_text_encoder, load_unet, load_vae
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.diffusion import schedulers as sch
from hps_jax.errors import InputError
from hps_jax.lora import apply_lora_file

SCHEDULERS = ("pndm", "ddim")


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  steps: int = 50
  guidance: float = 7.5
  scheduler: str = "pndm"
  eta: float = 0.0  # DDIM only (0 = deterministic)
  height: int = 512
  width: int = 512


class StableDiffusion:
  """UNet + VAE + CLIP text encoder + tokenizer + scheduler config of a diffusers-layout model dir."""

  def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: sch.SchedulerConfig, mesh=None):
    self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
    self.scheduler_config = scheduler_config
    self.mesh = mesh if mesh is not None else parallel.local_mesh()
    self._refresh()

  @classmethod
  def from_pretrained(cls, model_dir, *, dtype=jnp.float32, mesh=None) -> "StableDiffusion":

    d = Path(model_dir)
    return cls(
      load_unet(d, dtype=dtype),
      load_vae(d, dtype=dtype),
      load_text_encoder(d / "text_encoder", dtype=dtype),
      CLIPTokenizer.from_hf_dir(d / "tokenizer"),
      sch.SchedulerConfig.from_json(d / "scheduler" / "scheduler_config.json"),
      mesh=mesh,
    )

  def load_lora(self, path, scale: float = 1.0) -> dict:
    """Adapts the UNet with a LoRA file (PEFT / diffusers, kohya / A1111 or the HPS v1 release; see
    `hps_jax.convert.lora.load_lora`) at `scale`; returns what was loaded."""

    info = apply_lora_file(self.unet, path, multiplier=scale)
    self._refresh()
    return info

  def set_lora_scale(self, scale: float):
    """Scale of the loaded adapters (0 = the base model, 1 = as trained)."""

    lora.set_lora_scale(self.unet, scale)
    self._refresh()

  def _refresh(self):
    """Re-splits after the module graph changed (adapters added, scale changed: both are static)."""
    self._graph, self._state = nnx.split((self.unet, self.vae, self.text_encoder))
    self._state = parallel.shard_state(self._state, self.mesh)

  @property
  def latent_channels(self) -> int:
    return self.unet.config.in_channels

  @property
  def native_size(self) -> int:
    """The image size the model was trained at: the UNet's sample_size (latents) times the VAE factor."""
    return int(self.unet.config.sample_size) * self.vae_factor

  @property
  def vae_factor(self) -> int:
    return self.vae.config.downsample_factor

  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    return np.asarray(self.tokenizer(list(prompts), context_length=77), np.int32)

  def initial_latents(self, seeds: Sequence[int], height: int, width: int) -> jax.Array:
    """(B, h, w, C) standard normal latents, image i drawn from PRNG key(seeds[i]) alone."""
    f = self.vae_factor
    if height % f or width % f:
      raise ValueError(f"height and width must be multiples of {f}, got {height}x{width}")
    shape = (height // f, width // f, self.latent_channels)
    keys = jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)

  def sample(
    self,
    prompts: Sequence[str],
    seeds: Sequence[int],
    config: SampleConfig = SampleConfig(),
    negative_prompt: str | Sequence[str] = "",
    latents=None,
    output: str = "uint8",
  ) -> np.ndarray:
    """Images (B, H, W, 3): uint8, or float32 in [0, 1] with output="float". `latents` (B, h, w, C) override the
    seeded initial noise."""
    prompts = list(prompts)
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(seeds) != len(prompts) or len(negatives) != len(prompts):
      raise ValueError(
        f"{len(prompts)} prompts need as many seeds and negative prompts (got {len(seeds)} and {len(negatives)})"
      )
    if config.scheduler not in SCHEDULERS:
      raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {config.scheduler!r}")
    if latents is None:
      latents = self.initial_latents(seeds, config.height, config.width)
    latents, cond, uncond = parallel.put_global(
      self.mesh, (np.asarray(latents, np.float32), self.tokenize(prompts), self.tokenize(negatives))
    )
    if config.scheduler == "pndm":
      timesteps = sch.pndm_timesteps(self.scheduler_config, config.steps)
    else:
      timesteps = sch.ddim_timesteps(self.scheduler_config, config.steps)
    images = _sample(
      self._graph,
      self._state,
      latents,
      cond,
      uncond,
      jnp.asarray(timesteps, jnp.int32),
      jnp.float32(config.guidance),
      self.scheduler_config,
      config.steps,
      config.scheduler,
      float(config.eta),
    )
    images = np.asarray(images)
    if not np.isfinite(images).all():  # NaN weights, a broken LoRA: never written as black images
      raise InputError(
        f"the model produced non-finite pixels (NaN / inf) for {len(prompts)} prompt(s), e.g. {prompts[0]!r}: check "
        "the model and LoRA weights (and the --guidance / --lora-scale values)"
      )
    return images if output == "float" else np.round(images * 255).astype(np.uint8)


@functools.partial(jax.jit, static_argnums=(0, 7, 8, 9, 10))
def _sample(graph, state, latents, cond_ids, uncond_ids, timesteps, guidance, sched_cfg, steps, kind, eta):
  unet, vae, text = nnx.merge(graph, state)
  context = jnp.concatenate([text(uncond_ids), text(cond_ids)])
  b = latents.shape[0]
  pndm = sch.pndm_init_state(latents.shape, latents.dtype) if kind == "pndm" else None

  def body(carry, t):
    x, st = carry
    eps = unet(jnp.concatenate([x, x]), jnp.full((2 * b,), t), context).astype(jnp.float32)
    e_uncond, e_cond = eps[:b], eps[b:]
    eps = e_uncond + guidance * (e_cond - e_uncond)
    if kind == "pndm":
      x, st = sch.pndm_step(sched_cfg, st, eps, t, x, steps)
    else:
      x = sch.ddim_step(sched_cfg, eps, t, x, steps, eta=eta)
    return (x, st), None

  (x, _), _ = jax.lax.scan(body, (latents, pndm), timesteps)
  images = vae.decode_latents(x).astype(jnp.float32)
  return jnp.clip(images / 2 + 0.5, 0.0, 1.0)
