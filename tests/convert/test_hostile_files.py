"""Untrusted checkpoints and model configs (hps_jax/convert): every hostile file is one `CheckpointError` (an
`InputError`: exit 2) naming the file and what was expected, raised before memory is committed. Configs are checked
against sane bounds and against the shapes in the weights file's header; sharded indexes cannot reach outside their
folder; truncated / random / crafted safetensors and pickles are refused; NaN weights load with a warning. The files
are generated here in their real formats (safetensors.numpy, torch.save, hand-made pickles and zips)."""

import json
import os
import pickle
import re
import struct
import subprocess
import sys
import textwrap
import time
import warnings
import zipfile

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from hps_jax.convert import clip as cc
from hps_jax.convert import diffusers as cd
from hps_jax.convert import lora as lora_io
from hps_jax.convert.aesthetic import load_aesthetic
from hps_jax.convert.inception import check_inception_state_dict, expected_shapes
from hps_jax.convert.io import (
  CheckpointError,
  NonFiniteWeightsWarning,
  TensorInfo,
  load_state_dict,
  save_safetensors,
  tensor_info,
)
from hps_jax.errors import InputError
from hps_jax.models.clip import CLIP, CLIPConfig, CLIPTextEncoder
from hps_jax.models.unet import UNet2DConditionModel, UNetConfig
from hps_jax.models.vae import AutoencoderKL, VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = CLIPConfig.tiny(vocab_size=1000, context_length=16, vision_layers=2, text_layers=2)


