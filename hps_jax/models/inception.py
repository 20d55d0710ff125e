"""The FID Inception-v3 ("pt_inception-2015-12-05") in Flax NNX, channels-last, inference only.

This is the network of the TensorFlow graph `inception-2015-12-05` that the original FID / Inception Score code
ran, in the form pytorch-fid (`fid_inception_v3`: torchvision's Inception3 with the `FIDInceptionA/C/E_1/E_2`
blocks) and torch-fidelity (`FeatureExtractorInceptionV3`) rebuild it. It differs from the torchvision / Keras
Inception-v3 in three places, all reproduced here:

* the pool branch of Mixed_5b-5d (A blocks), Mixed_6b-6e (C blocks) and Mixed_7b (first E block) is a 3x3 stride-1
  average pool over a 1-pixel zero pad that averages only the *valid* (non-pad) pixels (TF `SAME` average pooling,
  torch `count_include_pad=False`);
* the pool branch of Mixed_7c (second E block) is a 3x3 stride-1 *max* pool (padded with -inf);
* the classifier has 1008 outputs. torch-fidelity's Inception Score uses the logits *without* the fc bias
  (`logits_unbiased`); both are returned.

Every convolution is followed by an inference-mode BatchNorm (eps 1e-3, running statistics stored as parameters)
and a ReLU. `FIDInception.__call__` takes (N, 299, 299, 3) float images already resized and scaled to [-1, 1];
`hps_jax.metrics.inception_features` does the resizing (pytorch-fid or TF1-compatible) from uint8 images.

Parameter paths mirror the PyTorch module names (`Mixed_5b/branch1x1/conv/kernel`, `.../bn/scale|bias|mean|var`,
`fc/kernel|bias`) so that `hps_jax.convert.inception` is a renaming plus OIHW -> HWIO transposes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

INPUT_SIZE = 299
POOL3_DIM = 2048


@dataclasses.dataclass(frozen=True)
class InceptionConfig:
  num_classes: int = 1008
  bn_eps: float = 1e-3
  # Matmul / conv precision. "highest" keeps float32 convolutions in full float32 on GPUs too (no TF32), which is
  # what the float32 reference numbers are computed with; on CPU every setting is full float32.
  precision: str | None = "highest"


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


def fan_in_normal(key, shape, dtype=jnp.float32):
  """N(0, 1 / fan_in) initializer (fan_in = prod(shape[:-1])), drawn on the host with numpy when `key` is concrete.

  The FID Inception is only ever meant to hold converted weights; its initializer just has to be cheap. Drawing
  ~100 differently-shaped kernels with `jax.random` eagerly compiles one XLA program per shape (tens of seconds on
  a CPU), so concrete keys seed a numpy generator instead. Under tracing (`nnx.eval_shape`, `jax.jit`) it falls
  back to `jax.random.normal`."""
  std = 1.0 / math.sqrt(max(1, math.prod(shape[:-1])))
  if isinstance(key, jax.core.Tracer):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)
  seed = np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key)
  rng = np.random.default_rng(seed.astype(np.uint32).ravel().tolist())
  return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * np.float32(std), dtype)


# ------------------------------------------------------------------------------------------------------------
# Pools (NHWC)
# ------------------------------------------------------------------------------------------------------------
def max_pool(x, window: int = 3, stride: int = 1, pad: int = 0):
  """Max pool; padded positions never win (they hold -inf), like torch's `F.max_pool2d(padding=pad)`."""
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  init = jnp.array(-jnp.inf, x.dtype)
  return jax.lax.reduce_window(x, init, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pads)


def avg_pool_exclude_pad(x, window: int = 3, stride: int = 1, pad: int = 1):
  """Average pool that divides each window sum by the number of *valid* pixels in the window (TF `SAME` average
  pooling; torch `F.avg_pool2d(..., count_include_pad=False)`). The counts come from pooling a ones-array of the
  same spatial shape, which XLA folds into a constant."""
  pads = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  zero = jnp.array(0, x.dtype)
  sums = jax.lax.reduce_window(x, zero, jax.lax.add, dims, strides, pads)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  counts = jax.lax.reduce_window(ones, zero, jax.lax.add, dims, strides, pads)
  return sums / counts


