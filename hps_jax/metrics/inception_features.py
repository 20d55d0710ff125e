"""Images -> FID Inception-v3 features (pool3, logits), with the two reference resizing conventions.

Input semantics. The canonical input is a uint8 array (N, H, W, 3), RGB, channels last, any H and W. Float arrays
are also accepted and are read as values in [0, 1] (the `hps_jax.data.images` convention) in both modes.

`resize="torch"` reproduces pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`:
  x = uint8 / 255 (float32, [0, 1]);  x = bilinear resize to 299x299 as `F.interpolate(x, (299, 299),
  mode="bilinear", align_corners=False)` (half-pixel centers, source index clamped at 0, no antialiasing);
  x = 2 * x - 1.

`resize="tf1"` reproduces torch-fidelity's `FeatureExtractorInceptionV3` (the TF1 graph's own preprocessing):
  x = uint8 cast to float32 (0..255);  x = TF1 `resize_bilinear(align_corners=False)`: source coordinate
  dst * (in / out) with *no* half-pixel offset, upper neighbour clamped to the last row/column, blended as
  `a + (b - a) * frac` (width first, then height);  x = (x - 128) / 128.
  Float [0, 1] inputs are multiplied by 255 first (exact for k / 255 up to float rounding).

The two modes give visibly different FID numbers for the same images (they sample different source positions); use
the one matching the reference you compare against (torch-fidelity / the original TF code: "tf1"; pytorch-fid:
"torch").

Neither resize is `jax.image.resize`: that one antialiases when downsampling, which neither reference does. The
sampling positions and weights are computed with numpy in float32 exactly as the references compute them, and the
resize is a gather plus a blend along each axis.
"""

from __future__ import annotations

import functools
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax.models.inception import INPUT_SIZE, POOL3_DIM, FIDInception

RESIZE_MODES = ("tf1", "torch")
FEATURE_KEYS = ("pool3", "logits_unbiased", "logits")


# ------------------------------------------------------------------------------------------------------------
# Sampling tables (numpy, float32, static shapes)
# ------------------------------------------------------------------------------------------------------------
def torch_bilinear_table(in_size: int, out_size: int):
  """(lo, hi, w_lo, w_hi) of torch's CPU `upsample_bilinear2d(align_corners=False)` along one axis, computed in
  float32 as torch does: scale = float(in) / out; src = scale * (dst + 0.5) - 0.5, clamped below at 0;
  lo = min(floor(src), in - 1); frac = clip(src - lo, 0, 1); hi = lo + 1 unless lo is the last index.

  torch's compiled kernel evaluates `scale * (dst + 0.5) - 0.5` as one fused multiply-add (a single rounding);
  a two-rounding float32 evaluation moves some source positions by one float32 ulp (weights off by up to ~4e-6
  for 80 -> 299). The product of two float32 values is exact in float64, so float64 arithmetic rounded once to
  float32 reproduces the FMA bit for bit."""
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  frac = np.clip(src - lo.astype(f32), f32(0), f32(1)).astype(f32)
  hi = lo + (lo < in_size - 1)
  return lo, hi, (f32(1) - frac).astype(f32), frac


def tf1_bilinear_table(in_size: int, out_size: int):
  """(lo, hi, frac) of TF1 `resize_bilinear(align_corners=False)` as torch-fidelity computes it: the scale
  in / out is a double rounded to float32; src = dst * scale in float32 (no half-pixel offset); lo = trunc(src);
  hi = min(lo + 1, in - 1); frac = src - lo."""
  f32 = np.float32
  scale = f32(in_size / out_size)
  src = (np.arange(out_size, dtype=f32) * scale).astype(f32)
  lo = src.astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo.astype(f32)).astype(f32)


def _bcast(v: np.ndarray, axis: int, ndim: int):
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return jnp.asarray(v.reshape(shape))