def _flat(cls, cfg, seed=0):
  """Random parameters of `cls(cfg)` with the shapes of the abstract model (nothing initialized)."""
  abstract = nnx.eval_shape(lambda: cls(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  return {
    "/".join(map(str, p)): (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
    for p, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
  }


@pytest.fixture(scope="module")
def clip_flat():
  return _flat(CLIP, CFG)


def _hf_dir(path, flat, config=None):
  path.mkdir(parents=True, exist_ok=True)
  save_safetensors(cc.params_to_hf(flat, CFG), path / "model.safetensors")
  (path / "config.json").write_text(json.dumps(config if config is not None else cc.config_to_hf(CFG)))
  return path


def _edit(conf: dict, section: str, key: str, value) -> dict:
  conf = json.loads(json.dumps(conf))
  (conf[section] if section else conf)[key] = value
  return conf


# ------------------------------------------------------------------------------------------------------------
# Hugging Face CLIP config.json
# ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
  "section, key, value, match",
  [
    ("vision_config", "num_hidden_layers", 10_000_000, r"vision_config\.num_hidden_layers = 10000000 is out of range"),
    ("vision_config", "hidden_size", 10**9, r"vision_config\.hidden_size = 1000000000 is out of range"),
    ("text_config", "hidden_size", -64, r"text_config\.hidden_size = -64 is out of range"),
    ("text_config", "num_attention_heads", "2", r"text_config\.num_attention_heads is not an integer"),
    ("vision_config", "intermediate_size", 512.0, r"vision_config\.intermediate_size is not an integer"),
    ("", "projection_dim", None, r"projection_dim is not an integer"),
    ("", "vision_config", [1, 2], r"vision_config is list"),
    ("text_config", "hidden_act", ["gelu"], r"unsupported CLIP activations"),
    ("text_config", "layer_norm_eps", "tiny", r"text_config\.layer_norm_eps = 'tiny' is not a finite number"),
    ("text_config", "eos_token_id", "</s>", r"eos_token_id '</s>' is not a single token id"),
    ("vision_config", "num_attention_heads", 3, r"vision width 128 is not divisible by 3 heads"),
    # in range, but not what the weights hold: named with the tensor that shows it
    (
      "vision_config",
      "num_hidden_layers",
      3,
      r"vision_config\.num_hidden_layers = 3 does not match the weights .*model\.safetensors: 2 vision layers",
    ),
    (
      "vision_config",
      "hidden_size",
      192,
      r"vision_config\.hidden_size = 192 does not match .*patch_embedding\.weight has shape \(128, 3, 8, 8\)",
    ),
    (
      "text_config",
      "max_position_embeddings",
      77,
      r"text_config\.max_position_embeddings = 77 does not match .*position_embedding\.weight has shape \(16, 128\)",
    ),
    ("", "projection_dim", 64, r"projection_dim = 64 does not match .*text_projection\.weight has shape \(32, 128\)"),
  ],
)
def test_hf_config_values_are_checked(tmp_path, clip_flat, section, key, value, match):
  d = _hf_dir(tmp_path / "clip", clip_flat, _edit(cc.config_to_hf(CFG), section, key, value))
  with pytest.raises(CheckpointError, match=match) as e:
    cc.load_clip(d)
  assert str(d / "config.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
  "text, match",
  [
    (b"\x89PNG\r\n\x1a\n\x00\x00garbage", "not valid JSON"),
    (b"", "not valid JSON"),
    (b"[1, 2, 3]", "holds an array; expected a transformers clip config"),
    (b'"clip"', "holds a string"),
    (b"[" * 100_000 + b"]" * 100_000, "(nested too deeply|not valid JSON)"),
    (b'{"projection_dim": NaN}', "NaN is not a JSON number"),
    (b'{"model_type": "bert"}', "model_type 'bert' is not 'clip'"),
  ],
)
def test_hf_config_file_is_checked(tmp_path, clip_flat, text, match):
  d = _hf_dir(tmp_path / "clip", clip_flat)
  (d / "config.json").write_bytes(text)
  with pytest.raises(CheckpointError, match=match) as e:
    cc.load_clip_params(d)
  assert str(d / "config.json") in str(e.value)


def test_hf_dir_still_loads(tmp_path, clip_flat):
  cfg, flat = cc.load_clip_params(_hf_dir(tmp_path / "clip", clip_flat))
  assert cfg == CFG and all(np.array_equal(flat[k], v) for k, v in clip_flat.items())


_MEMORY_CHILD = """
import json, sys
import jax.numpy as jnp
from hps_jax.convert.clip import load_clip
from hps_jax.convert.diffusers import load_unet
from hps_jax.convert.io import CheckpointError

def status(field):
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))

jnp.zeros(1).block_until_ready()  # the backend's own memory is not the loader's
try:  # reset the high-water mark to the current RSS (Linux >= 4.0; harmless where refused)
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
except OSError:
  pass
base = status("VmRSS")
errors = []
for kind, path in (a.split(":", 1) for a in sys.argv[1:]):
  try:
    (load_clip if kind == "clip" else load_unet)(path, **({} if kind == "clip" else {"subfolder": None}))
    errors.append("loaded")
  except CheckpointError as e:
    errors.append(str(e))
print(json.dumps({"growth": status("VmHWM") - base, "errors": errors}))
"""


def test_hostile_configs_stay_small_and_fast(tmp_path, clip_flat):
  """The 10^7-layer config (and its friends) is refused in well under 1 GB and a few seconds: the bounds are checked
  before a key map or a model is made. Peak RSS is read from VmHWM in a fresh process (ru_maxrss would carry the
  parent's resident set over exec)."""
  conf = cc.config_to_hf(CFG)
  layers = _hf_dir(tmp_path / "layers", clip_flat, _edit(conf, "vision_config", "num_hidden_layers", 10_000_000))
  width = _hf_dir(tmp_path / "width", clip_flat, _edit(conf, "text_config", "hidden_size", 10**9))
  unet = tmp_path / "unet"
  unet.mkdir()
  save_file({"conv_in.weight": np.zeros((32, 4, 3, 3), np.float32)}, str(unet / "diffusion_pytorch_model.safetensors"))
  (unet / "config.json").write_text(json.dumps({**UNetConfig.tiny().to_diffusers(), "layers_per_block": 10_000_000}))
  env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
  t0 = time.monotonic()
  r = subprocess.run(
    [sys.executable, "-c", textwrap.dedent(_MEMORY_CHILD), f"clip:{layers}", f"clip:{width}", f"unet:{unet}"],
    capture_output=True,
    text=True,
    env=env,
    cwd=ROOT,
    timeout=300,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert "num_hidden_layers = 10000000 is out of range" in out["errors"][0]
  assert "hidden_size = 1000000000 is out of range" in out["errors"][1]
  assert "layers_per_block = 10000000 is out of range" in out["errors"][2]
  assert out["growth"] < 1 << 30, out
  assert time.monotonic() - t0 < 120


# ------------------------------------------------------------------------------------------------------------
# OpenAI / open_clip state dicts (architecture inferred from the shapes)
# ------------------------------------------------------------------------------------------------------------
def _openai_file(path, sd):
  save_safetensors(sd, path)
  return path


@pytest.fixture(scope="module")
def openai_sd(clip_flat):
  return cc.params_to_openai(clip_flat, CFG)


def test_openai_state_dict_shapes_are_checked(tmp_path, openai_sd):
  ok = _openai_file(tmp_path / "ok.safetensors", openai_sd)
  cfg, _ = cc.load_clip_params(ok, "openai")
  assert (cfg.vision_layers, cfg.text_layers, cfg.vision_width) == (2, 2, 128)
  cases = {
    "conv2d": ({"visual.conv1.weight": np.zeros((128, 3), np.float32)}, r"visual\.conv1\.weight has shape \(128, 3\)"),
    "nopos": ({"visual.positional_embedding": None}, r"missing key 'visual\.positional_embedding'"),
    "grid": ({"visual.positional_embedding": np.zeros((7, 128), np.float32)}, "1 \\+ a square number"),
    "gap": (
      {
        k.replace("resblocks.1.", "resblocks.5."): v
        for k, v in openai_sd.items()
        if k.startswith("transformer.resblocks.1.")
      },
      r"non-contiguous layer indices",
    ),
    "int8": ({"visual.proj": np.zeros((128, 32), np.int8)}, r"visual\.proj holds int8 values; expected floating-point"),
    "width": (
      {"ln_final.weight": np.zeros(96, np.float32), "ln_final.bias": np.zeros(96, np.float32)},
      r"cannot infer the attention heads of a 96-wide tower",
    ),
  }
  for name, (change, match) in cases.items():
    sd = {k: v for k, v in openai_sd.items() if not (name == "gap" and k.startswith("transformer.resblocks.1."))}
    sd.update(change)
    sd = {k: v for k, v in sd.items() if v is not None}
    path = _openai_file(tmp_path / f"{name}.safetensors", sd)
    with pytest.raises(CheckpointError, match=match) as e:
      cc.load_clip_params(path, "openai")
    assert str(path) in str(e.value), name
  # an explicit config that disagrees with the weights is named before anything is built
  with pytest.raises(CheckpointError, match=r"config: vision_layers = 3 does not match .*2 vision layers"):
    cc.load_clip_params(ok, "openai", config=CFG.replace(vision_layers=3))
  with pytest.raises(ValueError, match="vision_layers = 100000 is out of range"):
    cc.load_clip_params(ok, "openai", config=CFG.replace(vision_layers=100_000))


def test_many_layers_in_the_weights_are_bounded(tmp_path, openai_sd):
  """A file of 300 (empty) layers: the inferred config is refused by the same bounds as a config.json."""
  sd = dict(openai_sd)
  for i in range(2, 300):
    sd[f"visual.transformer.resblocks.{i}.attn.in_proj_weight"] = np.zeros((0,), np.float32)
  path = _openai_file(tmp_path / "deep.safetensors", sd)
  with pytest.raises(CheckpointError, match=r"deep\.safetensors: unsupported CLIP architecture .*vision_layers = 300"):
    cc.load_clip_params(path, "openai")


# ------------------------------------------------------------------------------------------------------------
# diffusers components: unet/, vae/, text_encoder/
# ------------------------------------------------------------------------------------------------------------
VAE_CFG = VAEConfig(
  block_out_channels=(32, 32),
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  layers_per_block=1,
  norm_num_groups=8,
)


def _component(path, cls, cfg, config: dict, weights_name="diffusion_pytorch_model.safetensors"):
  path.mkdir(parents=True, exist_ok=True)
  flat = _flat(cls, cfg)
  save_safetensors({cd.torch_key(p): cd.to_torch_value(p, v) for p, v in flat.items()}, path / weights_name)
  (path / "config.json").write_text(json.dumps(config))
  return path


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
  cfg = UNetConfig.tiny()
  conf = {"_class_name": "UNet2DConditionModel", **cfg.to_diffusers()}
  return _component(tmp_path_factory.mktemp("unet"), UNet2DConditionModel, cfg, conf)


def test_unet_config_is_checked(unet_dir):
  conf = json.loads((unet_dir / "config.json").read_text())
  cd.load_unet(unet_dir, subfolder=None)  # the fixture is right
  cases = [
    ({"layers_per_block": 10_000_000}, r"layers_per_block = 10000000 is out of range"),
    ({"block_out_channels": "abc"}, r"unsupported UNet config"),
    ({"block_out_channels": [32, 10**9]}, r"block_out_channels = 1000000000 is out of range"),
    ({"norm_eps": -1}, r"norm_eps must be positive"),
    ({"norm_num_groups": 0}, r"unsupported UNet config"),
    ({"sample_size": "big"}, r"sample_size must be an integer"),
    # in range, but the weights say otherwise: the first mismatching key and shape, before the weights are read
    ({"block_out_channels": [32, 128]}, r"shape mismatches .*down_blocks\.1\..*checkpoint \(64, .*model \(.*128"),
    ({"layers_per_block": 2}, r"missing keys \['down_blocks\.0\.attentions\.1\."),
  ]
  for change, match in cases:
    (unet_dir / "config.json").write_text(json.dumps({**conf, **change}))
    try:
      with pytest.raises(CheckpointError, match=match) as e:
        cd.load_unet(unet_dir, subfolder=None)
    finally:
      (unet_dir / "config.json").write_text(json.dumps(conf))
    assert str(unet_dir) in str(e.value) and "\n" not in str(e.value), change
  for text, match in ((b"[]", "holds an array"), (b"\xff\xfe{", "not valid JSON")):
    (unet_dir / "config.json").write_bytes(text)
    try:
      with pytest.raises(CheckpointError, match=match):
        cd.load_unet(unet_dir, subfolder=None)
    finally:
      (unet_dir / "config.json").write_text(json.dumps(conf))


def test_vae_config_is_checked(tmp_path):
  d = _component(tmp_path / "vae", AutoencoderKL, VAE_CFG, VAE_CFG.to_diffusers())
  cd.load_vae(d, subfolder=None)
  conf = VAE_CFG.to_diffusers()
  for change, match in (
    ({"layers_per_block": 10_000_000}, "layers_per_block = 10000000 is out of range"),
    ({"block_out_channels": [32, 64]}, r"shape mismatches .*decoder|shape mismatches .*encoder"),
    ({"scaling_factor": "x"}, "scaling_factor must be a finite number"),
  ):
    (d / "config.json").write_text(json.dumps({**conf, **change}))
    with pytest.raises(CheckpointError, match=match) as e:
      cd.load_vae(d, subfolder=None)
    assert str(d) in str(e.value)


def test_text_encoder_config_is_checked(tmp_path):
  d = tmp_path / "text_encoder"
  d.mkdir()
  save_safetensors(cc.text_params_to_hf(_flat(CLIPTextEncoder, CFG), CFG), d / "model.safetensors")
  tc = {"architectures": ["CLIPTextModel"], **cc.config_to_hf(CFG)["text_config"]}
  (d / "config.json").write_text(json.dumps(tc))
  assert cd.load_text_encoder(d).config.text_layers == 2
  for change, match in (
    ({"num_hidden_layers": 10_000_000}, r"config\.json: num_hidden_layers = 10000000 is out of range"),
    ({"num_hidden_layers": 4}, r"num_hidden_layers = 4 does not match .*2 text layers"),
    ({"intermediate_size": 64}, r"intermediate_size = 64 does not match .*fc1\.weight has shape \(512, 128\)"),
  ):
    (d / "config.json").write_text(json.dumps({**tc, **change}))
    with pytest.raises(CheckpointError, match=match):
      cd.load_text_encoder(d)


# ------------------------------------------------------------------------------------------------------------
# aesthetic head and FID Inception: layer sizes from the file must chain / match before anything is allocated
# ------------------------------------------------------------------------------------------------------------
def _aesthetic_sd(dims=(8, 16, 4, 4, 2, 1)):
  rng = np.random.default_rng(0)
  sd = {}
  for i, (a, b) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
    sd[f"layers.{i}.weight"] = rng.standard_normal((b, a)).astype(np.float32)
    sd[f"layers.{i}.bias"] = rng.standard_normal(b).astype(np.float32)
  return sd


def test_aesthetic_layout_is_checked(tmp_path):
  path = tmp_path / "head.safetensors"
  save_file(_aesthetic_sd(), str(path))
  assert load_aesthetic(path).dims == (8, 16, 4, 4, 2, 1)
  # layer sizes that do not chain would have made the model allocate 100000 x 100000 floats
  huge = _aesthetic_sd()
  huge["layers.0.weight"] = np.zeros((100_000, 8), np.float32)
  huge["layers.0.bias"] = np.zeros(100_000, np.float32)
  huge["layers.2.weight"] = np.zeros((100_000, 1), np.float32)
  cases = {
    "chain": (huge, r"layers\.2\.weight has shape \(100000, 1\); its input must be the previous layer's 100000"),
    "nobias": ({k: v for k, v in _aesthetic_sd().items() if k != "layers.4.bias"}, "missing key 'layers.4.bias'"),
    "bias": ({**_aesthetic_sd(), "layers.4.bias": np.zeros(3, np.float32)}, r"layers\.4\.bias has shape \(3,\)"),
    "out": (_aesthetic_sd((8, 16, 4, 4, 2, 3)), "the last layer has 3 outputs"),
  }
  for name, (sd, match) in cases.items():
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=match) as e:
      load_aesthetic(path)
    assert str(path) in str(e.value), name


def test_inception_shapes_checked_before_conversion():
  info = {k: TensorInfo(v, "float32") for k, v in _inception_torch_shapes().items()}
  check_inception_state_dict(info, "ok.pth")
  info["Conv2d_1a_3x3.conv.weight"] = TensorInfo((32,), "float32")  # wrong ndim: a transpose would have crashed
  with pytest.raises(CheckpointError, match=r"bad\.pth: wrong shapes .*Conv2d_1a_3x3\.conv\.weight \(32,\)"):
    check_inception_state_dict(info, "bad.pth")


def _inception_torch_shapes():
  from hps_jax.convert.inception import _torch_name, _torch_shape

  return {_torch_name(k): _torch_shape(k, s) for k, s in expected_shapes().items()}


# ------------------------------------------------------------------------------------------------------------
# sharded indexes
# ------------------------------------------------------------------------------------------------------------
def _index(folder, weight_map):
  path = folder / "model.safetensors.index.json"
  path.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return path


def test_sharded_index_is_confined_and_checked(tmp_path):
  outside = tmp_path / "x.safetensors"
  save_file({"secret": np.ones(3, np.float32)}, str(outside))
  folder = tmp_path / "a" / "b"
  folder.mkdir(parents=True)
  save_file({"w": np.ones(2, np.float32)}, str(folder / "s1.safetensors"))
  save_file({"v": np.zeros(2, np.float32)}, str(folder / "s2.safetensors"))
  good = _index(folder, {"w": "s1.safetensors", "v": "s2.safetensors"})
  assert set(load_state_dict(good)) == {"w", "v"} and tensor_info(good)["v"] == TensorInfo((2,), "float32")
  cases = [
    ({"w": "../../x.safetensors"}, r"weight_map\['w'\] = '\.\./\.\./x\.safetensors' points outside the index's folder"),
    ({"w": str(outside)}, "points outside the index's folder"),
    ({"w": "model.safetensors.index.json"}, "is an index, not a weights file"),
    ({"w": "./sub/../model.safetensors.index.json"}, "is an index, not a weights file"),
    ({"w": "missing.safetensors"}, "no such file"),
    ({"w": 3}, r"weight_map\['w'\] is 3; expected a shard file name"),
    ({"w": "s2.safetensors"}, r"maps 'w' to s2\.safetensors, which does not hold it"),
    ({"w": "s1.safetensors", "v": "s2.safetensors", "x": "s1.safetensors"}, "does not hold it"),
  ]
  for weight_map, match in cases:
    path = _index(folder, weight_map)
    for fn in (load_state_dict, tensor_info):
      with pytest.raises(CheckpointError, match=match) as e:
        fn(path)
      assert str(path) in str(e.value)
  save_file({"w": np.ones(2, np.float32), "u": np.ones(1, np.float32)}, str(folder / "s3.safetensors"))
  with pytest.raises(CheckpointError, match="'w' is in more than one shard"):
    load_state_dict(_index(folder, {"w": "s1.safetensors", "v": "s2.safetensors", "u": "s3.safetensors"}))
  for text, match in (
    ("not json", "not valid JSON"),
    ("[]", "holds an array"),
    ('{"metadata": {}}', "weight_map is missing"),
    ('{"weight_map": ["s1.safetensors"]}', "weight_map is an array"),
    ('{"weight_map": {}}', "weight_map is empty"),
  ):
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
      load_state_dict(folder / "model.safetensors.index.json")


# ------------------------------------------------------------------------------------------------------------
# broken and crafted weights files
# ------------------------------------------------------------------------------------------------------------
def _safetensors_bytes(header: dict, data: bytes) -> bytes:
  h = json.dumps(header).encode()
  return struct.pack("<Q", len(h)) + h + data


def test_broken_safetensors(tmp_path):
  good = tmp_path / "good.safetensors"
  save_file({"a": np.arange(16, dtype=np.float32).reshape(4, 4)}, str(good))
  raw = good.read_bytes()
  data = np.arange(16, dtype=np.float32).tobytes()
  cases = {
    "truncated": raw[: len(raw) - 10],
    "random": np.random.default_rng(0).bytes(4096),
    "hugeheader": struct.pack("<Q", 2**62) + raw[8:],
    "beyond": _safetensors_bytes(
      {"a": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}}, data
    ),
    "shape": _safetensors_bytes({"a": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 64]}}, data),
    "notjson": struct.pack("<Q", 8) + b"{{{{{{{{" + data,
  }
  for name, content in cases.items():
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(content)
    for fn in (load_state_dict, tensor_info):
      with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        fn(path)
      assert str(path) in str(e.value) and "\n" not in str(e.value), name


