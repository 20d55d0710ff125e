"""Image preprocessing for the CLIP / HPS image tower: ``uint8`` RGB in, normalized ``float32`` NHWC out.

Two modes, both producing a square ``(size, size, 3)`` ``float32`` array (channels-last, as the JAX model consumes
it) normalized as ``(pixel / 255 - mean) / std`` (CLIP mean/std by default):

``"clip"`` -- the OpenAI CLIP / ``transformers.CLIPImageProcessor`` pipeline:
  1. resize with PIL bicubic so the *short* side equals ``size``; the long side becomes
     ``int(size * long / short)`` (truncated, as ``transformers.image_transforms.get_resize_output_image_size``
     does). Images smaller than ``size`` are upscaled; an image whose short side already equals ``size`` is copied
     unchanged.
  2. center crop ``size x size`` at offset ``int((dim - size) / 2)`` (the extra pixel of an odd margin is dropped
     at the bottom/right), as ``CLIPImageProcessor.center_crop`` does.
  Measured against ``transformers.CLIPImageProcessor`` (5.x, torchvision backend, default ViT-L/14 settings):
  see ``tests/data/test_preprocess.py`` for the asserted tolerance.

``"pad"`` -- the HPS paper (HPSv2's ``ResizeMaxSize`` letterboxing), with two deliberate differences:
  1. if the *longest* edge is larger than ``size``, resize with PIL bicubic so it equals ``size`` exactly; the
     other edge becomes ``max(1, round(edge * size / longest))`` (Python ``round``, as HPSv2).
     An image whose longest edge is ``<= size`` is **not** resized (its pixels are copied unchanged), unless
     ``upscale=True``, which scales it up the same way (HPSv2 upscales small images).
  2. paste the content into a ``size x size`` canvas filled with ``fill`` (pixel value(s) in 0..255, *before*
     normalization; default 0 = black, as HPSv2), centered: ``top = (size - h) // 2``, ``left = (size - w) // 2``,
     so an odd margin puts the extra row/column at the bottom/right (HPSv2's padding order). The output is
     **always** square: HPSv2 skips the padding when no resize is needed (longest edge == size) and yields
     non-square tensors; that is not copied.

Use :func:`preprocess` / :func:`preprocess_batch` directly, or pass a frozen :class:`PreprocessConfig` around and
call ``config.apply(image)`` / ``config.apply_batch(images)``. Inputs other than a ``uint8`` ``(H, W, 3)`` array
(paths, bytes, PIL images, gray/RGBA/float arrays) are first converted by :func:`hps_jax.data.images.load_image`
with its defaults (alpha composited onto black).

numpy + PIL only (no torch / transformers).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from hps_jax.data.images import load_image

__all__ = [
  "CLIP_MEAN",
  "CLIP_STD",
  "MODES",
  "PreprocessConfig",
  "preprocess",
  "preprocess_batch",
  "resize_clip",
  "resize_pad",
  "normalize",
  "denormalize",
]

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
MODES = ("pad", "clip")

_BICUBIC = Image.Resampling.BICUBIC


def _as_rgb_uint8(image: Any) -> np.ndarray:
  if (
    isinstance(image, np.ndarray)
    and image.dtype == np.uint8
    and image.ndim == 3
    and image.shape[-1] == 3
    and image.shape[0] > 0
    and image.shape[1] > 0
  ):
    return image
  return load_image(image)


def _triple(name: str, value, *, positive: bool = False) -> tuple[float, float, float]:
  if isinstance(value, (int, float, np.integer, np.floating)):
    value = (value,) * 3
  out = tuple(float(v) for v in value)
  if len(out) != 3:
    raise ValueError(f"{name} must have 3 values (one per RGB channel), got {value!r}")
  if not all(np.isfinite(out)) or (positive and not all(v > 0 for v in out)):
    raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value!r}")
  return out


def _fill_triple(fill) -> tuple[int, int, int]:
  """Validates ``fill`` (an int or an (r, g, b) triple of ints in [0, 255]); returns the triple."""
  values = (fill,) * 3 if np.ndim(fill) == 0 else tuple(np.asarray(fill).ravel().tolist())
  ok = len(values) == 3 and all(
    isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v <= 255 for v in values
  )
  if not ok:
    raise ValueError(f"fill must be an int in [0, 255] or an (r, g, b) triple of such ints, got {fill!r}")
  return tuple(int(v) for v in values)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  if (height, width) == image.shape[:2]:
    return image
  return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), resample=_BICUBIC))


def resize_clip(image: np.ndarray, size: int = 224) -> np.ndarray:
  """``clip`` geometry on a uint8 (H, W, 3) array: short side -> ``size`` (bicubic), center crop. Returns uint8."""
  image = _as_rgb_uint8(image)
  h, w = image.shape[:2]
  if w <= h:
    nh, nw = int(size * h / w), size
  else:
    nh, nw = size, int(size * w / h)
  image = _resize(image, nh, nw)
  top, left = int((nh - size) / 2.0), int((nw - size) / 2.0)
  return image[top : top + size, left : left + size]


def resize_pad(image: np.ndarray, size: int = 224, fill=0, upscale: bool = False) -> np.ndarray:
  """``pad`` geometry on a uint8 (H, W, 3) array: fit the longest edge into ``size``, center on a square canvas
  filled with ``fill``. Returns uint8 ``(size, size, 3)``."""
  image = _as_rgb_uint8(image)
  fill = _fill_triple(fill)
  h, w = image.shape[:2]
  longest = max(h, w)
  if longest > size or (upscale and longest < size):
    scale = size / float(longest)
    nh, nw = (size, max(1, round(w * scale))) if h >= w else (max(1, round(h * scale)), size)
    nh, nw = min(nh, size), min(nw, size)
    image = _resize(image, nh, nw)
  h, w = image.shape[:2]
  canvas = np.empty((size, size, 3), dtype=np.uint8)
  canvas[...] = np.asarray(fill, dtype=np.uint8)
  top, left = (size - h) // 2, (size - w) // 2
  canvas[top : top + h, left : left + w] = image
  return canvas


def normalize(image: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """uint8 (..., 3) -> float32 ``(x / 255 - mean) / std``."""
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  return ((image.astype(np.float32) * np.float32(1.0 / 255.0) - mean) / std).astype(np.float32)


def denormalize(x: np.ndarray, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> np.ndarray:
  """Inverse of :func:`normalize`, rounded back to uint8 (exact for outputs of :func:`normalize`)."""
  pixels = (np.asarray(x, dtype=np.float64) * np.asarray(std, np.float64) + np.asarray(mean, np.float64)) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """Everything needed to turn an image into model input; hashable, so it can be a static JAX argument.

  ``fill`` is used by ``pad`` mode only; ``upscale`` (pad mode only) also scales images whose longest edge is
  smaller than ``size`` up to ``size`` (HPSv2 behaviour); by default they are padded unscaled.
  """

  mode: str = "pad"
  size: int = 224
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  fill: int | tuple[int, int, int] = 0
  upscale: bool = False

  def __post_init__(self):
    if self.mode not in MODES:
      raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
    if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) or self.size < 1:
      raise ValueError(f"size must be a positive int, got {self.size!r}")
    object.__setattr__(self, "size", int(self.size))
    object.__setattr__(self, "mean", _triple("mean", self.mean))
    object.__setattr__(self, "std", _triple("std", self.std, positive=True))
    fill = _fill_triple(self.fill)
    object.__setattr__(self, "fill", fill[0] if len(set(fill)) == 1 else fill)
    object.__setattr__(self, "upscale", bool(self.upscale))

  def geometry(self, image: Any) -> np.ndarray:
    """The resized/cropped/padded uint8 ``(size, size, 3)`` image, before normalization."""
    if self.mode == "clip":
      return resize_clip(image, self.size)
    return resize_pad(image, self.size, self.fill, self.upscale)

  def apply(self, image: Any) -> np.ndarray:
    """One image -> float32 ``(size, size, 3)``."""
    return normalize(self.geometry(image), self.mean, self.std)

  def apply_batch(self, images: Iterable[Any]) -> np.ndarray:
    """Images -> float32 ``(N, size, size, 3)`` (``N`` may be 0)."""
    out = [self.apply(im) for im in images]
    if not out:
      return np.zeros((0, self.size, self.size, 3), dtype=np.float32)
    return np.stack(out)

  def pad_value(self) -> np.ndarray:
    """The normalized float32 value of padding pixels (pad mode)."""
    return normalize(np.asarray(_fill_triple(self.fill), dtype=np.uint8), self.mean, self.std)


def preprocess(
  image: Any,
  mode: str = "pad",
  size: int = 224,
  mean: Sequence[float] = CLIP_MEAN,
  std: Sequence[float] = CLIP_STD,
  fill=0,
  upscale: bool = False,
) -> np.ndarray:
  """One image (uint8 (H, W, 3) array, or anything :func:`load_image` accepts) -> float32 ``(size, size, 3)``."""
  return PreprocessConfig(mode, size, mean, std, fill, upscale).apply(image)


def preprocess_batch(
  images: Iterable[Any],
  mode: str = "pad",
  size: int = 224,
  mean: Sequence[float] = CLIP_MEAN,
  std: Sequence[float] = CLIP_STD,
  fill=0,
  upscale: bool = False,
) -> np.ndarray:
  """Images -> float32 ``(N, size, size, 3)`` NHWC."""
  return PreprocessConfig(mode, size, mean, std, fill, upscale).apply_batch(images)
