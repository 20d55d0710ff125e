"""Parity of the NNX CLIP against transformers and open_clip on the same random weights, for every format."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.convert import clip as cc
from hps_jax.convert.io import CheckpointError
from hps_jax.models.clip import CLIPConfig, normalize
from tests.refs import features, hf_clip, open_clip_model, random_images

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")

PROMPTS = [
  "a photo of a cat",
  "",
  "an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation " * 4,
  "Weird image. a bowl of fruit",
]
CONFIGS = {"tiny_quickgelu": CLIPConfig.tiny(), "small_gelu": CLIPConfig.small()}
TOL = 1e-4


def _tokens(n=None):
  return open_clip.tokenize(PROMPTS[: len(PROMPTS) if n is None else n]).numpy().astype(np.int32)


def _ours(model, images, ids):
  return np.asarray(model.encode_image(jnp.asarray(images))), np.asarray(model.encode_text(jnp.asarray(ids)))


def _hps(img, txt):
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  return 100 * (img * txt).sum(-1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_dir_parity(name, tmp_path, parity):
  cfg = CONFIGS[name]
  ref = hf_clip(cfg, seed=1)
  ref.save_pretrained(tmp_path / "hf")
  model = cc.load_clip(tmp_path / "hf")
  assert model.config == cfg.replace(logit_scale_init=model.config.logit_scale_init)
  images, ids = random_images(len(PROMPTS), cfg.image_size, seed=2), _tokens()
  with torch.no_grad():
    ri = features(ref.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))))
    rt = features(ref.get_text_features(input_ids=torch.from_numpy(ids).long()))
  oi, ot = _ours(model, images, ids)
  parity(f"transformers CLIPModel {name}: image embedding", np.abs(oi - ri).max(), TOL)
  parity(f"transformers CLIPModel {name}: text embedding", np.abs(ot - rt).max(), TOL)
  parity(f"transformers CLIPModel {name}: HPS", np.abs(_hps(oi, ot) - _hps(ri, rt)).max(), 1e-3)
  np.testing.assert_allclose(float(model.logit_scale[...]), float(ref.logit_scale.detach()), rtol=0, atol=0)


def test_hf_pytorch_bin_and_bare_state_dict(tmp_path):
  """pytorch_model.bin dirs, and HF-key state dicts without config.json (architecture from shapes, which
  implies 64-wide heads as in every released CLIP)."""
  cfg = CONFIGS["tiny_quickgelu"]
  ref = hf_clip(cfg, seed=3)
  d = tmp_path / "bin"
  d.mkdir()
  (d / "config.json").write_text(json.dumps(ref.config.to_dict()))
  torch.save(ref.state_dict(), d / "pytorch_model.bin")
  torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, tmp_path / "bare.pt")
  images, ids = random_images(2, cfg.image_size, seed=4), _tokens(2)
  with torch.no_grad():
    ri = features(ref.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))))
    rt = features(ref.get_text_features(input_ids=torch.from_numpy(ids).long()))
  for path, fmt in ((d, "hf"), (tmp_path / "bare.pt", "auto")):
    oi, ot = _ours(cc.load_clip(path, fmt), images, ids)
    assert np.abs(oi - ri).max() <= TOL and np.abs(ot - rt).max() <= TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_hf_round_trip_bit_identical(name):
  cfg = CONFIGS[name]
  sd = {k: v.numpy() for k, v in hf_clip(cfg, seed=5).state_dict().items() if not k.endswith("position_ids")}
  back = cc.params_to_hf(cc.params_from_hf(sd, cfg), cfg)
  assert set(back) == set(sd)
  for k in sd:
    assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape, k
    assert np.array_equal(back[k], sd[k]), k
  # and through the NNX model and the safetensors writer
  model = cc.build_model(cfg, cc.params_from_hf(sd, cfg))
  again = cc.params_to_hf(cc.model_params(model), cfg)
  assert all(np.array_equal(again[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_open_clip_parity(name, tmp_path, parity):
  """HPS v2 layout: {'state_dict': open_clip state dict}, loaded as open_clip (and as auto with the activation)."""
  cfg = CONFIGS[name]
  ref = open_clip_model(cfg, seed=6)
  path = tmp_path / "HPS_v2_compressed.pt"
  torch.save({"state_dict": ref.state_dict(), "epoch": 1}, path)
  images, ids = random_images(len(PROMPTS), cfg.image_size, seed=7), _tokens()
  with torch.no_grad():
    ri = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
    rt = ref.encode_text(torch.from_numpy(ids).long()).numpy()
  model = cc.load_clip(path, "open_clip", activation=cfg.activation)
  assert model.config.activation == cfg.activation
  oi, ot = _ours(model, images, ids)
  parity(f"open_clip CLIP (HPS v2 layout) {name}: image embedding", np.abs(oi - ri).max(), TOL)
  parity(f"open_clip CLIP (HPS v2 layout) {name}: text embedding", np.abs(ot - rt).max(), TOL)
  parity(f"open_clip CLIP (HPS v2 layout) {name}: HPS", np.abs(_hps(oi, ot) - _hps(ri, rt)).max(), 1e-3)


def test_openai_layout_hpc_pt(tmp_path, parity):
  """HPS v1 `hpc.pt`: {'state_dict': OpenAI CLIP keys with a DDP `module.` prefix}; the reference is open_clip's
  builder for OpenAI state dicts (QuickGELU), i.e. the OpenAI architecture."""
  cfg = CONFIGS["tiny_quickgelu"]  # OpenAI layout implies heads = width // 64
  src = open_clip_model(cfg, seed=8).state_dict()
  ref = open_clip.model.build_model_from_openai_state_dict(dict(src), quick_gelu=True, cast_dtype=None).float()
  ref.load_state_dict(src)  # the builder rounds weights through fp16 (as OpenAI's release is); restore fp32 values
  torch.save({"state_dict": {"module." + k: v for k, v in src.items()}, "optimizer": {}}, tmp_path / "hpc.pt")
  images, ids = random_images(3, cfg.image_size, seed=9), _tokens(3)
  with torch.no_grad():
    ri = ref.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).float().numpy()
    rt = ref.encode_text(torch.from_numpy(ids).long()).float().numpy()
  for fmt in ("openai", "auto"):
    model = cc.load_clip(tmp_path / "hpc.pt", fmt)
    assert model.config.activation == "quick_gelu"
    oi, ot = _ours(model, images, ids)
    parity(f"OpenAI layout hpc.pt ({fmt}): image embedding", np.abs(oi - ri).max(), TOL)
    parity(f"OpenAI layout hpc.pt ({fmt}): text embedding", np.abs(ot - rt).max(), TOL)
    parity(f"OpenAI layout hpc.pt ({fmt}): HPS", np.abs(_hps(oi, ot) - _hps(ri, rt)).max(), 1e-3)
  # the inverse map reproduces the OpenAI state dict exactly
  flat = cc.params_from_openai({k: v.numpy() for k, v in src.items()}, cfg)
  back = cc.params_to_openai(flat, cfg)
  assert all(np.array_equal(back[k], src[k].numpy()) for k in back)


def test_activation_matters_and_auto_choice():
  """Loading QuickGELU weights with GELU changes the embeddings: the pitfall the format switch guards against."""
  cfg = CONFIGS["tiny_quickgelu"]
  sd = {k: v.numpy() for k, v in open_clip_model(cfg, seed=10).state_dict().items()}
  flat = cc.params_from_openai(sd, cfg)
  images = jnp.asarray(random_images(2, cfg.image_size))
  a = np.asarray(cc.build_model(cfg, flat).encode_image(images))
  b = np.asarray(cc.build_model(cfg.replace(activation="gelu"), flat).encode_image(images))
  assert np.abs(a - b).max() > 1e-3
  assert cc.default_activation(1024) == "quick_gelu" and cc.default_activation(1280) == "gelu"
  assert cc.infer_openai_config(sd, fmt="open_clip").activation == "gelu"
  assert cc.infer_openai_config(sd, fmt="openai").activation == "quick_gelu"


def test_bf16_compute_close_to_fp32(tmp_path):
  cfg = CONFIGS["small_gelu"]
  flat = cc.params_from_hf({k: v.numpy() for k, v in hf_clip(cfg, seed=11).state_dict().items()}, cfg)
  images, ids = random_images(2, cfg.image_size), _tokens(2)
  f32 = [np.asarray(normalize(x)) for x in _ours(cc.build_model(cfg, flat), images, ids)]
  b16 = [np.asarray(normalize(x)) for x in _ours(cc.build_model(cfg, flat, dtype=jnp.bfloat16), images, ids)]
  cos = [float((a * b).sum(-1).min()) for a, b in zip(f32, b16)]
  assert min(cos) > 0.99, cos


def test_bad_checkpoints(tmp_path):
  with pytest.raises(CheckpointError, match="no such file"):
    cc.load_clip(tmp_path / "missing.pt")
  (tmp_path / "empty.pt").write_bytes(b"")
  with pytest.raises(CheckpointError, match="empty"):
    cc.load_clip(tmp_path / "empty.pt")
  (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
  with pytest.raises(CheckpointError, match="junk.pt"):
    cc.load_clip(tmp_path / "junk.pt")
  cfg = CONFIGS["tiny_quickgelu"]
  sd = {k: v for k, v in open_clip_model(cfg).state_dict().items()}
  sd["visual.extra.weight"] = torch.zeros(3)
  torch.save(sd, tmp_path / "extra.pt")
  with pytest.raises(CheckpointError, match="unexpected keys"):
    cc.load_clip(tmp_path / "extra.pt")
  del sd["visual.extra.weight"], sd["ln_final.bias"]
  torch.save(sd, tmp_path / "missing_key.pt")
  with pytest.raises(CheckpointError, match="ln_final.bias"):
    cc.load_clip(tmp_path / "missing_key.pt")
  with pytest.raises(CheckpointError, match="layout"):
    cc.load_clip(tmp_path / "extra.pt", "hf")