# ------------------------------------------------------------------------------------------------------------
# Layers
# ------------------------------------------------------------------------------------------------------------
class BatchNormInference(nnx.Module):
  """BatchNorm with frozen statistics: (x - mean) / sqrt(var + eps) * scale + bias. All four are `nnx.Param`s
  (they are checkpoint values, never updated here)."""

  def __init__(self, features: int, *, eps: float = 1e-3, dtype=None, param_dtype=jnp.float32):
    self.eps = eps
    self.dtype = dtype
    # host-side constants (device_put only; no per-shape XLA compilation)
    self.scale = nnx.Param(jnp.asarray(np.ones((features,), np.float32), param_dtype))
    self.bias = nnx.Param(jnp.asarray(np.zeros((features,), np.float32), param_dtype))
    self.mean = nnx.Param(jnp.asarray(np.zeros((features,), np.float32), param_dtype))
    self.var = nnx.Param(jnp.asarray(np.ones((features,), np.float32), param_dtype))

  def __call__(self, x):
    # Fold the statistics into one multiply-add, computed in at least float32 whatever the parameter dtype.
    acc = jnp.promote_types(self.var.dtype, jnp.float32)
    mul = self.scale[...].astype(acc) * jax.lax.rsqrt(self.var[...].astype(acc) + self.eps)
    add = self.bias[...].astype(acc) - self.mean[...].astype(acc) * mul
    dtype = self.dtype or x.dtype
    return (x * mul.astype(dtype) + add.astype(dtype)).astype(dtype)


class BasicConv2d(nnx.Module):
  """Conv (no bias) -> BatchNorm (inference) -> ReLU. `padding` is symmetric per spatial dim, like torch's."""

  def __init__(
    self,
    cin: int,
    cout: int,
    kernel_size,
    *,
    stride=1,
    padding=0,
    cfg: InceptionConfig,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
  ):
    ph, pw = _pair(padding)
    self.conv = nnx.Conv(
      cin,
      cout,
      _pair(kernel_size),
      _pair(stride),
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=cfg.precision,
      kernel_init=fan_in_normal,
      rngs=rngs,
    )
    self.bn = BatchNormInference(cout, eps=cfg.bn_eps, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x):
    return jax.nn.relu(self.bn(self.conv(x)))


def _cat(xs: Sequence[jax.Array]):
  return jnp.concatenate(xs, axis=-1)


class InceptionA(nnx.Module):
  """Mixed_5b/5c/5d (pytorch-fid `FIDInceptionA`): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool(excl. pad)-1x1."""

  def __init__(self, cin: int, pool_features: int, **kw):
    self.branch1x1 = BasicConv2d(cin, 64, 1, **kw)
    self.branch5x5_1 = BasicConv2d(cin, 48, 1, **kw)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, **kw)
    self.branch_pool = BasicConv2d(cin, pool_features, 1, **kw)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return _cat([b1, b5, b3, bp])


class InceptionB(nnx.Module):
  """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool 3x3/2."""

  def __init__(self, cin: int, **kw):
    self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2, **kw)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, **kw)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, **kw)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return _cat([b3, bd, max_pool(x, 3, 2)])


class InceptionC(nnx.Module):
  """Mixed_6b-6e (pytorch-fid `FIDInceptionC`): factorized 7x7 branches, avgpool (excl. pad) branch."""

  def __init__(self, cin: int, channels_7x7: int, **kw):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(cin, 192, 1, **kw)
    self.branch7x7_1 = BasicConv2d(cin, c7, 1, **kw)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1, **kw)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), **kw)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), **kw)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), **kw)
    self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (
      self.branch7x7dbl_1,
      self.branch7x7dbl_2,
      self.branch7x7dbl_3,
      self.branch7x7dbl_4,
      self.branch7x7dbl_5,
    ):
      bd = layer(bd)
    bp = self.branch_pool(avg_pool_exclude_pad(x))
    return _cat([b1, b7, bd, bp])


