"""Parity of `hps_jax.models.unet.UNet2DConditionModel` with diffusers' PyTorch UNet2DConditionModel.

A tiny configuration that still uses every SD 1.x block type (CrossAttnDownBlock2D, DownBlock2D,
UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D) and per-block head counts (which exercises diffusers'
attention_head_dim naming quirk and the reversed head order of the up path). Every torch parameter is randomized
(norm scales around 1), the model is saved with `save_pretrained` and read back with `load_unet`.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from hps_jax.convert.diffusers import load_unet  # noqa: E402
from hps_jax.models.unet import UNetConfig, timestep_embedding  # noqa: E402

TINY = dict(
  sample_size=16,
  in_channels=4,
  out_channels=4,
  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
  block_out_channels=[32, 64],
  layers_per_block=1,
  attention_head_dim=[2, 4],
  cross_attention_dim=32,
  norm_num_groups=8,
)
CTX_LEN = 7


def _randomize(module: "torch.nn.Module", seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if p.ndim == 1 and name.endswith("weight"):  # GroupNorm / LayerNorm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
      else:
        fan_in = int(np.prod(p.shape[1:]))
        p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))


@pytest.fixture(scope="module")
def saved_unet(tmp_path_factory):
  torch.manual_seed(0)
  ref = diffusers.UNet2DConditionModel(**TINY).eval()
  _randomize(ref)
  d = tmp_path_factory.mktemp("sd") / "unet"
  ref.save_pretrained(d, safe_serialization=True)
  return ref, d.parent


@pytest.fixture(scope="module")
def ours(saved_unet):
  return load_unet(saved_unet[1])


_forward = nnx.jit(lambda m, x, t, c: m(x, t, c))


def _torch_forward(ref, x_nhwc, t, ctx):
  with torch.no_grad():
    out = ref(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2)), torch.as_tensor(t), torch.from_numpy(ctx)).sample
  return out.numpy().transpose(0, 2, 3, 1)


def test_config_from_diffusers(saved_unet):
  cfg = UNetConfig.from_diffusers(json.loads((saved_unet[1] / "unet" / "config.json").read_text()))
  assert cfg.block_out_channels == (32, 64) and cfg.num_heads(0) == 2 and cfg.num_heads(1) == 4
  assert cfg.flip_sin_to_cos and cfg.freq_shift == 0 and not cfg.use_linear_projection
  assert UNetConfig.from_diffusers(diffusers.UNet2DConditionModel.load_config(saved_unet[1] / "unet")) == cfg
  with pytest.raises(ValueError, match="upcast_attention"):
    UNetConfig.from_diffusers({**TINY, "upcast_attention": True})
  with pytest.raises(ValueError, match="unknown"):
    UNetConfig.from_diffusers({**TINY, "no_such_key": 1})
  # the SD 1.4 defaults describe the released architecture
  sd = UNetConfig.sd14()
  assert [sd.block_out_channels[i] // sd.num_heads(i) for i in range(4)] == [40, 80, 160, 160]


def test_timestep_embedding(parity):
  from diffusers.models.embeddings import get_timestep_embedding

  t = np.array([0, 1, 250, 999], np.int64)
  for flip, shift in ((True, 0), (False, 1)):
    ref = get_timestep_embedding(torch.from_numpy(t), 32, flip_sin_to_cos=flip, downscale_freq_shift=shift).numpy()
    got = np.asarray(timestep_embedding(jnp.asarray(t), 32, flip_sin_to_cos=flip, freq_shift=shift))
    parity(f"unet time_proj flip={flip} shift={shift}", np.abs(got - ref).max(), 1e-5)


def test_unet_parity(saved_unet, ours, parity):
  ref, _ = saved_unet
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
  ctx = rng.standard_normal((2, CTX_LEN, 32)).astype(np.float32)
  for t in (np.array([10, 900], np.int64), np.array([999, 0], np.int64)):
    want = _torch_forward(ref, x, t, ctx)
    got = np.asarray(_forward(ours, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    assert got.shape == want.shape == (2, 16, 16, 4)
    parity(f"unet tiny fp32 t={t.tolist()} (|out| max {np.abs(want).max():.2g})", np.abs(got - want).max(), 1e-4)


def test_unet_parity_odd_size_scalar_timestep(saved_unet, ours, parity):
  """H, W not divisible by 2**num_upsamplers (diffusers upsamples to the skip's size), and a scalar timestep
  broadcast over the batch."""
  ref, _ = saved_unet
  rng = np.random.default_rng(2)
  x = rng.standard_normal((1, 9, 12, 4)).astype(np.float32)
  ctx = rng.standard_normal((1, CTX_LEN, 32)).astype(np.float32)
  want = _torch_forward(ref, x, 321, ctx)
  got = np.asarray(_forward(ours, jnp.asarray(x), jnp.asarray(321), jnp.asarray(ctx)))
  assert got.shape == (1, 9, 12, 4)
  parity("unet tiny fp32 odd size 9x12, scalar t", np.abs(got - want).max(), 1e-4)


def test_state_dict_round_trip(saved_unet, ours, tmp_path):
  from hps_jax.convert.diffusers import params_to_diffusers, save_unet

  ref, _ = saved_unet
  want = {k: v.numpy() for k, v in ref.state_dict().items()}
  got = params_to_diffusers(ours)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].shape == want[k].shape and np.array_equal(got[k], want[k]), k
  # and through the folder format, readable by diffusers itself
  save_unet(ours, tmp_path / "unet")
  back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "unet")
  for k, v in back.state_dict().items():
    assert np.array_equal(v.numpy(), want[k]), k


def test_remat(saved_unet, ours, parity):
  """remat=True: the same forward values, and a backward pass that traces through one checkpoint per block
  (compiling the gradient of even this tiny UNet takes ~20 s on the CPU, so the backward is traced, not run)."""
  from flax import nnx

  remat = load_unet(saved_unet[1], remat=True)
  assert remat.config.remat
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((2, 16, 16, 4)).astype(np.float32))
  ctx = jnp.asarray(rng.standard_normal((2, CTX_LEN, 32)).astype(np.float32))
  t = jnp.asarray([400, 7])
  a = np.asarray(_forward(ours, x, t, ctx))
  b = np.asarray(_forward(remat, x, t, ctx))
  parity("unet remat vs plain output", np.abs(a - b).max(), 1e-6)

  def loss(m):
    return jnp.mean(m(x, t, ctx) ** 2)

  def checkpoints(model):
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(jax.grad(lambda st: loss(nnx.merge(graphdef, st))))(state)
    return _count_primitive(jaxpr.jaxpr, "remat2")  # jax.checkpoint's primitive

  assert checkpoints(remat) == len(remat.down_blocks) + len(remat.up_blocks) + 1


def _count_primitive(jaxpr, name: str) -> int:
  n = 0
  for eqn in jaxpr.eqns:
    n += eqn.primitive.name == name
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", None)
      if inner is not None:
        n += _count_primitive(getattr(inner, "jaxpr", inner), name)
  return n


def test_bf16_dtypes(saved_unet):
  """dtype=bfloat16 computes (and returns) bf16 while the loaded parameters keep param_dtype (float32); traced
  only, since compiling another UNet costs ~6 s on the CPU."""
  bf = load_unet(saved_unet[1], dtype=jnp.bfloat16)
  assert {v.dtype for v in jax.tree.leaves(nnx.state(bf, nnx.Param))} == {jnp.dtype(jnp.float32)}
  out = nnx.eval_shape(
    lambda m, x, t, c: m(x, t, c),
    bf,
    jnp.zeros((2, 16, 16, 4)),
    jnp.zeros((2,), jnp.int32),
    jnp.zeros((2, CTX_LEN, 32)),
  )
  assert out.shape == (2, 16, 16, 4) and out.dtype == jnp.bfloat16
