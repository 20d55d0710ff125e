"""Flax NNX building blocks shared by the Stable Diffusion VAE and UNet (NHWC layout).

Attribute names mirror the module names of diffusers' PyTorch implementation, so that a diffusers state-dict key
`a.b.0.c.weight` corresponds to the NNX parameter path `a/b/0/c/kernel` (convs and linears) or `a/b/0/c/scale`
(norms); `bias` keeps its name. `hps_jax.convert.diffusers` relies on this and nothing else.

  GroupNorm       scale, bias                      statistics always in float32 (two-pass variance, as torch)
  ResnetBlock2D   norm1, conv1, [time_emb_proj], norm2, conv2, [conv_shortcut]
  Downsample2D    conv (3x3, stride 2)             padding=1 (UNet) or padding=0 = pad right/bottom by one (VAE)
  Upsample2D      conv                             nearest-neighbour x2 (or to `output_size`) then a 3x3 conv
  Attention       [group_norm], to_q, to_k, to_v, to_out/0

Parameters carry logical axis names (see `hps_jax.parallel.DEFAULT_RULES`): output-channel axes of convs and the
channel axes of norms are 'embed'; linear layers use ('embed', 'heads') / ('heads', 'embed') / ('embed', 'mlp').
Parameters are created with eager sharding off, so blocks build outside a mesh (`hps_jax.parallel` shards later).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from hps_jax.models.attention import dot_product_attention


# ------------------------------------------------------------------------------------------------------------
# config validation helpers (UNetConfig.validate, VAEConfig.validate): plain ValueErrors naming the field
# ------------------------------------------------------------------------------------------------------------
def check_int(name: str, value, lo: int, hi: int) -> int:
  """`value` if it is an int (not a bool) in [lo, hi], else ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
  if not lo <= value <= hi:
    raise ValueError(f"{name} = {value} is out of range [{lo}, {hi}]")
  return value


def check_number(name: str, value, *, positive: bool = False) -> float:
  """`value` if it is a finite real number (not a bool; > 0 with `positive`), else ValueError naming `name`."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ValueError(f"{name} must be a finite number, got {value!r:.40}")
  if positive and value <= 0:
    raise ValueError(f"{name} must be positive, got {value}")
  return value


def check_bool(name: str, value) -> bool:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be true or false, got {value!r:.40}")
  return value


def check_sample_size(name: str, value, hi: int) -> None:
  """An int, or a pair of ints (diffusers allows both)."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2:
      raise ValueError(f"{name} must be an integer or a pair of integers, got {value!r:.40}")
    for v in value:
      check_int(name, v, 1, hi)
  else:
    check_int(name, value, 1, hi)


def _part(init, axes):
  return nnx.with_partitioning(init, axes)


# XLA:CPU's convolution runs the 3x3 convs of the UNet's low-resolution levels (H*W <= 64: 8x8 and 4x4 latents at
# 1280-2560 channels) at 20-60 GFLOP/s, a quarter of what the same FLOPs reach as one matrix product; there the
# 9-tap im2col (9 shifted copies of a small input, ~12 MB at most) followed by one dot with the HWIO kernel viewed
# as (9*C_in, C_out) is 2-3x faster (bench/results/sample_cpu_profile_ops.json). Larger maps keep XLA's convolution,
# which is faster there; other platforms always do. Same sums in another order: float32 noise (~1e-6).
CONV_AS_DOT_MAX_PIXELS = 64


def _conv_as_dot_applies(lhs, rhs, strides, lhs_dilation, rhs_dilation, dimension_numbers, groups, kw) -> bool:
  if CONV_AS_DOT_MAX_PIXELS <= 0 or jax.default_backend() != "cpu" or kw.get("out_sharding") is not None:
    return False
  if lhs.ndim != 4 or groups != 1 or rhs.shape[0] * rhs.shape[1] == 1:
    return False
  if any(s != 1 for s in strides) or any(d != 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ()))):
    return False
  nhwc = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
  if jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
    return False
  return lhs.shape[1] * lhs.shape[2] <= CONV_AS_DOT_MAX_PIXELS


def _conv_general_dilated(
  lhs,
  rhs,
  window_strides,
  padding,
  lhs_dilation=None,
  rhs_dilation=None,
  dimension_numbers=None,
  feature_group_count=1,
  precision=None,
  **kw,
):
  """`jax.lax.conv_general_dilated` (the signature nnx.Conv calls), computed as im2col + one dot for a stride-1
  NHWC conv on a small map on the CPU (see CONV_AS_DOT_MAX_PIXELS)."""
  if not _conv_as_dot_applies(
    lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, kw
  ):
    return jax.lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      precision=precision,
      **kw,
    )
  kh, kw_, cin, cout = rhs.shape
  b, h, w, _ = lhs.shape
  if isinstance(padding, str):
    padding = jax.lax.padtype_to_pads((h, w), (kh, kw_), (1, 1), padding)
  (pt, pb), (pl, pr) = padding
  x = jnp.pad(lhs, ((0, 0), (max(pt, 0), max(pb, 0)), (max(pl, 0), max(pr, 0)), (0, 0)))
  x = x[:, max(-pt, 0) : x.shape[1] - max(-pb, 0), max(-pl, 0) : x.shape[2] - max(-pr, 0)]
  oh, ow = x.shape[1] - kh + 1, x.shape[2] - kw_ + 1
  cols = jnp.concatenate([x[:, i : i + oh, j : j + ow] for i in range(kh) for j in range(kw_)], axis=-1)
  y = jax.lax.dot_general(
    cols.reshape(b * oh * ow, kh * kw_ * cin),
    rhs.reshape(kh * kw_ * cin, cout),
    (((1,), (0,)), ((), ())),
    precision=precision,
    preferred_element_type=kw.get("preferred_element_type"),
  )
  return y.reshape(b, oh, ow, cout)