class InceptionD(nnx.Module):
  """Mixed_7a (grid reduction 17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool 3x3/2."""

  def __init__(self, cin: int, **kw):
    self.branch3x3_1 = BasicConv2d(cin, 192, 1, **kw)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, **kw)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, 1, **kw)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), **kw)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), **kw)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, **kw)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return _cat([b3, b7, max_pool(x, 3, 2)])


class InceptionE(nnx.Module):
  """Mixed_7b / Mixed_7c. `pool="avg"`: pytorch-fid `FIDInceptionE_1` (average pool excluding the pad);
  `pool="max"`: `FIDInceptionE_2` (3x3 stride-1 max pool, a quirk of the TF graph kept for FID compatibility)."""

  def __init__(self, cin: int, *, pool: str, **kw):
    if pool not in ("avg", "max"):
      raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    self.branch1x1 = BasicConv2d(cin, 320, 1, **kw)
    self.branch3x3_1 = BasicConv2d(cin, 384, 1, **kw)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1, **kw)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, **kw)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), **kw)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), **kw)
    self.branch_pool = BasicConv2d(cin, 192, 1, **kw)

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = _cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)])
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = _cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)])
    pooled = max_pool(x, 3, 1, pad=1) if self.pool == "max" else avg_pool_exclude_pad(x)
    return _cat([b1, b3, bd, self.branch_pool(pooled)])


def _zeros_init(key, shape, dtype=jnp.float32):
  del key
  return jnp.asarray(np.zeros(shape, np.float32), dtype)


# ------------------------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------------------------
class FIDInception(nnx.Module):
  """FID Inception-v3. `__call__(x)` with x (N, 299, 299, 3) in [-1, 1] (NHWC) returns
  `{"pool3": (N, 2048), "logits_unbiased": (N, 1008), "logits": (N, 1008)}` (float32; float64 for a float64
  model under `jax.enable_x64`).

  Other spatial sizes run too (the network is convolutional up to the global average pool), but the FID / IS
  conventions are defined at 299x299."""

  def __init__(
    self,
    cfg: InceptionConfig | None = None,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs | None = None,
  ):
    cfg = cfg or InceptionConfig()
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.config = cfg
    self.dtype = dtype
    kw = dict(cfg=cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = InceptionA(192, 32, **kw)
    self.Mixed_5c = InceptionA(256, 64, **kw)
    self.Mixed_5d = InceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = InceptionC(768, 128, **kw)
    self.Mixed_6c = InceptionC(768, 160, **kw)
    self.Mixed_6d = InceptionC(768, 160, **kw)
    self.Mixed_6e = InceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = InceptionE(1280, pool="avg", **kw)
    self.Mixed_7c = InceptionE(2048, pool="max", **kw)
    self.fc = nnx.Linear(
      POOL3_DIM,
      cfg.num_classes,
      dtype=dtype,
      param_dtype=param_dtype,
      precision=cfg.precision,
      kernel_init=fan_in_normal,
      bias_init=_zeros_init,
      rngs=rngs,
    )

  def features_map(self, x):
    """(N, H, W, 3) in [-1, 1] -> the (N, H', W', 2048) Mixed_7c output (8x8 at 299x299)."""
    x = x.astype(self.dtype)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = max_pool(x, 3, 2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = max_pool(x, 3, 2)
    for block in (
      self.Mixed_5b,
      self.Mixed_5c,
      self.Mixed_5d,
      self.Mixed_6a,
      self.Mixed_6b,
      self.Mixed_6c,
      self.Mixed_6d,
      self.Mixed_6e,
      self.Mixed_7a,
      self.Mixed_7b,
      self.Mixed_7c,
    ):
      x = block(x)
    return x

  def __call__(self, x) -> dict[str, jax.Array]:
    # the global average pool and the classifier run in (at least) float32 whatever the compute dtype
    acc = jnp.promote_types(self.dtype, jnp.float32)
    pool3 = jnp.mean(self.features_map(x).astype(acc), axis=(1, 2))
    kernel = self.fc.kernel[...].astype(acc)
    unbiased = jnp.dot(pool3, kernel, precision=self.config.precision)
    logits = unbiased + self.fc.bias[...].astype(acc)
    return {"pool3": pool3, "logits_unbiased": unbiased, "logits": logits}
