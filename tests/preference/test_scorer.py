"""The Scorer API end to end: checkpoint -> preprocessing -> tokenizer -> sharded, bucketed jit -> HPS, against
the PyTorch reference model fed the same inputs."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.tokenizer import CLIPTokenizer
from hps_jax.models.clip import CLIPConfig
from hps_jax.preference.scorer import AestheticScorer, Scorer, make_buckets
from tests.refs import features, hf_clip

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

PROMPTS = [
  "a red circle",
  "an astronaut riding a horse",
  "Weird image. a bowl of fruit",
  "",
  "a very long prompt " * 20,
  "café au lait &amp; croissant",
]


def _images(n, seed=0):
  """uint8 RGB images of varied sizes and aspect ratios (some larger than the input, some smaller)."""
  rng = np.random.default_rng(seed)
  shapes = [(40, 24), (17, 33), (32, 32), (64, 80), (9, 50), (120, 31)]
  return [rng.integers(0, 256, shapes[i % len(shapes)] + (3,), dtype=np.uint8) for i in range(n)]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
  cfg = CLIPConfig.tiny()
  ref = hf_clip(cfg, seed=5)
  d = tmp_path_factory.mktemp("ckpt") / "hf"
  ref.save_pretrained(d)
  return ref, d


def _reference_hps(ref, images, prompts, preprocess="pad"):
  pre = PreprocessConfig(mode=preprocess, size=ref.config.vision_config.image_size)
  pixels = np.stack([pre.apply(Image.fromarray(im)) for im in images]).transpose(0, 3, 1, 2)
  ids = CLIPTokenizer.default()(prompts, context_length=77)
  with torch.no_grad():
    img = features(ref.get_image_features(pixel_values=torch.from_numpy(pixels)))
    txt = features(ref.get_text_features(input_ids=torch.from_numpy(ids).long()))
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  return 100 * (img * txt).sum(-1)


@pytest.mark.parametrize("preprocess", ["pad", "clip"])
def test_hps_matches_reference(hf_checkpoint, preprocess, parity):
  ref, d = hf_checkpoint
  scorer = Scorer.from_checkpoint(d, preprocess=preprocess, batch_size=4)
  images = _images(len(PROMPTS))
  got = scorer.score(images, PROMPTS)
  want = _reference_hps(ref, images, PROMPTS, preprocess)
  assert got.shape == (len(PROMPTS),)
  parity(f"Scorer.score ({preprocess}) vs transformers on the same pixels/ids: HPS", np.abs(got - want).max(), 1e-3)
  np.testing.assert_allclose(scorer.cosine(images, PROMPTS), got / 100, rtol=1e-6)
  # iter_scores streams the same numbers
  rows = list(scorer.iter_scores(zip(images, PROMPTS)))
  np.testing.assert_allclose([r["hps"] for r in rows], got, rtol=1e-6)


def test_input_kinds_give_identical_scores(hf_checkpoint, tmp_path):
  _, d = hf_checkpoint
  scorer = Scorer.from_checkpoint(d, batch_size=4)
  arr = _images(1, seed=3)[0]
  path = tmp_path / "img.png"
  Image.fromarray(arr).save(path)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  kinds = [arr, Image.fromarray(arr), str(path), path, buf.getvalue()]
  pixels = scorer.prepare_images(kinds)
  assert all(np.array_equal(pixels[0], p) for p in pixels[1:])  # every kind decodes to the same input
  scores = scorer.score(kinds, "a red circle")
  # HPS = 100 * cos is ~26 here, where a float32 ulp is 1.9e-6; the five rows run as a bucket-4 chunk and a bucket-1
  # chunk (different programs), whose cosines may differ in their last bits: ~1e-5 in HPS (1.14e-5 seen). So the
  # bound is float32 resolution at this scale, 1e-4 absolute, not a few ulps.
  assert np.ptp(scores) <= 1e-4, scores
  # a single image (not a list) and a 4-d uint8 batch are accepted too
  assert scorer.score(arr, "a red circle").shape == (1,)
  batch = np.stack([arr, arr])
  # other batch composition and padding: equal to float32 resolution at the HPS scale (~26), as above
  np.testing.assert_allclose(scorer.score(batch, "a red circle"), scores[:2], rtol=0, atol=1e-4)
  # embeddings are unit vectors and their dot product is the cosine
  e_img, e_txt = scorer.embed_images([arr]), scorer.embed_texts("a red circle")
  np.testing.assert_allclose(np.linalg.norm(e_img, axis=-1), 1, rtol=1e-5)
  np.testing.assert_allclose((e_img * e_txt).sum(-1) * 100, scores[:1], rtol=1e-5)


def test_prompt_broadcast_and_errors(hf_checkpoint):
  _, d = hf_checkpoint
  scorer = Scorer.from_checkpoint(d, batch_size=4)
  imgs = _images(3)
  one = scorer.score(imgs, "a red circle")
  np.testing.assert_array_equal(one, scorer.score(imgs, ["a red circle"] * 3))
  with pytest.raises(ValueError, match="got 2 prompts for 3 images"):
    scorer.score(imgs, ["a", "b"])
  with pytest.raises(TypeError, match="must be strings"):
    scorer.score(imgs, ["a", None, "c"])
  assert scorer.score([], []).shape == (0,)


def test_buckets_bound_compilations(hf_checkpoint):
  _, d = hf_checkpoint
  assert make_buckets(32, 1) == (1, 2, 8, 32)
  assert make_buckets(32, 8) == (8, 32)
  assert make_buckets(10, 4) == (4, 12)
  scorer = Scorer.from_checkpoint(d, batch_size=8)
  assert scorer._cos.buckets == (1, 2, 8)
  imgs = _images(21)
  for n in (3, 5, 7, 8, 21, 6, 4):  # all map to the 8 bucket (21 = 8 + 8 + 5)
    scorer.score(imgs[:n], "x")
  assert scorer.compiled_variants == 1
  scorer.score(imgs[:1], "x")
  scorer.score(imgs[:2], "x")
  scorer.score(imgs[:1], "y")
  assert scorer.compiled_variants == 3
  # padding does not change results: scoring in different chunkings gives the same values, to float32 resolution at
  # the HPS scale (100 * cos, tens: ulp ~2e-6; the bucket-2 and bucket-8 programs may round the cosine differently)
  np.testing.assert_allclose(scorer.score(imgs[:2], "x"), scorer.score(imgs[:8], "x")[:2], rtol=0, atol=1e-4)


def test_sharded_over_eight_devices_equals_one(hf_checkpoint, tmp_path):
  """The same scores with the batch sharded over 8 (simulated) devices as on one."""
  _, d = hf_checkpoint
  imgs = _images(11, seed=7)
  np.save(tmp_path / "imgs.npy", np.array(imgs, dtype=object), allow_pickle=True)
  single = Scorer.from_checkpoint(d, batch_size=16).score(imgs, "a red circle")
  code = textwrap.dedent(f"""
      import json, numpy as np, jax
      from hps_jax.preference.scorer import Scorer
      imgs = list(np.load({str(tmp_path / "imgs.npy")!r}, allow_pickle=True))
      s = Scorer.from_checkpoint({str(d)!r}, batch_size=16)
      out = s.score(imgs, "a red circle")
      print(json.dumps({{"devices": jax.device_count(), "buckets": list(s._cos.buckets), "hps": out.tolist()}}))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  got = json.loads(res.stdout.strip().splitlines()[-1])
  assert got["devices"] == 8 and got["buckets"] == [8, 16]
  np.testing.assert_allclose(got["hps"], single, rtol=0, atol=1e-4)