def resize_bilinear_torch(x, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
  """`F.interpolate(mode="bilinear", align_corners=False, antialias=False)` on NHWC float arrays."""
  for axis, out in ((2, size[1]), (1, size[0])):  # width, then height
    n = x.shape[axis]
    if n == out:
      continue  # the table is the identity then (src == dst exactly, weights 1 and 0)
    lo, hi, w_lo, w_hi = torch_bilinear_table(n, out)
    x = jnp.take(x, lo, axis=axis) * _bcast(w_lo, axis, x.ndim).astype(x.dtype) + jnp.take(x, hi, axis=axis) * _bcast(
      w_hi, axis, x.ndim
    ).astype(x.dtype)
  return x


def resize_bilinear_tf1(x, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)):
  """TF1 `tf.image.resize_bilinear(align_corners=False)` (torch-fidelity's
  `interpolate_bilinear_2d_like_tensorflow1x`) on NHWC float arrays: `a + (b - a) * frac`, width then height."""
  for axis, out in ((2, size[1]), (1, size[0])):
    n = x.shape[axis]
    if n == out:
      continue  # scale 1: frac is exactly 0
    lo, hi, frac = tf1_bilinear_table(n, out)
    a = jnp.take(x, lo, axis=axis)
    b = jnp.take(x, hi, axis=axis)
    x = a + (b - a) * _bcast(frac, axis, x.ndim).astype(x.dtype)
  return x


# ------------------------------------------------------------------------------------------------------------
# Preprocessing and extraction
# ------------------------------------------------------------------------------------------------------------
def _check_images(images):
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected images of shape (N, H, W, 3), got {tuple(images.shape)}")
  if not (images.dtype == jnp.uint8 or jnp.issubdtype(images.dtype, jnp.floating)):
    raise ValueError(f"expected uint8 or float images, got dtype {images.dtype}")


@functools.partial(jax.jit, static_argnames=("resize",))
def preprocess(images, resize: str = "tf1"):
  """(N, H, W, 3) uint8 (or float in [0, 1]) -> (N, 299, 299, 3) float32 in [-1, 1], the way the chosen reference
  prepares Inception inputs (see the module docstring)."""
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  _check_images(images)
  is_uint8 = images.dtype == jnp.uint8
  x = images.astype(jnp.float32)
  if resize == "torch":
    if is_uint8:
      x = x / 255.0
    x = resize_bilinear_torch(x)
    return 2.0 * x - 1.0
  if not is_uint8:
    x = x * 255.0
  x = resize_bilinear_tf1(x)
  return (x - 128.0) / 128.0


@nnx.jit
def _forward(model: FIDInception, x):
  return model(x)


def extract(model: FIDInception, images, resize: str = "tf1") -> dict[str, jax.Array]:
  """One batch: images (N, H, W, 3) -> {"pool3": (N, 2048), "logits_unbiased": (N, 1008), "logits": (N, 1008)}.

  Preprocessing (compiled per input shape) and the network (compiled once per batch size, on 299x299 inputs) are
  jitted separately so that mixed input sizes do not recompile the network."""
  return _forward(model, preprocess(jnp.asarray(images), resize=resize))


def features(
  model: FIDInception,
  images: np.ndarray | Iterable[np.ndarray],
  resize: str = "tf1",
  batch_size: int = 50,
  keys: tuple[str, ...] = ("pool3", "logits_unbiased"),
) -> dict[str, np.ndarray]:
  """Features of many images as numpy float32 arrays. `images` is an (N, H, W, 3) array or an iterable of such
  batches (each batch one size). Each array is cut into chunks of `batch_size` (the last one padded with copies of
  its last image) so that an array input compiles the network once."""
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  unknown = set(keys) - set(FEATURE_KEYS)
  if unknown:
    raise ValueError(f"unknown feature keys {sorted(unknown)}; available: {FEATURE_KEYS}")
  batches = [images] if hasattr(images, "shape") else images
  out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  for batch in batches:
    batch = np.asarray(batch)
    if batch.shape[0] == 0:
      continue
    bs = min(batch_size, batch.shape[0])
    for start in range(0, batch.shape[0], bs):
      chunk = batch[start : start + bs]
      n = chunk.shape[0]
      if n < bs:  # pad with copies of the last image; the padded rows are dropped below
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - n, axis=0)], axis=0)
      res = extract(model, chunk, resize)
      for k in keys:
        out[k].append(np.asarray(res[k][:n], np.float32))
  dims = {"pool3": POOL3_DIM, "logits_unbiased": model.config.num_classes, "logits": model.config.num_classes}
  return {k: np.concatenate(v) if v else np.zeros((0, dims[k]), np.float32) for k, v in out.items()}
