"""The shared SD building blocks (`hps_jax.models.sd_blocks`) against diffusers' PyTorch modules, loaded through
the generic diffusers converter: ResnetBlock2D (with / without time embedding, with / without shortcut),
Downsample2D (VAE and UNet padding), Upsample2D (x2 and to a size), Attention (spatial with group norm, cross)."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hps_jax.convert import diffusers as cd
from hps_jax.models import sd_blocks as sb

torch = pytest.importorskip("torch")
from tests.refs import randomize_fan_in_ as randomize_  # noqa: E402

pytest.importorskip("diffusers")


def _load(constructor, ref):
  return cd.build_from_diffusers(constructor, {k: v.numpy() for k, v in ref.state_dict().items()}, "test")


def _nhwc(t):
  return jnp.asarray(t.detach().permute(0, 2, 3, 1).numpy())


def _err(ours, ref):
  ref = ref.detach()
  ref = ref.permute(0, 2, 3, 1) if ref.ndim == 4 else ref
  return float(np.abs(np.asarray(ours) - ref.numpy()).max())


X = torch.randn(2, 32, 8, 8, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("cout,temb", [(64, 16), (32, None)])
def test_resnet_block(parity, cout, temb):
  from diffusers.models.resnet import ResnetBlock2D

  ref = randomize_(ResnetBlock2D(in_channels=32, out_channels=cout, temb_channels=temb, groups=8, eps=1e-6))
  ours = _load(lambda: sb.ResnetBlock2D(32, cout, temb_channels=temb, groups=8, rngs=nnx.Rngs(0)), ref)
  assert (ours.conv_shortcut is None) == (cout == 32) and (ours.time_emb_proj is None) == (temb is None)
  t = torch.randn(2, temb, generator=torch.Generator().manual_seed(5)) if temb else None
  got = ours(_nhwc(X), None if t is None else jnp.asarray(t.numpy()))
  parity(f"sd_blocks ResnetBlock2D 32->{cout} temb={temb}", _err(got, ref(X, t)), 1e-4)


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(parity, padding):
  from diffusers.models.downsampling import Downsample2D

  ref = randomize_(Downsample2D(32, use_conv=True, out_channels=48, padding=padding, name="op"))
  ours = _load(lambda: sb.Downsample2D(32, out_channels=48, padding=padding, rngs=nnx.Rngs(0)), ref)
  got = ours(_nhwc(X))
  assert got.shape == (2, 4, 4, 48)
  parity(f"sd_blocks Downsample2D padding={padding}", _err(got, ref(X)), 1e-4)


def test_upsample(parity):
  from diffusers.models.upsampling import Upsample2D

  ref = randomize_(Upsample2D(32, use_conv=True, out_channels=32))
  ours = _load(lambda: sb.Upsample2D(32, rngs=nnx.Rngs(0)), ref)
  parity("sd_blocks Upsample2D x2", _err(ours(_nhwc(X)), ref(X)), 1e-4)
  parity("sd_blocks Upsample2D to (13, 20)", _err(ours(_nhwc(X), (13, 20)), ref(X, output_size=(13, 20))), 1e-4)


def test_attention(parity):
  from diffusers.models.attention_processor import Attention

  ref = randomize_(
    Attention(
      32,
      heads=1,
      dim_head=32,
      bias=True,
      norm_num_groups=8,
      eps=1e-6,
      residual_connection=True,
      _from_deprecated_attn_block=True,
    )
  )
  ours = _load(
    lambda: sb.Attention(
      32, heads=1, dim_head=32, bias=True, norm_num_groups=8, eps=1e-6, residual_connection=True, rngs=nnx.Rngs(0)
    ),
    ref,
  )
  parity("sd_blocks Attention spatial (VAE mid block)", _err(ours(_nhwc(X)), ref(X)), 1e-4)
  ref = randomize_(Attention(32, cross_attention_dim=24, heads=4, dim_head=8), seed=3)
  ours = _load(lambda: sb.Attention(32, cross_attention_dim=24, heads=4, dim_head=8, rngs=nnx.Rngs(0)), ref)
  g = torch.Generator().manual_seed(4)
  s, c = torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 24, generator=g)
  got = ours(jnp.asarray(s.numpy()), jnp.asarray(c.numpy()))
  parity("sd_blocks Attention cross (B, L, C)", _err(got, ref(s, c)), 1e-4)


def test_param_paths_and_axes():
  """Paths mirror diffusers' names; blocks build without a mesh and carry logical-axis metadata."""
  m = sb.ResnetBlock2D(8, 16, temb_channels=4, groups=4, rngs=nnx.Rngs(0))
  flat = cd.model_params(m)
  assert set(flat) == {
    f"{n}/{leaf}" for n in ("conv1", "conv2", "conv_shortcut", "time_emb_proj") for leaf in ("kernel", "bias")
  } | {f"{n}/{leaf}" for n in ("norm1", "norm2") for leaf in ("scale", "bias")}
  assert flat["conv1/kernel"].shape == (3, 3, 8, 16) and flat["time_emb_proj/kernel"].shape == (4, 16)
  a = sb.Attention(8, heads=2, dim_head=4, rngs=nnx.Rngs(0))
  assert sorted(cd.params_to_diffusers(a)) == [
    "to_k.weight",
    "to_out.0.bias",
    "to_out.0.weight",
    "to_q.weight",
    "to_v.weight",
  ]
  specs = nnx.get_partition_spec(nnx.state(m, nnx.Param))
  assert tuple(specs["conv1"]["kernel"].get_value()) == (None, None, None, "embed")
  assert cd.torch_key("down_blocks/0/resnets/1/norm1/scale") == "down_blocks.0.resnets.1.norm1.weight"


def test_groupnorm_matches_torch_on_offset_inputs(parity):
  """Two-pass float32 statistics: a large common offset does not cost precision (one-pass E[x^2]-E[x]^2 would)."""
  x = torch.randn(2, 64, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) + 300.0
  ref = torch.nn.functional.group_norm(x, 8, eps=1e-6)
  got = sb.GroupNorm(64, 8, eps=1e-6)(_nhwc(x.float()))
  parity("sd_blocks GroupNorm, inputs offset by 300", _err(got, ref.float()), 1e-3)
