"""Stable Diffusion 1.x's conditional UNet (diffusers' `UNet2DConditionModel`) as Flax NNX modules, NHWC.

Attribute names follow diffusers' module names one for one, so a diffusers state-dict key maps to an NNX parameter
path by swapping dots for slashes (and weight -> kernel / scale): e.g.
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight` <-> `down_blocks/0/attentions/0/
transformer_blocks/0/attn1/to_q/kernel`. `hps_jax.convert.diffusers` does that mapping generically; its `load_unet`
/ `save_unet` read and write a diffusers `unet/` folder.

Layout of the model (SD 1.4: block_out_channels (320, 640, 1280, 1280), 8 heads everywhere, cross-attention on the
768-wide CLIP ViT-L/14 text states):

  time_proj (sinusoidal, no parameters) -> time_embedding {linear_1, SiLU, linear_2}
  conv_in
  down_blocks/{i}: CrossAttnDownBlock2D {resnets, attentions, downsamplers} | DownBlock2D {resnets, downsamplers}
  mid_block: UNetMidBlock2DCrossAttn {resnets/0, (attentions/j, resnets/j+1)...}
  up_blocks/{i}: UpBlock2D {resnets, upsamplers} | CrossAttnUpBlock2D {resnets, attentions, upsamplers}; every
    resnet first concatenates the matching skip activation of the down path (channels last)
  conv_norm_out (GroupNorm) -> SiLU -> conv_out

  attentions/{j} is a Transformer2DModel: norm (GroupNorm, eps 1e-6), proj_in (1x1 conv, or a linear layer with
  `use_linear_projection`), transformer_blocks/{k} {norm1, attn1 (self), norm2, attn2 (cross), norm3,
  ff/net/{0/proj (GEGLU), 2}}, proj_out, plus the input as a residual.

diffusers' naming quirk: its config key `attention_head_dim` holds the NUMBER of heads per block for these models
(SD 1.x: 8); the width of a head is the block's channel count divided by it. `UNetConfig` keeps the diffusers
name and exposes `num_heads(i)`.

Supported configuration: the SD 1.x keys, plus per-block head counts / cross-attention widths / transformer depths,
`use_linear_projection` (SD 2.x), `time_embedding_dim`, `conv_in_kernel` / `conv_out_kernel`, `center_input_sample`,
`mid_block_type=None`. Not supported (raises in `UNetConfig.from_diffusers`): `upcast_attention` (SD 2.1-v), class /
addition embeddings (SDXL), other block types. Dropout is not implemented (SD checkpoints use 0.0).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
  linear,
)

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)

# diffusers UNet2DConditionModel arguments this implementation does not support: each must keep this value.
_FIXED_DIFFUSERS_KEYS: dict[str, Any] = {
  "num_attention_heads": None,
  "dual_cross_attention": False,
  "only_cross_attention": False,
  "mid_block_only_cross_attention": None,
  "upcast_attention": False,
  "class_embed_type": None,
  "num_class_embeds": None,
  "class_embeddings_concat": False,
  "projection_class_embeddings_input_dim": None,
  "addition_embed_type": None,
  "addition_time_embed_dim": None,
  "encoder_hid_dim": None,
  "encoder_hid_dim_type": None,
  "resnet_time_scale_shift": "default",
  "resnet_skip_time_act": False,
  "resnet_out_scale_factor": 1.0,
  "mid_block_scale_factor": 1.0,
  "act_fn": "silu",
  "time_embedding_type": "positional",
  "time_embedding_act_fn": None,
  "timestep_post_act": None,
  "time_cond_proj_dim": None,
  "attention_type": "default",
  "cross_attention_norm": None,
  "reverse_transformer_layers_per_block": None,
}
# accepted and ignored (no effect on the computation here).
_IGNORED_DIFFUSERS_KEYS = ("dropout", "addition_embed_type_num_heads")


def _per_block(value, n: int, name: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries for {n} down blocks")
    return tuple(value)
  return (value,) * n


REMAT_POLICIES = ("nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable")
_OUR_FIELDS = ("attention_backend", "remat", "remat_policy")  # not diffusers config keys


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Architecture of a diffusers `UNet2DConditionModel` (the subset SD 1.x uses). Field names are diffusers'
  config.json keys; `attention_backend`, `remat` and `remat_policy` are ours. Defaults are Stable Diffusion v1.4's."""

  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  center_input_sample: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  down_block_types: tuple[str, ...] = (
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "CrossAttnDownBlock2D",
    "DownBlock2D",
  )
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
  up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int | tuple[int, ...] = 2
  downsample_padding: int = 1
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  cross_attention_dim: int | tuple[int, ...] = 768
  transformer_layers_per_block: int | tuple[int, ...] = 1
  attention_head_dim: int | tuple[int, ...] = 8  # diffusers' name; the NUMBER of heads (see module docstring)
  use_linear_projection: bool = False
  time_embedding_dim: int | None = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  attention_backend: str = "auto"
  remat: bool = False
  # what each rematerialized block keeps from its forward pass for the backward pass (`jax.checkpoint_policies`):
  # "nothing_saveable" (least memory: the block's inputs only, all recomputed), "dots_saveable" (matmul outputs
  # kept: less recompute, more memory), "dots_with_no_batch_dims_saveable" (matmuls without batch dims kept)
  remat_policy: str = "nothing_saveable"

  def __post_init__(self):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
    for name in ("down_block_types", "up_block_types", "block_out_channels"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(
        f"{len(self.down_block_types)} down and {len(self.up_block_types)} up block types for {n} block_out_channels"
      )
    for t in self.down_block_types:
      if t not in DOWN_BLOCK_TYPES:
        raise ValueError(f"unsupported down block {t!r}; supported: {DOWN_BLOCK_TYPES}")
    for t in self.up_block_types:
      if t not in UP_BLOCK_TYPES:
        raise ValueError(f"unsupported up block {t!r}; supported: {UP_BLOCK_TYPES}")
    if self.mid_block_type not in MID_BLOCK_TYPES:
      raise ValueError(f"unsupported mid block {self.mid_block_type!r}; supported: {MID_BLOCK_TYPES}")
    for name in ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim"):
      if not all(isinstance(v, int) and v > 0 for v in _per_block(getattr(self, name), n, name)):
        raise ValueError(f"{name} must be a positive int or one per block, got {getattr(self, name)!r}")
    if not isinstance(self.norm_num_groups, int):
      raise ValueError("norm_num_groups must be an int (the UNet without norms is not supported)")
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      raise ValueError("conv_in_kernel and conv_out_kernel must be odd")

  def validate(self) -> "UNetConfig":
    """Types and sane bounds of every field (far beyond SD 1.x / 2.x / SDXL: at most 8 blocks of 16384 channels,
    512 resnets and 512 transformer blocks in all), so a hostile config.json cannot ask for a model that takes
    minutes or gigabytes to even describe; raises ValueError naming the first bad field, else returns self."""
    n = len(self.block_out_channels)
    check_int("number of blocks (len(block_out_channels))", n, 1, 8)
    for c in self.block_out_channels:
      check_int("block_out_channels", c, 1, 1 << 14)
      if isinstance(self.norm_num_groups, int) and self.norm_num_groups > 0 and c % self.norm_num_groups:
        raise ValueError(f"block_out_channels {self.block_out_channels} must be multiples of norm_num_groups")
    check_sample_size("sample_size", self.sample_size, 1 << 12)
    check_int("in_channels", self.in_channels, 1, 1024)
    check_int("out_channels", self.out_channels, 1, 1024)
    check_int("norm_num_groups", self.norm_num_groups, 1, 1024)
    check_int("downsample_padding", self.downsample_padding, 0, 16)
    check_int("conv_in_kernel", self.conv_in_kernel, 1, 15)
    check_int("conv_out_kernel", self.conv_out_kernel, 1, 15)
    if self.time_embedding_dim is not None:
      check_int("time_embedding_dim", self.time_embedding_dim, 1, 1 << 16)
    check_number("freq_shift", self.freq_shift)
    check_number("norm_eps", self.norm_eps, positive=True)
    for name in ("center_input_sample", "flip_sin_to_cos", "use_linear_projection", "remat"):
      check_bool(name, getattr(self, name))
    for name, hi in (
      ("layers_per_block", 64),
      ("transformer_layers_per_block", 64),
      ("attention_head_dim", 1 << 12),
      ("cross_attention_dim", 1 << 14),
    ):
      for v in self._blocks(name):
        check_int(name, v, 1, hi)
    for i, c in enumerate(self.block_out_channels):
      if self.num_heads(i) > c or c % self.num_heads(i):
        raise ValueError(f"block {i}: {c} channels are not divisible into {self.num_heads(i)} heads")
    resnets = sum(2 * self.layers(i) + 1 for i in range(n)) + 2
    transformers = sum(
      (2 * self.layers(i) + 1) * self.transformer_layers(i)
      for i, t in enumerate(self.down_block_types)
      if t.startswith("CrossAttn")
    ) + self.transformer_layers(n - 1)
    if resnets > 512 or transformers > 512:
      raise ValueError(f"{resnets} resnets and {transformers} transformer blocks in all: at most 512 each supported")
    return self

  # per-block views ------------------------------------------------------------------------------------------
  def _blocks(self, name):
    return _per_block(getattr(self, name), len(self.block_out_channels), name)

  def num_heads(self, i: int) -> int:
    """Number of attention heads of down block i (up block len-1-i; the mid block uses the last)."""
    return self._blocks("attention_head_dim")[i]

  def layers(self, i: int) -> int:
    return self._blocks("layers_per_block")[i]

  def context_dim(self, i: int) -> int:
    return self._blocks("cross_attention_dim")[i]

  def transformer_layers(self, i: int) -> int:
    return self._blocks("transformer_layers_per_block")[i]

  @property
  def time_embed_dim(self) -> int:
    return self.time_embedding_dim or 4 * self.block_out_channels[0]

  @property
  def num_upsamplers(self) -> int:
    return len(self.block_out_channels) - 1

  def replace(self, **kw) -> "UNetConfig":
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
      raise ValueError(f"unknown UNetConfig fields: {sorted(unknown)}")
    return cls(**d)

  @classmethod
  def from_diffusers(cls, config: dict[str, Any], **overrides) -> "UNetConfig":
    """From the contents of a diffusers `unet/config.json`. Keys starting with '_' are metadata and skipped; keys
    for features this implementation lacks must have their diffusers default, else ValueError."""
    names = {f.name for f in dataclasses.fields(cls)} - set(_OUR_FIELDS)
    kw = {}
    for key, value in config.items():
      if key.startswith("_") or key in _IGNORED_DIFFUSERS_KEYS:
        continue
      if key in _FIXED_DIFFUSERS_KEYS:
        expected = _FIXED_DIFFUSERS_KEYS[key]
        if value != expected:
          raise ValueError(f"diffusers UNet option {key}={value!r} is not supported (only {expected!r})")
        continue
      if key not in names:
        raise ValueError(f"unknown diffusers UNet config key {key!r}")
      kw[key] = value
    return cls(**{**kw, **overrides})

  def to_diffusers(self) -> dict[str, Any]:
    """Arguments for diffusers' `UNet2DConditionModel(**config)` describing the same architecture."""
    d = {k: v for k, v in self.to_dict().items() if k not in _OUR_FIELDS}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

  # presets --------------------------------------------------------------------------------------------------
  @classmethod
  def sd14(cls, **kw) -> "UNetConfig":
    """Stable Diffusion v1.4 / v1.5 (CompVis/stable-diffusion-v1-4 unet/config.json)."""
    return cls(**kw)

  @classmethod
  def tiny(cls, **kw) -> "UNetConfig":
    """Every SD 1.x block type at toy widths, for tests and offline demos."""
    return cls(
      **{
        **dict(
          sample_size=16,
          block_out_channels=(32, 64),
          layers_per_block=1,
          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
          norm_num_groups=8,
          cross_attention_dim=32,
          attention_head_dim=2,
        ),
        **kw,
      }
    )


# modules ----------------------------------------------------------------------------------------------------
def timestep_embedding(timesteps, dim: int, *, flip_sin_to_cos: bool, freq_shift: float, max_period: float = 10000.0):
  """Sinusoidal (N,) -> (N, dim) float32 timestep features, as diffusers' `get_timestep_embedding`: frequencies
  exp(-log(max_period) * i / (dim/2 - freq_shift)); [sin, cos] halves, or [cos, sin] with flip_sin_to_cos."""
  half = dim // 2
  # The frequencies are a trace-time constant: float32 exponents as torch forms them, exp in float64 rounded to
  # float32 (XLA's float32 exp and its x/c -> x*(1/c) rewrite are each an ulp off, which a timestep near 1000
  # turns into ~1e-4 of the argument).
  exponent = (np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)) / np.float32(half - freq_shift)
  freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
  args = jnp.asarray(timesteps).astype(jnp.float32)[:, None] * freqs[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class Timesteps(nnx.Module):
  """diffusers' `Timesteps` (`time_proj`): parameter-free sinusoidal features."""

  def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float):
    self.num_channels = num_channels
    self.flip_sin_to_cos = flip_sin_to_cos
    self.downscale_freq_shift = downscale_freq_shift

  def __call__(self, timesteps):
    return timestep_embedding(
      timesteps, self.num_channels, flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.downscale_freq_shift
    )


