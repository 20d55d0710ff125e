"""hps_jax.data.preprocess: pad-mode geometry (exact), clip-mode parity with transformers.CLIPImageProcessor.

Measured clip-mode differences (transformers 5.x, 224 px, images of 10 sizes from 50x60 to 1000x97):
  * vs ``CLIPImageProcessorPil`` (PIL backend, same resampler): max |diff| 4.8e-7, i.e. float32 rounding only;
    asserted <= 1e-5.
  * vs ``CLIPImageProcessor`` (the default torchvision backend: antialiased bicubic on uint8 tensors): identical
    geometry, but the uint8 resampler rounds differently from PIL on ~0.4-0.9 % of values, by 1 level (at most
    2 levels for upscaled inputs): max |diff| 0.030 in normalized units (2 / 255 / std), mean |diff| ~1e-4.
    Asserted: <= 2 uint8 levels after de-normalization, max |diff| <= 0.031, mean |diff| <= 3e-4, < 2 % of
    values differing at all.
"""

import dataclasses

import numpy as np
import pytest
from PIL import Image

from hps_jax.data.preprocess import (
  CLIP_MEAN,
  CLIP_STD,
  PreprocessConfig,
  denormalize,
  normalize,
  preprocess,
  preprocess_batch,
  resize_pad,
)

SIZE = 224