def _torch():
  return pytest.importorskip("torch")


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_broken_torch_files(tmp_path, suffix):
  torch = _torch()
  sd = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)}
  zipped, legacy = tmp_path / f"zip{suffix}", tmp_path / f"legacy{suffix}"
  torch.save(sd, zipped)
  torch.save(sd, legacy, _use_new_zipfile_serialization=False)
  assert set(load_state_dict(zipped)) == set(load_state_dict(legacy)) == {"w", "b"}
  cases = {}
  for name, src in (("zip", zipped), ("legacy", legacy)):
    raw = src.read_bytes()
    for cut in (len(raw) // 2, len(raw) - 7, 20):
      cases[f"{name}-cut{cut}"] = raw[:cut]
  cases["random"] = np.random.default_rng(1).bytes(5000)
  cases["random-zip-magic"] = b"PK\x03\x04" + np.random.default_rng(2).bytes(5000)
  for name, content in cases.items():
    path = tmp_path / f"bad-{name}{suffix}"
    path.write_bytes(content)
    for fn in (load_state_dict, tensor_info):
      with pytest.raises(CheckpointError) as e:
        fn(path)
      assert str(path) in str(e.value) and "\n" not in str(e.value), name


def test_tensor_info_reads_no_tensor_data(tmp_path):
  torch = _torch()
  path = tmp_path / "w.pt"
  torch.save({"state_dict": {"module.w": torch.ones(4, 3), "b": torch.zeros(2).half()}, "step": 3}, path)
  # flip bytes inside the stored tensor data: the CRC check fails when (and only when) it is read
  raw = bytearray(path.read_bytes())
  with zipfile.ZipFile(path) as z:
    info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
  name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26 : info.header_offset + 30])
  start = info.header_offset + 30 + name_len + extra_len
  raw[start : start + 4] = b"\xff\xff\xff\xff"
  path.write_bytes(bytes(raw))
  assert tensor_info(path) == {"w": TensorInfo((4, 3), "float32"), "b": TensorInfo((2,), "float16")}
  with pytest.raises(CheckpointError, match="w.pt"):
    load_state_dict(path)