class TimestepEmbedding(nnx.Module):
  """linear_1 -> SiLU -> linear_2."""

  def __init__(self, in_channels: int, time_embed_dim: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.linear_1 = linear(in_channels, time_embed_dim, ("embed", "mlp"), **kw)
    self.linear_2 = linear(time_embed_dim, time_embed_dim, ("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.linear_2(nnx.silu(self.linear_1(x)))


def _layer_norm(dim: int, eps: float, *, dtype, param_dtype, rngs):
  return nnx.LayerNorm(
    dim,
    epsilon=eps,
    dtype=dtype,
    param_dtype=param_dtype,
    rngs=rngs,
    scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)),
  )


class GEGLU(nnx.Module):
  """proj to 2*inner, split into (value, gate), value * gelu(gate) (exact erf GELU, as torch's default)."""

  def __init__(self, dim_in: int, dim_out: int, *, dtype, param_dtype, rngs):
    self.proj = linear(dim_in, 2 * dim_out, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    h, gate = jnp.split(self.proj(x), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """net/0 = GEGLU(dim -> 4*dim), net/1 = dropout (no parameters; kept as an empty slot so indices match
  diffusers), net/2 = Linear(4*dim -> dim)."""

  def __init__(self, dim: int, mult: int = 4, *, dtype, param_dtype, rngs):
    inner = dim * mult
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.net = nnx.List([GEGLU(dim, inner, **kw), None, linear(inner, dim, ("mlp", "embed"), **kw)])

  def __call__(self, x):
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm: x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))."""

  def __init__(
    self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, *, backend: str, dtype, param_dtype, rngs
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm1 = _layer_norm(dim, 1e-5, **kw)
    self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, backend=backend, **kw)
    self.norm2 = _layer_norm(dim, 1e-5, **kw)
    self.attn2 = Attention(
      dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=head_dim, backend=backend, **kw
    )
    self.norm3 = _layer_norm(dim, 1e-5, **kw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x, context):
    x = x + self.attn1(self.norm1(x))
    x = x + self.attn2(self.norm2(x), context)
    return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
  """GroupNorm -> proj_in -> flatten to (B, H*W, inner) -> transformer_blocks -> proj_out -> + input. proj_in /
  proj_out are 1x1 convs (SD 1.x) or linear layers on the flattened sequence (`use_linear_projection`)."""

  def __init__(
    self,
    channels: int,
    heads: int,
    cross_attention_dim: int,
    *,
    num_layers: int = 1,
    groups: int = 32,
    use_linear_projection: bool = False,
    backend: str = "auto",
    dtype,
    param_dtype,
    rngs,
  ):
    if channels // heads < 1:
      raise ValueError(f"{channels} channels cannot be split over {heads} heads")
    head_dim = channels // heads
    inner = heads * head_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.use_linear_projection = use_linear_projection
    self.norm = GroupNorm(channels, groups, eps=1e-6, dtype=dtype, param_dtype=param_dtype)
    if use_linear_projection:
      self.proj_in = linear(channels, inner, ("embed", "mlp"), **kw)
      self.proj_out = linear(inner, channels, ("mlp", "embed"), **kw)
    else:
      self.proj_in = conv2d(channels, inner, 1, padding=0, **kw)
      self.proj_out = conv2d(inner, channels, 1, padding=0, **kw)
    self.transformer_blocks = nnx.List(
      [
        BasicTransformerBlock(inner, heads, head_dim, cross_attention_dim, backend=backend, **kw)
        for _ in range(num_layers)
      ]
    )

  def __call__(self, x, context):
    b, h, w, c = x.shape
    residual = x
    x = self.norm(x)
    if self.use_linear_projection:
      x = self.proj_in(x.reshape(b, h * w, c))
    else:
      x = self.proj_in(x)
      x = x.reshape(b, h * w, x.shape[-1])
    for block in self.transformer_blocks:
      x = block(x, context)
    if self.use_linear_projection:
      x = self.proj_out(x).reshape(b, h, w, c)
    else:
      x = self.proj_out(x.reshape(b, h, w, x.shape[-1]))
    return x + residual


class DownBlock(nnx.Module):
  """CrossAttnDownBlock2D (`cross_attention=True`) or DownBlock2D: [resnet (-> attention)] x layers, then an
  optional stride-2 downsampler. Returns (h, skips): one skip per layer plus one after the downsampler."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int,
    *,
    temb_channels: int,
    num_layers: int,
    add_downsample: bool,
    cross_attention: bool,
    cfg: UNetConfig,
    block_index: int,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    groups = cfg.norm_num_groups
    self.resnets = nnx.List(
      [
        ResnetBlock2D(
          in_channels if i == 0 else out_channels,
          out_channels,
          temb_channels=temb_channels,
          groups=groups,
          eps=cfg.norm_eps,
          **kw,
        )
        for i in range(num_layers)
      ]
    )
    self.attentions = (
      nnx.List(
        [
          Transformer2DModel(
            out_channels,
            cfg.num_heads(block_index),
            cfg.context_dim(block_index),
            num_layers=cfg.transformer_layers(block_index),
            groups=groups,
            use_linear_projection=cfg.use_linear_projection,
            backend=cfg.attention_backend,
            **kw,
          )
          for _ in range(num_layers)
        ]
      )
      if cross_attention
      else None
    )
    self.downsamplers = (
      nnx.List([Downsample2D(out_channels, use_conv=True, padding=cfg.downsample_padding, **kw)])
      if add_downsample
      else None
    )

  def __call__(self, x, temb, context):
    skips = []
    for i, resnet in enumerate(self.resnets):
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
      skips.append(x)
    if self.downsamplers is not None:
      x = self.downsamplers[0](x)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(nnx.Module):
  """UNetMidBlock2DCrossAttn: resnets/0, then (attentions/j, resnets/j+1) pairs."""

  def __init__(self, channels: int, *, temb_channels: int, cfg: UNetConfig, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    last = len(cfg.block_out_channels) - 1
    groups = cfg.norm_num_groups
    self.resnets = nnx.List(
      [
        ResnetBlock2D(channels, channels, temb_channels=temb_channels, groups=groups, eps=cfg.norm_eps, **kw)
        for _ in range(2)
      ]
    )
    self.attentions = nnx.List(
      [
        Transformer2DModel(
          channels,
          cfg.num_heads(last),
          cfg.context_dim(last),
          num_layers=cfg.transformer_layers(last),
          groups=groups,
          use_linear_projection=cfg.use_linear_projection,
          backend=cfg.attention_backend,
          **kw,
        )
      ]
    )

  def __call__(self, x, temb, context):
    x = self.resnets[0](x, temb)
    for attn, resnet in zip(self.attentions, self.resnets[1:]):
      x = resnet(attn(x, context), temb)
    return x


class UpBlock(nnx.Module):
  """CrossAttnUpBlock2D (`cross_attention=True`) or UpBlock2D: for each layer, concatenate the last remaining skip
  on the channel axis, resnet (-> attention); then an optional nearest x2 upsampler (to `upsample_size` if given)."""

  def __init__(
    self,
    in_channels: int,
    prev_output_channels: int,
    out_channels: int,
    *,
    temb_channels: int,
    num_layers: int,
    add_upsample: bool,
    cross_attention: bool,
    cfg: UNetConfig,
    block_index: int,
    dtype,
    param_dtype,
    rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    groups = cfg.norm_num_groups
    resnets = []
    for i in range(num_layers):
      skip = in_channels if i == num_layers - 1 else out_channels
      cin = prev_output_channels if i == 0 else out_channels
      resnets.append(
        ResnetBlock2D(cin + skip, out_channels, temb_channels=temb_channels, groups=groups, eps=cfg.norm_eps, **kw)
      )
    self.resnets = nnx.List(resnets)
    down_index = len(cfg.block_out_channels) - 1 - block_index
    self.attentions = (
      nnx.List(
        [
          Transformer2DModel(
            out_channels,
            cfg.num_heads(down_index),
            cfg.context_dim(down_index),
            num_layers=cfg.transformer_layers(down_index),
            groups=groups,
            use_linear_projection=cfg.use_linear_projection,
            backend=cfg.attention_backend,
            **kw,
          )
          for _ in range(num_layers)
        ]
      )
      if cross_attention
      else None
    )
    self.upsamplers = nnx.List([Upsample2D(out_channels, use_conv=True, **kw)]) if add_upsample else None

  def __call__(self, x, skips, temb, context, upsample_size=None):
    skips = list(skips)
    for i, resnet in enumerate(self.resnets):
      x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = resnet(x, temb)
      if self.attentions is not None:
        x = self.attentions[i](x, context)
    if self.upsamplers is not None:
      x = self.upsamplers[0](x, upsample_size)
    return x


def _call(block, *args, remat: bool, policy: str = "nothing_saveable", **static):
  """block(*args, **static); with `remat`, under `jax.checkpoint` (activations recomputed in the backward pass)
  keeping what `jax.checkpoint_policies.<policy>` saves. Functional: the block's state is split here and merged
  inside the checkpoint, which (unlike `nnx.remat`) also works when the block's Variables come from different traces,
  e.g. frozen base weights and trainable LoRA adapters merged inside `jax.grad`. The UNet's blocks keep no state
  (no dropout, no batch statistics), so there is nothing to write back."""
  if remat:
    graphdef, state = nnx.split(block)
    fn = lambda st, *a: nnx.merge(graphdef, st)(*a, **static)  # noqa: E731
    return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, policy))(state, *args)
  return block(*args, **static)


class UNet2DConditionModel(nnx.Module):
  """`__call__(sample (N, H, W, C_in), timesteps (N,) or scalar, encoder_hidden_states (N, S, D))` -> the
  prediction (N, H, W, C_out) in `dtype`. Parameter paths mirror diffusers' module names (module docstring)."""

  def __init__(self, cfg: UNetConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = cfg
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ch = cfg.block_out_channels
    n = len(ch)
    temb = cfg.time_embed_dim
    with nnx.use_eager_sharding(False):
      self.conv_in = conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, **kw)
      self.time_proj = Timesteps(ch[0], cfg.flip_sin_to_cos, cfg.freq_shift)
      self.time_embedding = TimestepEmbedding(ch[0], temb, **kw)

      down, out_c = [], ch[0]
      for i, kind in enumerate(cfg.down_block_types):
        in_c, out_c = out_c, ch[i]
        down.append(
          DownBlock(
            in_c,
            out_c,
            temb_channels=temb,
            num_layers=cfg.layers(i),
            add_downsample=i < n - 1,
            cross_attention=kind == "CrossAttnDownBlock2D",
            cfg=cfg,
            block_index=i,
            **kw,
          )
        )
      self.down_blocks = nnx.List(down)

      self.mid_block = MidBlock(ch[-1], temb_channels=temb, cfg=cfg, **kw) if cfg.mid_block_type is not None else None

      rev = list(reversed(ch))
      up, out_c = [], rev[0]
      for i, kind in enumerate(cfg.up_block_types):
        prev_c, out_c = out_c, rev[i]
        in_c = rev[min(i + 1, n - 1)]
        up.append(
          UpBlock(
            in_c,
            prev_c,
            out_c,
            temb_channels=temb,
            num_layers=cfg.layers(n - 1 - i) + 1,
            add_upsample=i < n - 1,
            cross_attention=kind == "CrossAttnUpBlock2D",
            cfg=cfg,
            block_index=i,
            **kw,
          )
        )
      self.up_blocks = nnx.List(up)

      self.conv_norm_out = GroupNorm(ch[0], cfg.norm_num_groups, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
      self.conv_out = conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, **kw)

  def __call__(self, sample, timesteps, encoder_hidden_states):
    cfg = self.config
    if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
      raise ValueError(f"expected NHWC latents with {cfg.in_channels} channels, got shape {sample.shape}")
    x = sample.astype(self.dtype)
    if cfg.center_input_sample:
      x = 2 * x - 1.0
    context = encoder_hidden_states.astype(self.dtype)
    t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (x.shape[0],))
    emb = self.time_embedding(self.time_proj(t).astype(self.dtype))

    x = self.conv_in(x)
    skips = [x]
    for block in self.down_blocks:
      x, res = _call(block, x, emb, context, remat=cfg.remat, policy=cfg.remat_policy)
      skips.extend(res)

    if self.mid_block is not None:
      x = _call(self.mid_block, x, emb, context, remat=cfg.remat, policy=cfg.remat_policy)

    for block in self.up_blocks:
      k = len(block.resnets)
      res, skips = tuple(skips[-k:]), skips[:-k]
      # upsample to the next skip's size: x2 when H and W divide by 2**num_upsamplers, else diffusers'
      # `upsample_size` rule for odd sizes.
      size = tuple(skips[-1].shape[1:3]) if (block.upsamplers is not None and skips) else None
      x = _call(block, x, res, emb, context, remat=cfg.remat, policy=cfg.remat_policy, upsample_size=size)

    return self.conv_out(nnx.silu(self.conv_norm_out(x)))
