"""Stable Diffusion's KL autoencoder (diffusers `AutoencoderKL`) as a Flax NNX module, NHWC.

Images are float arrays in [-1, 1] of shape (B, H, W, in_channels); latents are (B, H / 2^(n-1), W / 2^(n-1),
latent_channels) for n = len(block_out_channels). Parameter paths mirror diffusers' module names (see
`hps_jax.models.sd_blocks`), so `hps_jax.convert.diffusers` maps state dicts generically:

  encoder/{conv_in, down_blocks/{i}/{resnets/{j}, downsamplers/0/conv}, mid_block/{resnets/{0,1}, attentions/0},
           conv_norm_out, conv_out}
  quant_conv, post_quant_conv
  decoder/{conv_in, mid_block, up_blocks/{i}/{resnets/{j}, upsamplers/0/conv}, conv_norm_out, conv_out}
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from hps_jax.models.sd_blocks import (
  Attention,
  Downsample2D,
  GroupNorm,
  ResnetBlock2D,
  Upsample2D,
  check_bool,
  check_int,
  check_number,
  check_sample_size,
  conv2d,
)

# diffusers config keys that describe nothing this implementation computes differently.
_IGNORED_CONFIG_KEYS = ("force_upcast", "latents_mean", "latents_std")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """The fields of diffusers' `vae/config.json` (defaults: Stable Diffusion v1.x) plus the attention backend."""

  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: int = 512
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  attention_backend: str = "auto"

  def __post_init__(self):
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"need one down and one up block type per entry of block_out_channels ({n})")
    if set(self.down_block_types) != {"DownEncoderBlock2D"} or set(self.up_block_types) != {"UpDecoderBlock2D"}:
      raise ValueError(
        f"only DownEncoderBlock2D / UpDecoderBlock2D are supported, got {self.down_block_types} / {self.up_block_types}"
      )
    if self.act_fn != "silu":
      raise ValueError(f"only act_fn='silu' is supported, got {self.act_fn!r}")
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise ValueError(
          f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups {self.norm_num_groups}"
        )

  def validate(self) -> "VAEConfig":
    """Types and sane bounds of every field (at most 8 blocks of 16384 channels, 64 resnets per block); raises
    ValueError naming the first bad field, else returns self."""
    check_int("number of blocks (len(block_out_channels))", len(self.block_out_channels), 1, 8)
    for c in self.block_out_channels:
      check_int("block_out_channels", c, 1, 1 << 14)
    check_int("layers_per_block", self.layers_per_block, 1, 64)
    for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups"):
      check_int(name, getattr(self, name), 1, 1024)
    check_sample_size("sample_size", self.sample_size, 1 << 16)
    check_number("scaling_factor", self.scaling_factor, positive=True)
    if self.shift_factor is not None:
      check_number("shift_factor", self.shift_factor)
    for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
      check_bool(name, getattr(self, name))
    return self

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def replace(self, **kw) -> "VAEConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "VAEConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown VAEConfig fields: {sorted(unknown)}")
    return cls(**d)

  @classmethod
  def from_diffusers(cls, d: dict[str, Any], **overrides) -> "VAEConfig":
    """A diffusers `vae/config.json` dict -> config; `_`-prefixed metadata and irrelevant keys are dropped."""
    kept = {k: v for k, v in d.items() if not k.startswith("_") and k not in _IGNORED_CONFIG_KEYS}
    return cls.from_dict({**kept, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    d = self.to_dict()
    d.pop("attention_backend")
    return {"_class_name": "AutoencoderKL", **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


class UNetMidBlock2D(nnx.Module):
  """resnets/0 -> attentions/0 (single-head spatial self-attention with group norm and residual) -> resnets/1."""

  def __init__(self, channels: int, groups: int, *, add_attention: bool, backend: str, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, groups=groups, eps=1e-6, **kw) for _ in range(2)])
    self.attentions = (
      nnx.List(
        [
          Attention(
            channels,
            heads=1,
            dim_head=channels,
            bias=True,
            out_bias=True,
            norm_num_groups=groups,
            eps=1e-6,
            residual_connection=True,
            backend=backend,
            **kw,
          )
        ]
      )
      if add_attention
      else None
    )

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attentions is not None:
      x = self.attentions[0](x)
    return self.resnets[1](x)


class DownEncoderBlock2D(nnx.Module):
  def __init__(self, cin: int, cout: int, layers: int, groups: int, *, add_downsample: bool, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [ResnetBlock2D(cin if j == 0 else cout, cout, groups=groups, eps=1e-6, **kw) for j in range(layers)]
    )
    self.downsamplers = nnx.List([Downsample2D(cout, use_conv=True, padding=0, **kw)]) if add_downsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
    return x


class UpDecoderBlock2D(nnx.Module):
  def __init__(self, cin: int, cout: int, layers: int, groups: int, *, add_upsample: bool, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.resnets = nnx.List(
      [ResnetBlock2D(cin if j == 0 else cout, cout, groups=groups, eps=1e-6, **kw) for j in range(layers)]
    )
    self.upsamplers = nnx.List([Upsample2D(cout, use_conv=True, **kw)]) if add_upsample else None

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x)
    return x


class Encoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = conv2d(cfg.in_channels, ch[0], 3, **kw)
    self.down_blocks = nnx.List(
      [
        DownEncoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, add_downsample=i < len(ch) - 1, **kw)
        for i in range(len(ch))
      ]
    )
    self.mid_block = UNetMidBlock2D(
      ch[-1], g, add_attention=cfg.mid_block_add_attention, backend=cfg.attention_backend, **kw
    )
    self.conv_norm_out = GroupNorm(ch[-1], g, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.conv_out = conv2d(ch[-1], 2 * cfg.latent_channels, 3, **kw)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  def __init__(self, cfg: VAEConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = conv2d(cfg.latent_channels, ch[0], 3, **kw)
    self.mid_block = UNetMidBlock2D(
      ch[0], g, add_attention=cfg.mid_block_add_attention, backend=cfg.attention_backend, **kw
    )
    self.up_blocks = nnx.List(
      [
        UpDecoderBlock2D(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, add_upsample=i < len(ch) - 1, **kw)
        for i in range(len(ch))
      ]
    )
    self.conv_norm_out = GroupNorm(ch[-1], g, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    self.conv_out = conv2d(ch[-1], cfg.out_channels, 3, **kw)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """encode: images -> (mean, logvar) of the diagonal Gaussian posterior; decode: latents -> images.
  `encode_latents` / `decode_latents` work on the scaled latents the diffusion model sees."""

  def __init__(
    self, config: VAEConfig | None = None, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None
  ):
    cfg = config or VAEConfig()
    rngs = rngs or nnx.Rngs(0)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = cfg
    self.dtype = dtype
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    z2 = 2 * cfg.latent_channels
    self.quant_conv = conv2d(z2, z2, 1, **kw) if cfg.use_quant_conv else None
    self.post_quant_conv = (
      conv2d(cfg.latent_channels, cfg.latent_channels, 1, **kw) if cfg.use_post_quant_conv else None
    )

  def encode(self, images):
    """images (B, H, W, C) in [-1, 1] -> (mean, logvar), each (B, h, w, latent_channels); logvar clamped to
    [-30, 20] as in diffusers' DiagonalGaussianDistribution."""
    h = self.encoder(images.astype(self.dtype))
    if self.quant_conv is not None:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def latent_dist(self, images) -> "DiagonalGaussian":
    return DiagonalGaussian(*self.encode(images))

  def decode(self, z):
    """Unscaled latents -> images (B, H, W, out_channels), nominally in [-1, 1] (not clipped)."""
    z = z.astype(self.dtype)
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, images, key=None):
    """Reconstruction: decode(sample or mean of the posterior)."""
    dist = self.latent_dist(images)
    return self.decode(dist.mode() if key is None else dist.sample(key))

  def encode_latents(self, images, key=None):
    """images -> latents scaled for the diffusion model: (z - shift_factor) * scaling_factor, z a posterior sample
    (with `key`) or its mean (key=None)."""
    dist = self.latent_dist(images)
    z = dist.mode() if key is None else dist.sample(key)
    if self.config.shift_factor is not None:
      z = z - self.config.shift_factor
    return z * self.config.scaling_factor

  def decode_latents(self, latents):
    """Inverse of the scaling in `encode_latents`, then `decode`."""
    z = latents / self.config.scaling_factor
    if self.config.shift_factor is not None:
      z = z + self.config.shift_factor
    return self.decode(z)


@dataclasses.dataclass
class DiagonalGaussian:
  """The VAE posterior N(mean, exp(logvar)) (logvar already clamped)."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self):
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self):
    return jnp.exp(self.logvar)

  def sample(self, key):
    return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

  def mode(self):
    return self.mean

  def kl(self):
    """KL to the standard normal, summed over all but the batch axis."""
    axes = tuple(range(1, self.mean.ndim))
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)