def _natural(h, w, seed=0):
  """Smooth colour gradients plus noise, a stand-in for natural images."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  base = np.stack([128 + 100 * np.sin(x / w * 3 + c) * np.cos(y / h * 2 + 0.7 * c) for c in range(3)], -1)
  base += rng.normal(0, 20, (h, w, 3))
  return np.clip(base, 0, 255).astype(np.uint8)


def _content_box(h, w, size=SIZE):
  return (size - h) // 2, (size - w) // 2


# ------------------------------------------------------------------------------------------------------- pad

SHAPES = [
  (1, 1),
  (2, 3),
  (10, 300),
  (300, 10),
  (224, 224),
  (224, 100),
  (100, 224),
  (223, 225),
  (225, 224),
  (224, 225),
  (500, 500),
  (1000, 37),
  (37, 1000),
  (57, 91),
  (1080, 1920),
  (600, 601),
]


@pytest.mark.parametrize("shape", SHAPES)
def test_pad_always_square(shape):
  out = preprocess(_natural(*shape), mode="pad")
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.float32


@pytest.mark.parametrize("shape", [s for s in SHAPES if max(s) <= SIZE])
@pytest.mark.parametrize("fill", [0, 255, (255, 128, 7)])
def test_pad_fitting_content_unscaled_and_padding_exact(shape, fill):
  h, w = shape
  img = _natural(h, w, seed=h * 1000 + w)
  out = preprocess(img, mode="pad", fill=fill)
  top, left = _content_box(h, w)
  pixels = denormalize(out)
  np.testing.assert_array_equal(pixels[top : top + h, left : left + w], img)  # content copied unchanged
  np.testing.assert_array_equal(out[top : top + h, left : left + w], normalize(img))
  mask = np.ones((SIZE, SIZE), bool)
  mask[top : top + h, left : left + w] = False
  pad_value = PreprocessConfig(fill=fill).pad_value()
  fill3 = np.broadcast_to(np.asarray(fill, np.float32), (3,))
  np.testing.assert_allclose(pad_value, (fill3 / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-6)
  if mask.any():
    assert np.array_equal(out[mask], np.broadcast_to(pad_value, out[mask].shape))  # bit-identical padding
  else:
    assert shape == (SIZE, SIZE)


def test_pad_placement_odd_margins():
  # 1x1 at the centre (margin 223 on each axis: 111 before, 112 after)
  g = resize_pad(np.full((1, 1, 3), 9, np.uint8), SIZE)
  assert list(zip(*np.nonzero(g[..., 0]))) == [(111, 111)]
  # 223 wide: the single spare column is on the right
  g = resize_pad(np.full((224, 223, 3), 9, np.uint8), SIZE)
  assert (g[:, :223] == 9).all() and (g[:, 223] == 0).all()
  # 2 tall, 224 wide: 111 rows above, 111 below
  g = resize_pad(np.full((2, 224, 3), 9, np.uint8), SIZE)
  rows = np.nonzero(g[:, 0, 0])[0]
  assert rows.tolist() == [111, 112]


@pytest.mark.parametrize(
  "shape,content",
  [
    ((500, 500), (224, 224)),
    ((1000, 37), (224, 8)),
    ((37, 1000), (8, 224)),
    ((1080, 1920), (126, 224)),
    ((601, 600), (224, 224)),
    ((225, 224), (224, 223)),
    ((5000, 3), (224, 1)),
    ((300, 200), (224, 149)),
  ],
)
def test_pad_resizes_longest_edge_to_size(shape, content):
  h, w = shape
  img = np.full((h, w, 3), 200, np.uint8)  # constant: bicubic keeps it exactly 200, so the box is exact
  g = resize_pad(img, SIZE)
  ys, xs = np.nonzero(g[..., 0])
  box = (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1)
  assert box == content
  assert max(box) == SIZE
  top, left = _content_box(*content)
  assert (ys.min(), xs.min()) == (top, left)
  assert (g[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] == 200).all()


def test_pad_resized_content_matches_pil_bicubic():
  img = _natural(600, 400, seed=5)
  g = resize_pad(img, SIZE)
  nw = round(400 * SIZE / 600)  # 149
  want = np.asarray(Image.fromarray(img).resize((nw, SIZE), Image.Resampling.BICUBIC))
  left = (SIZE - nw) // 2
  np.testing.assert_array_equal(g[:, left : left + nw], want)
  assert (g[:, :left] == 0).all() and (g[:, left + nw :] == 0).all()


def test_pad_upscale_option():
  img = np.full((50, 100, 3), 77, np.uint8)
  g = resize_pad(img, SIZE, upscale=True)
  ys, xs = np.nonzero(g[..., 0])
  assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (112, 224)
  g = resize_pad(img, SIZE)  # default: not upscaled
  ys, xs = np.nonzero(g[..., 0])
  assert (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1) == (50, 100)


def test_pad_other_sizes_and_custom_normalization():
  img = _natural(30, 40)
  out = preprocess(img, mode="pad", size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
  assert out.shape == (64, 64, 3)
  top, left = _content_box(30, 40, 64)
  np.testing.assert_allclose(out[top : top + 30, left : left + 40], img / 127.5 - 1.0, atol=1e-6)
  assert (out[:top] == -1.0).all()


# ------------------------------------------------------------------------------------------------------ clip


def test_clip_geometry_small_cases():
  # a square image of exactly size: nothing but normalization
  img = _natural(SIZE, SIZE)
  np.testing.assert_array_equal(preprocess(img, mode="clip"), normalize(img))
  # short side already == size: no resize, pure centre crop at int((W - size) / 2)
  img = _natural(SIZE, 301)
  np.testing.assert_array_equal(preprocess(img, mode="clip"), normalize(img[:, 38 : 38 + SIZE]))
  # upscaled tiny image still yields size x size
  assert preprocess(np.zeros((1, 1, 3), np.uint8), mode="clip").shape == (SIZE, SIZE, 3)


CLIP_SHAPES = [
  (224, 224),
  (300, 400),
  (512, 512),
  (640, 360),
  (123, 457),
  (1000, 97),
  (97, 1000),
  (50, 60),
  (225, 224),
  (768, 1024),
  (333, 250),
]


def _hf_processor(cls):
  # default ViT-L/14 settings, constructed offline
  return cls(
    size={"shortest_edge": 224},
    crop_size={"height": 224, "width": 224},
    do_resize=True,
    do_center_crop=True,
    do_rescale=True,
    do_normalize=True,
    do_convert_rgb=True,
    image_mean=list(CLIP_MEAN),
    image_std=list(CLIP_STD),
    resample=3,
  )


def _hf(proc, img):
  pv = proc(images=img, return_tensors="np")["pixel_values"]
  return np.asarray(pv)[0].transpose(1, 2, 0)


def test_clip_matches_transformers_default_processor():
  transformers = pytest.importorskip("transformers")
  proc = _hf_processor(transformers.CLIPImageProcessor)
  worst_max, means, fracs = 0.0, [], []
  for i, shape in enumerate(CLIP_SHAPES):
    img = _natural(*shape, seed=i)
    ours = preprocess(img, mode="clip")
    ref = _hf(proc, img).astype(np.float32)
    assert ref.shape == ours.shape == (SIZE, SIZE, 3)
    diff = np.abs(ours - ref)
    levels = np.abs(denormalize(ours).astype(int) - denormalize(ref).astype(int))
    assert levels.max() <= 2, shape
    assert diff.max() <= 0.031, (shape, diff.max())
    worst_max = max(worst_max, float(diff.max()))
    means.append(float(diff.mean()))
    fracs.append(float((levels > 0).mean()))
  assert max(means) <= 3e-4, means
  assert max(fracs) < 0.02, fracs
  print(
    f"clip vs CLIPImageProcessor: max|diff| {worst_max:.4f}, mean|diff| {np.mean(means):.2e}, "
    f"values differing {100 * np.mean(fracs):.2f}%"
  )


def test_clip_matches_transformers_pil_processor_exactly():
  pytest.importorskip("transformers")
  try:
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
  except ImportError:  # transformers 4.x: CLIPImageProcessor itself is PIL-based
    from transformers import CLIPImageProcessor as cls
  proc = _hf_processor(cls)
  for i, shape in enumerate(CLIP_SHAPES):
    img = _natural(*shape, seed=i)
    ours = preprocess(img, mode="clip")
    ref = _hf(proc, img).astype(np.float32)
    assert np.abs(ours - ref).max() <= 1e-5, shape


# ---------------------------------------------------------------------------------------------- config / API


def test_config_frozen_hashable_and_equivalent():
  cfg = PreprocessConfig(mode="clip", size=64, mean=[0.1, 0.2, 0.3], std=np.array([0.5, 0.6, 0.7]), fill=(3, 3, 3))
  assert cfg.mean == (0.1, 0.2, 0.3) and isinstance(cfg.std, tuple) and cfg.fill == 3
  assert hash(cfg) == hash(PreprocessConfig("clip", 64, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7), 3))
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.size = 32
  img = _natural(70, 90)
  np.testing.assert_array_equal(cfg.apply(img), preprocess(img, "clip", 64, (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)))
  assert PreprocessConfig() == PreprocessConfig("pad", 224, CLIP_MEAN, CLIP_STD, 0)


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(mode="crop"),
    dict(size=0),
    dict(size=2.5),
    dict(std=(1, 0, 1)),
    dict(mean=(0.5, 0.5)),
    dict(fill=256),
    dict(fill=(1, 2)),
    dict(fill=0.5),
  ],
)
def test_config_validation(kwargs):
  with pytest.raises(ValueError):
    PreprocessConfig(**kwargs)


def test_batch():
  imgs = [_natural(*s, seed=i) for i, s in enumerate([(10, 20), (300, 200), (224, 224)])]
  for mode in ("pad", "clip"):
    batch = preprocess_batch(imgs, mode=mode)
    assert batch.shape == (3, SIZE, SIZE, 3) and batch.dtype == np.float32
    for b, im in zip(batch, imgs):
      np.testing.assert_array_equal(b, preprocess(im, mode=mode))
  assert preprocess_batch([], size=32).shape == (0, 32, 32, 3)
  cfg = PreprocessConfig(size=32)
  assert cfg.apply_batch(iter(imgs)).shape == (3, 32, 32, 3)


def test_non_uint8_inputs_go_through_load_image(tmp_path):
  img = _natural(40, 30)
  path = tmp_path / "x.png"
  Image.fromarray(img).save(path)
  want = preprocess(img)
  np.testing.assert_array_equal(preprocess(path), want)
  np.testing.assert_array_equal(preprocess(Image.fromarray(img)), want)
  np.testing.assert_array_equal(preprocess(img / 255.0), want)  # float in [0, 1], exact after rounding
  gray = img[..., 0]
  np.testing.assert_array_equal(preprocess(gray), preprocess(np.stack([gray] * 3, -1)))


def test_denormalize_roundtrip():
  img = np.arange(256 * 3, dtype=np.uint8).reshape(16, 16, 3)
  np.testing.assert_array_equal(denormalize(normalize(img)), img)