def test_aesthetic_scorer_end_to_end(aesthetic_weights, tmp_path, parity):
  """CLIP image embedding (normalized) -> MLP head, against transformers CLIP + the torch head on the same pixels."""
  from tests.models.test_aesthetic import reference_mlp

  cfg = CLIPConfig.tiny().replace(embed_dim=768)
  ref = hf_clip(cfg, seed=9)
  ref.save_pretrained(tmp_path / "clip")
  mlp_path = aesthetic_weights / "sac+logos+ava1-l14-linearMSE.pth"
  scorer = AestheticScorer.from_checkpoint(mlp_path, tmp_path / "clip", batch_size=4)
  images = _images(5, seed=4)
  got = scorer.score(images)
  pre = PreprocessConfig(mode="clip", size=cfg.image_size)
  pixels = np.stack([pre.apply(Image.fromarray(im)) for im in images]).transpose(0, 3, 1, 2)
  head = reference_mlp("linear")
  head.load_state_dict(torch.load(mlp_path, map_location="cpu", weights_only=True))
  with torch.no_grad():
    emb = ref.get_image_features(pixel_values=torch.from_numpy(pixels))
    emb = getattr(emb, "pooler_output", emb)
    want = head.layers(emb / emb.norm(dim=-1, keepdim=True))[:, 0].numpy()
  assert got.shape == (5,)
  parity("AestheticScorer (CLIP + real linear head) vs torch", np.abs(got - want).max(), 1e-4)
  rows = list(scorer.iter_scores(images[:2] + [b"not an image"]))
  assert "error" in rows[2] and abs(rows[0]["aesthetic"] - want[0]) <= 1e-4
  from flax import nnx

  from hps_jax.convert.aesthetic import load_aesthetic
  from hps_jax.models.clip import CLIP

  with pytest.raises(ValueError, match="768-d"):  # the published heads need a 768-d (ViT-L/14) embedding
    AestheticScorer(CLIP(CLIPConfig.tiny(), rngs=nnx.Rngs(0)), load_aesthetic(mlp_path))