class _Reduce:
  def __init__(self, fn, args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return (self.fn, self.args)


def _zip_pt(path, pkl: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", pkl)
    z.writestr("archive/version", "3\n")
  return path


def test_crafted_pickles(tmp_path):
  import builtins

  # (pickle bytes, expected message): each would run code, or allocate far more than the file's size
  memo_bomb = b"\x80\x02}r" + struct.pack("<I", 200_000_000) + b"."
  dag = [1]
  for _ in range(64):  # 2^64 paths through 64 shared lists: resolved once each
    dag = [dag, dag]
  cases = {
    "eval": (
      pickle.dumps({"w": _Reduce(builtins.eval, ("1+1",))}, protocol=2),
      r"refusing to unpickle (__builtin__|builtins)\.eval",
    ),
    "getattr": (
      pickle.dumps(_Reduce(builtins.getattr, (1, "real")), protocol=2),
      "refusing to unpickle (__builtin__|builtins)",
    ),
    "bytearray": (pickle.dumps({"w": _Reduce(bytearray, (10**10,))}, protocol=2), "bytearray is only allowed"),
    "memo": (memo_bomb, r"malformed pickle \(memo index 200000000"),
    "dag": (pickle.dumps({"state_dict": dag}, protocol=2), "holds no tensors"),
    "notdict": (pickle.dumps([1, 2, 3], protocol=2), "expected a state dict"),
    "wrapper": (pickle.dumps({"model": "resnet", "epoch": 3}, protocol=2), "holds no tensors"),
  }
  for name, (pkl, match) in cases.items():
    for layout in ("zip", "plain"):
      path = tmp_path / f"{name}-{layout}.pt"
      if layout == "zip":
        _zip_pt(path, pkl)
      else:
        path.write_bytes(pkl)
      t0 = time.monotonic()
      with pytest.raises(CheckpointError) as e:
        load_state_dict(path)
      assert time.monotonic() - t0 < 5, name
      assert str(path) in str(e.value), name
      if layout == "zip" or "refusing" in match:  # a plain pickle that is not torch's legacy format says so
        assert re.search(match, str(e.value)), (name, str(e.value))


def test_crafted_tensors(tmp_path):
  torch = _torch()
  # a stride-0 view repeating one element a billion times: refused, not materialized
  torch.save({"c": torch.ones(1).expand(10**9)}, tmp_path / "expand.pt")
  with pytest.raises(CheckpointError, match=r"repeats its storage of 1 elements into 4000000000 bytes"):
    load_state_dict(tmp_path / "expand.pt")
  torch.save({"c": torch.ones(1).expand(100)}, tmp_path / "small_expand.pt")  # small ones are fine
  assert load_state_dict(tmp_path / "small_expand.pt")["c"].shape == (100,)
  torch.save({3: torch.ones(2)}, tmp_path / "intkey.pt")
  with pytest.raises(CheckpointError, match="a tensor named 3 .*expected string names"):
    load_state_dict(tmp_path / "intkey.pt")


def test_non_finite_weights_load_with_a_warning(tmp_path):
  torch = _torch()
  path = tmp_path / "nan.pt"
  torch.save({"ok": torch.ones(3), "n": torch.tensor([1.0, float("nan")]), "i": torch.tensor([float("inf")])}, path)
  with pytest.warns(NonFiniteWeightsWarning, match=r"nan\.pt: tensor n and 1 more hold NaN / Inf"):
    sd = load_state_dict(path)
  assert np.isnan(sd["n"][1]) and np.isinf(sd["i"][0])
  torch.save({"ok": torch.ones(3)}, tmp_path / "fine.pt")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    load_state_dict(tmp_path / "fine.pt")  # no warning for finite weights


# ------------------------------------------------------------------------------------------------------------
# LoRA configs
# ------------------------------------------------------------------------------------------------------------
def _peft_lora(path, metadata=None, alpha=None):
  sd = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.ones((2, 8), np.float32),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.ones((8, 2), np.float32),
  }
  if alpha is not None:
    sd["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.alpha"] = alpha
  save_file(sd, str(path), metadata=metadata)
  return path


@pytest.mark.filterwarnings("ignore::hps_jax.convert.io.NonFiniteWeightsWarning")  # the NaN alpha
def test_lora_configs_are_checked(tmp_path):
  path = tmp_path / "l.safetensors"
  meta = lambda conf: {lora_io.METADATA_KEY: json.dumps(conf)}  # noqa: E731
  _peft_lora(path, meta({"r": 2, "lora_alpha": 4}))
  assert lora_io.load_lora(path)[1]["alpha"] == 4.0
  cases = [
    (meta([1, 2]), None, "is list; expected a JSON object"),
    ({lora_io.METADATA_KEY: "{"}, None, "is not valid JSON"),
    (meta({"r": 2, "lora_alpha": "lots"}), None, "lora_alpha = 'lots' is not a finite number"),
    (meta({"r": 2, "lora_alpha": 1e400}), None, "not valid JSON"),  # Infinity
    (meta({"r": 2, "alpha_pattern": {"(a+)+$": 3}}), None, r"unsupported alpha_pattern key '\(a\+\)\+\$'"),
    (meta({"r": 2, "alpha_pattern": ["x"]}), None, "alpha_pattern is list"),
    (None, np.zeros(0, np.float32), r"alpha has shape \(0,\)"),
    (None, np.asarray(np.nan, np.float32), "alpha = nan is not a finite number"),
  ]
  for metadata, alpha, match in cases:
    _peft_lora(path, metadata, alpha)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match=match) as e:
      lora_io.load_lora(path)
    assert str(path) in str(e.value) and time.monotonic() - t0 < 5
  save_file(
    {"unet.a.lora_A.weight": np.ones((0, 8), np.float32), "unet.a.lora_B.weight": np.ones((8, 0), np.float32)},
    str(path),
  )
  with pytest.raises(CheckpointError, match="an empty adapter"):
    lora_io.load_lora(path)
  (tmp_path / "adapter_config.json").write_text("[1]")
  _peft_lora(path)
  with pytest.raises(CheckpointError, match=r"adapter_config\.json: holds an array"):
    lora_io.load_lora(path)


def test_errors_are_input_errors():
  """The CLI's contract: a CheckpointError is an InputError (one line, exit 2)."""
  assert issubclass(CheckpointError, InputError)
  with pytest.raises(InputError, match="no such file"):
    load_state_dict("/nonexistent/w.safetensors")