def conv2d(
  in_channels: int,
  out_channels: int,
  kernel_size: int = 3,
  *,
  stride: int = 1,
  padding=None,
  use_bias: bool = True,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  rngs: nnx.Rngs,
) -> nnx.Conv:
  """A torch-like Conv2d on NHWC inputs: kernel HWIO, `padding` an int (symmetric, default kernel_size // 2) or
  flax's explicit ((top, bottom), (left, right))."""
  if padding is None:
    padding = kernel_size // 2
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  with nnx.use_eager_sharding(False):
    return nnx.Conv(
      in_channels,
      out_channels,
      kernel_size=(kernel_size, kernel_size),
      strides=(stride, stride),
      padding=padding,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      conv_general_dilated=_conv_general_dilated,
      kernel_init=_part(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
      bias_init=_part(nnx.initializers.zeros_init(), ("embed",)),
    )


def linear(
  in_features: int,
  out_features: int,
  axes: Sequence[str | None] = ("embed", "mlp"),
  *,
  use_bias: bool = True,
  dtype=jnp.float32,
  param_dtype=jnp.float32,
  rngs: nnx.Rngs,
) -> nnx.Linear:
  """nnx.Linear with logical axes on its kernel (in, out) and bias (out,)."""
  with nnx.use_eager_sharding(False):
    return nnx.Linear(
      in_features,
      out_features,
      use_bias=use_bias,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      kernel_init=_part(nnx.initializers.lecun_normal(), tuple(axes)),
      bias_init=_part(nnx.initializers.zeros_init(), (axes[1],)),
    )


class GroupNorm(nnx.Module):
  """torch.nn.GroupNorm over the last (channel) axis of an NHWC (or (B, L, C)) array. Mean and variance are taken
  in float32 with the two-pass formula; the result is cast back to `dtype`."""

  def __init__(
    self,
    num_channels: int,
    num_groups: int = 32,
    *,
    eps: float = 1e-6,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    if num_channels % num_groups:
      raise ValueError(f"GroupNorm: {num_channels} channels are not divisible into {num_groups} groups")
    self.num_groups = num_groups
    self.eps = eps
    self.dtype = dtype
    with nnx.use_eager_sharding(False):
      self.scale = nnx.Param(_part(nnx.initializers.ones_init(), ("embed",))(None, (num_channels,), param_dtype))
      self.bias = nnx.Param(_part(nnx.initializers.zeros_init(), ("embed",))(None, (num_channels,), param_dtype))

  def __call__(self, x):
    shape = x.shape
    c = shape[-1]
    g = x.astype(jnp.float32).reshape(shape[0], -1, self.num_groups, c // self.num_groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class ResnetBlock2D(nnx.Module):
  """diffusers' ResnetBlock2D with time_embedding_norm='default', SiLU and output_scale_factor 1:
  out = shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))."""

  def __init__(
    self,
    in_channels: int,
    out_channels: int | None = None,
    *,
    temb_channels: int | None = None,
    groups: int = 32,
    groups_out: int | None = None,
    eps: float = 1e-6,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    out_channels = out_channels or in_channels
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.in_channels, self.out_channels = in_channels, out_channels
    self.norm1 = GroupNorm(in_channels, groups, eps=eps, **kw)
    self.conv1 = conv2d(in_channels, out_channels, 3, rngs=rngs, **kw)
    self.time_emb_proj = (
      linear(temb_channels, out_channels, (None, "embed"), rngs=rngs, **kw) if temb_channels is not None else None
    )
    self.norm2 = GroupNorm(out_channels, groups_out or groups, eps=eps, **kw)
    self.conv2 = conv2d(out_channels, out_channels, 3, rngs=rngs, **kw)
    self.conv_shortcut = (
      conv2d(in_channels, out_channels, 1, padding=0, rngs=rngs, **kw) if in_channels != out_channels else None
    )

  def __call__(self, x, temb=None):
    h = self.conv1(nnx.silu(self.norm1(x)))
    if self.time_emb_proj is not None:
      if temb is None:
        raise ValueError("ResnetBlock2D was built with temb_channels but called without temb")
      h = h + self.time_emb_proj(nnx.silu(temb))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class Downsample2D(nnx.Module):
  """Halves H and W: a stride-2 3x3 conv (`use_conv`) or 2x2 average pooling. padding=0 pads one row/column at the
  bottom/right first (the VAE's layout); padding=1 pads symmetrically (the UNet's)."""

  def __init__(
    self,
    channels: int,
    *,
    out_channels: int | None = None,
    use_conv: bool = True,
    padding: int = 1,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    out_channels = out_channels or channels
    self.use_conv = use_conv
    if use_conv:
      pad = ((0, 1), (0, 1)) if padding == 0 else padding
      self.conv = conv2d(
        channels, out_channels, 3, stride=2, padding=pad, dtype=dtype, param_dtype=param_dtype, rngs=rngs
      )
    elif out_channels != channels:
      raise ValueError("Downsample2D without a conv cannot change the number of channels")

  def __call__(self, x):
    if self.use_conv:
      return self.conv(x)
    b, h, w, c = x.shape
    return x[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _nearest_resize(x, size):
  """torch `F.interpolate(mode='nearest')` on NHWC: source index floor(i * in / out)."""
  h, w = x.shape[1:3]
  oh, ow = size
  if (oh, ow) == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = jnp.floor(jnp.arange(oh) * (h / oh)).astype(jnp.int32)
  cols = jnp.floor(jnp.arange(ow) * (w / ow)).astype(jnp.int32)
  return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
  """Nearest-neighbour upsampling by 2 (or to `output_size=(H, W)`), then a 3x3 conv when `use_conv`."""

  def __init__(
    self,
    channels: int,
    *,
    out_channels: int | None = None,
    use_conv: bool = True,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    self.use_conv = use_conv
    if use_conv:
      self.conv = conv2d(channels, out_channels or channels, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, output_size: tuple[int, int] | None = None):
    size = tuple(output_size) if output_size is not None else (2 * x.shape[1], 2 * x.shape[2])
    x = _nearest_resize(x, size)
    return self.conv(x) if self.use_conv else x


class Attention(nnx.Module):
  """diffusers' `Attention` for the cases Stable Diffusion uses: self- or cross-attention on (B, L, C) sequences,
  or on NHWC feature maps (flattened to (B, H*W, C) and reshaped back). `norm_num_groups` adds the `group_norm`
  applied to the input first (the VAE's mid-block attention); `residual_connection` adds the input back.

  q/k/v: Linear(query_dim | cross_attention_dim -> heads * dim_head, bias=`bias`); to_out/0: Linear(-> query_dim,
  bias=`out_bias`). Softmax scale 1/sqrt(dim_head). Attention runs through `hps_jax.models.attention`."""

  def __init__(
    self,
    query_dim: int,
    *,
    cross_attention_dim: int | None = None,
    heads: int = 8,
    dim_head: int = 64,
    bias: bool = False,
    out_bias: bool = True,
    norm_num_groups: int | None = None,
    eps: float = 1e-5,
    residual_connection: bool = False,
    rescale_output_factor: float = 1.0,
    backend: str = "auto",
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
  ):
    inner = heads * dim_head
    kv_dim = cross_attention_dim or query_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads, self.dim_head = heads, dim_head
    self.backend = backend
    self.residual_connection = residual_connection
    self.rescale_output_factor = rescale_output_factor
    self.group_norm = (
      GroupNorm(query_dim, norm_num_groups, eps=eps, dtype=dtype, param_dtype=param_dtype)
      if norm_num_groups is not None
      else None
    )
    self.to_q = linear(query_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
    self.to_k = linear(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
    self.to_v = linear(kv_dim, inner, ("embed", "heads"), use_bias=bias, **kw)
    self.to_out = nnx.List([linear(inner, query_dim, ("heads", "embed"), use_bias=out_bias, **kw)])

  def __call__(self, x, context=None, *, mask=None):
    """x: (B, L, C) or (B, H, W, C); context: (B, S, C_ctx) for cross-attention (None = self-attention);
    mask: optional boolean mask broadcastable to (B, heads, L, S), True = attend."""
    residual = x
    spatial = x.ndim == 4
    if spatial:
      b, hh, ww, c = x.shape
      x = x.reshape(b, hh * ww, c)
    if self.group_norm is not None:
      x = self.group_norm(x)
    ctx = x if context is None else context
    b, t = x.shape[:2]
    s = ctx.shape[1]
    q = self.to_q(x).reshape(b, t, self.heads, self.dim_head)
    k = self.to_k(ctx).reshape(b, s, self.heads, self.dim_head)
    v = self.to_v(ctx).reshape(b, s, self.heads, self.dim_head)
    o = dot_product_attention(q, k, v, mask=mask, backend=self.backend)
    o = self.to_out[0](o.reshape(b, t, self.heads * self.dim_head))
    if spatial:
      o = o.reshape(residual.shape)
    if self.residual_connection:
      o = o + residual
    if self.rescale_output_factor != 1.0:
      o = o / self.rescale_output_factor
    return o
