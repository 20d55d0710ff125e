"""Stable Diffusion's VAE: a diffusers `AutoencoderKL` folder (random weights, every block type SD 1.x uses) loaded
through `hps_jax.convert.diffusers.load_vae` matches diffusers on encode (posterior mean / logvar) and decode;
the state dict round-trips exactly; legacy attention names, `.bin` weights and malformed folders are handled."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.convert import diffusers as cd
from hps_jax.convert.io import CheckpointError, load_state_dict, save_safetensors
from hps_jax.models.vae import AutoencoderKL, VAEConfig

torch = pytest.importorskip("torch")
from tests.refs import randomize_fan_in_ as randomize_  # noqa: E402

diffusers = pytest.importorskip("diffusers")

# Three levels (two down/upsamplers), shortcut convs (32 -> 64) and identity shortcuts, the mid-block attention.
TINY = dict(
  in_channels=3,
  out_channels=3,
  down_block_types=["DownEncoderBlock2D"] * 3,
  up_block_types=["UpDecoderBlock2D"] * 3,
  block_out_channels=[32, 64, 64],
  layers_per_block=1,
  latent_channels=4,
  norm_num_groups=8,
  sample_size=32,
)


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
  """(diffusers model, pipeline-style dir holding it under vae/)."""
  d = tmp_path_factory.mktemp("sd")
  ref = randomize_(diffusers.AutoencoderKL(**TINY), seed=7)
  ref.save_pretrained(d / "vae")
  return ref, d


@pytest.fixture(scope="module")
def vae(ref_dir):
  return cd.load_vae(ref_dir[1])


def _nhwc(t):
  return t.detach().permute(0, 2, 3, 1).numpy()


def test_encode_decode_match_diffusers(ref_dir, vae, parity):
  ref, _ = ref_dir
  assert vae.config.block_out_channels == (32, 64, 64) and vae.config.scaling_factor == 0.18215
  g = torch.Generator().manual_seed(0)
  x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
  z = torch.randn(2, 4, 8, 8, generator=g)
  with torch.no_grad():
    dist = ref.encode(x).latent_dist
    want_dec = ref.decode(z).sample
  mean, logvar = vae.encode(jnp.asarray(_nhwc(x)))  # eager: compiling the whole model costs more than it saves
  assert mean.shape == (2, 8, 8, 4)
  parity(
    "VAE encode posterior mean (vs diffusers AutoencoderKL)", np.abs(np.asarray(mean) - _nhwc(dist.mean)).max(), 1e-4
  )
  parity("VAE encode posterior logvar", np.abs(np.asarray(logvar) - _nhwc(dist.logvar)).max(), 1e-4)
  dec = vae.decode(jnp.asarray(_nhwc(z)))
  assert dec.shape == (2, 32, 32, 3)
  parity("VAE decode (vs diffusers AutoencoderKL)", np.abs(np.asarray(dec) - _nhwc(want_dec)).max(), 1e-4)
  # scaled-latent helpers: mean (key=None) or mean + std * N(0, 1) with the given key, times scaling_factor
  key = jax.random.key(3)
  lat = vae.encode_latents(jnp.asarray(_nhwc(x)), key)
  eps = jax.random.normal(key, mean.shape)
  np.testing.assert_allclose(lat, (mean + jnp.exp(0.5 * logvar) * eps) * 0.18215, atol=1e-5)
  np.testing.assert_allclose(vae.encode_latents(jnp.asarray(_nhwc(x))), mean * 0.18215, atol=1e-6)
  with torch.no_grad():
    want = ref.decode(torch.from_numpy(np.array(lat)).permute(0, 3, 1, 2) / 0.18215).sample
  got = np.asarray(vae.decode_latents(lat))
  parity("VAE decode_latents (unscaled by scaling_factor)", np.abs(got - _nhwc(want)).max(), 1e-4)


def test_bf16_compute_is_close(ref_dir, vae):
  bf = cd.load_vae(ref_dir[1], dtype=jnp.bfloat16)
  z = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  out = bf.decode(z)
  assert out.dtype == jnp.bfloat16
  full = np.asarray(vae.decode(z))
  assert np.abs(np.asarray(out, np.float32) - full).max() < 0.1 * np.abs(full).max()


def test_state_dict_round_trip(ref_dir, vae, tmp_path):
  ref, _ = ref_dir
  want = {k: v.numpy() for k, v in ref.state_dict().items()}
  got = cd.params_to_diffusers(vae)
  assert set(got) == set(want)
  assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)
  # ... and what save_vae writes is a diffusers folder that diffusers itself loads
  cd.save_vae(vae, tmp_path / "out")
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "out")
  assert all(torch.equal(back.state_dict()[k], ref.state_dict()[k]) for k in want)


def test_legacy_attention_names_and_bin_weights(ref_dir, vae, tmp_path):
  ref, d = ref_dir
  sd = load_state_dict(d / "vae" / "diffusion_pytorch_model.safetensors")
  renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
  legacy = {}
  for k, v in sd.items():
    for new, old in renames.items():
      k = k.replace(new, old)
    legacy[k] = v
  assert any(".proj_attn." in k for k in legacy)
  (tmp_path / "legacy").mkdir()
  shutil.copy(d / "vae" / "config.json", tmp_path / "legacy" / "config.json")
  save_safetensors(legacy, tmp_path / "legacy" / "diffusion_pytorch_model.safetensors")
  old = cd.load_vae(tmp_path / "legacy", subfolder=None)
  a, b = cd.model_params(old), cd.model_params(vae)
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  ref.save_pretrained(tmp_path / "bin" / "vae", safe_serialization=False)
  assert (tmp_path / "bin" / "vae" / "diffusion_pytorch_model.bin").exists()
  c = cd.model_params(cd.load_vae(tmp_path / "bin"))
  assert all(np.array_equal(c[k], b[k]) for k in b)


def _write(d, config, sd):
  d.mkdir(parents=True, exist_ok=True)
  (d / "config.json").write_text(json.dumps(config))
  save_safetensors(sd, d / "diffusion_pytorch_model.safetensors")


def test_converter_errors(ref_dir, tmp_path):
  _, d = ref_dir
  config = json.loads((d / "vae" / "config.json").read_text())
  sd = load_state_dict(d / "vae" / "diffusion_pytorch_model.safetensors")
  missing = dict(sd)
  del missing["decoder.conv_out.bias"]
  _write(tmp_path / "missing", config, missing)
  with pytest.raises(CheckpointError, match=r"missing.*decoder\.conv_out\.bias") as e:
    cd.load_vae(tmp_path / "missing", subfolder=None)
  assert "diffusion_pytorch_model.safetensors" in str(e.value)
  _write(tmp_path / "extra", config, {**sd, "encoder.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(CheckpointError, match=r"unexpected.*encoder\.extra\.weight"):
    cd.load_vae(tmp_path / "extra", subfolder=None)
  _write(tmp_path / "shape", {**config, "latent_channels": 8}, sd)
  with pytest.raises(CheckpointError, match=r"shape mismatches.*quant_conv"):
    cd.load_vae(tmp_path / "shape", subfolder=None)
  _write(tmp_path / "cls", {**config, "_class_name": "UNet2DConditionModel"}, sd)
  with pytest.raises(CheckpointError, match="AutoencoderKL"):
    cd.load_vae(tmp_path / "cls", subfolder=None)
  _write(tmp_path / "types", {**config, "down_block_types": ["DownBlock2D"] * 3}, sd)
  with pytest.raises(CheckpointError, match="unsupported VAE config"):
    cd.load_vae(tmp_path / "types", subfolder=None)
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="no weights file"):
    cd.load_component(tmp_path, "noweights")
  with pytest.raises(CheckpointError, match="no such directory"):
    cd.load_component(tmp_path, "absent")


def test_config_round_trip():
  cfg = VAEConfig.from_diffusers(
    {**TINY, "_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1", "force_upcast": True}
  )
  assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
  with pytest.raises(ValueError, match="unknown VAEConfig fields"):
    VAEConfig.from_diffusers({**TINY, "bogus": 1})
  from flax import nnx

  m = nnx.eval_shape(lambda: AutoencoderKL(VAEConfig()))  # SD 1.x defaults: 83.65M parameters
  n = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  assert n == 83_653_863
