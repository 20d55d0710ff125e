"""The LoRA core (hps_jax/lora.py) on the tiny SD UNet: identity at init, only adapters receive gradients and
optimizer state, merge / unmerge, scale, bf16 base with float32 adapters, loading adapters of another rank."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from hps_jax import lora
from hps_jax.convert.diffusers import model_params
from hps_jax.diffusion.tiny import TINY_UNET
from hps_jax.models.unet import UNet2DConditionModel

N_BLOCKS = 4  # transformer blocks in the tiny UNet: down 0 (1), mid (1), up 1 (layers_per_block + 1 = 2)


def _unet(seed=0, dtype=jnp.float32):
  return UNet2DConditionModel(TINY_UNET, dtype=dtype, rngs=nnx.Rngs(seed))


def _inputs(b=2):
  x = jax.random.normal(jax.random.key(1), (b, 8, 8, 4))
  t = jnp.array([10, 700][:b])
  ctx = jax.random.normal(jax.random.key(2), (b, 7, 32))
  return x, t, ctx


_fwd = nnx.jit(lambda m, x, t, c: m(x, t, c))


def _randomize_up(model, seed=3, std=0.2):
  for i, m in enumerate(lora.lora_layers(model).values()):
    m.lora_up.set_value(std * jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), m.lora_up.shape))


def test_targets_and_identity_at_init():
  model = _unet()
  base = np.asarray(_fwd(model, *_inputs()))
  before = model_params(model)
  paths = lora.apply_lora(model, lora.LoRAConfig(rank=4))
  assert len(paths) == 8 * N_BLOCKS
  assert all(p.split("/")[-2] in ("attn1", "attn2", "to_out") for p in paths)
  assert {p.rsplit("/", 1)[-1] for p in paths} == {"to_q", "to_k", "to_v", "0"}
  np.testing.assert_array_equal(np.asarray(_fwd(model, *_inputs())), base)  # B = 0: exactly the base model
  after = model_params(model)  # the base's parameters unchanged,
  assert after.keys() == before.keys()  # adapters are not nnx.Params
  for k in before:
    np.testing.assert_array_equal(after[k], before[k])
  # adapter count (rank 4): three blocks at 32 channels (every layer 32 -> 32) and the mid block at 64 channels
  # (attn1 q/k/v/out and attn2 q/out 64 -> 64, attn2 k/v from the 32-wide context)
  per32 = 8 * (32 * 4 + 4 * 32)
  mid = 6 * (64 * 4 + 4 * 64) + 2 * (32 * 4 + 4 * 64)
  assert lora.count_lora_params(model) == 3 * per32 + mid


def test_init_distributions():
  model = _unet()
  lora.apply_lora(model, lora.LoRAConfig(rank=8, init="kaiming"))
  downs = np.concatenate([np.asarray(m.lora_down[...]).ravel() for m in lora.lora_layers(model).values()])
  bound = 1 / np.sqrt(32)
  assert np.abs(downs).max() <= bound and np.abs(downs).max() > 0.95 * bound  # U(-1/sqrt(in), 1/sqrt(in))
  assert all(not np.any(m.lora_up[...]) for m in lora.lora_layers(model).values())
  model = _unet()
  lora.apply_lora(model, lora.LoRAConfig(rank=8, init="normal"))
  downs = np.concatenate([np.asarray(m.lora_down[...]).ravel() for m in lora.lora_layers(model).values()])
  assert abs(downs.std() - 1 / 8) < 0.01


def test_only_adapters_train():
  """Split on the LORA filter: gradients and AdamW state exist for adapters only, and after optimizer steps every
  base parameter is bit-identical while the output has moved."""
  model = _unet()
  lora.apply_lora(model, lora.LoRAConfig(rank=4))
  base_out = np.asarray(_fwd(model, *_inputs()))
  graphdef, adapters, frozen = nnx.split(model, lora.LORA, ...)
  frozen_before = jax.tree.map(np.asarray, frozen)
  leaves = jax.tree.leaves(adapters, is_leaf=lambda v: isinstance(v, nnx.Variable))
  assert leaves and all(isinstance(v, lora.LoRAParam) for v in leaves)
  x, t, c = _inputs()
  target = jax.random.normal(jax.random.key(9), x.shape)

  def loss(adapters, frozen):
    return jnp.mean((nnx.merge(graphdef, adapters, frozen)(x, t, c) - target) ** 2)

  tx = optax.adamw(1e-2)
  opt = tx.init(adapters)
  assert sum(a.size for a in jax.tree.leaves(opt)) == 2 * lora.count_lora_params(model) + 1  # mu, nu (+ count)

  @jax.jit
  def step(a, f, o):
    updates, o = tx.update(jax.grad(loss)(a, f), o, a)
    return optax.apply_updates(a, updates), o

  losses = []
  for _ in range(5):
    losses.append(float(loss(adapters, frozen)))
    adapters, opt = step(adapters, frozen, opt)
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), frozen_before)
  moved = np.abs(np.asarray(_fwd(nnx.merge(graphdef, adapters, frozen), *_inputs())) - base_out).max()
  assert moved > 1e-4


def test_merge_unmerge_and_scale(parity):
  model = _unet()
  lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8.0))
  _randomize_up(model)
  base_kernels = {p: np.asarray(m.kernel[...]) for p, m in lora.lora_layers(model).items()}
  adapted = np.asarray(_fwd(model, *_inputs()))
  assert lora.merge_lora(model) == 8 * N_BLOCKS
  merged = np.asarray(_fwd(model, *_inputs()))
  parity("LoRA merged vs unmerged-with-adapter output", np.abs(merged - adapted).max(), 1e-5)
  lora.unmerge_lora(model)
  restore = max(np.abs(np.asarray(m.kernel[...]) - base_kernels[p]).max() for p, m in lora.lora_layers(model).items())
  parity("LoRA merge then unmerge: base kernels restored", restore, 1e-6)
  # scale: multiplier 0 = the base model, 1 = adapted, 2 = doubled delta (linear in the adapter at first order)
  lora.set_lora_scale(model, 0.0)
  base = np.asarray(_fwd(model, *_inputs()))
  lora.remove_lora(model)
  np.testing.assert_allclose(np.asarray(_fwd(model, *_inputs())), base, atol=1e-6)
  assert not lora.lora_layers(model)


def test_alpha_scales_the_delta():
  model = _unet()
  lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=2.0))
  _randomize_up(model)
  layer = next(m for p, m in lora.lora_layers(model).items() if p.endswith("to_out/0"))  # one with a bias
  x = jax.random.normal(jax.random.key(5), (3, layer.in_features))
  delta = np.asarray(layer(x) - (x @ layer.kernel[...] + layer.bias[...]))
  expect = 0.5 * np.asarray(x @ layer.lora_down[...] @ layer.lora_up[...])
  np.testing.assert_allclose(delta, expect, atol=1e-5)


def test_bf16_base_float32_adapters():
  model = _unet(dtype=jnp.bfloat16)
  lora.apply_lora(model, lora.LoRAConfig(rank=4))
  for m in lora.lora_layers(model).values():
    assert m.lora_down[...].dtype == jnp.float32 and m.lora_up[...].dtype == jnp.float32
    assert m.dtype == jnp.bfloat16
  out = _fwd(model, *_inputs())
  assert out.dtype == jnp.bfloat16


def test_set_adapters_round_trip_and_errors():
  src = _unet()
  lora.apply_lora(src, lora.LoRAConfig(rank=4, alpha=1.0))
  _randomize_up(src)
  adapters = lora.get_adapters(src)
  dst = _unet()  # same seed: same base weights
  lora.apply_lora(dst, lora.LoRAConfig(rank=2))  # another rank: rebuilt on load
  lora.set_adapters(dst, adapters)
  assert {p: m.rank for p, m in lora.lora_layers(dst).items()} == {p: 4 for p in adapters}
  np.testing.assert_array_equal(np.asarray(_fwd(dst, *_inputs())), np.asarray(_fwd(src, *_inputs())))
  bad = dict(adapters)
  p0 = next(iter(bad))
  bad[p0] = lora.Adapter(np.zeros((5, 4), np.float32), np.zeros((4, 32), np.float32), 4.0)
  with pytest.raises(ValueError, match="do not fit"):
    lora.set_adapters(_unet(), bad, source="x.safetensors")
  with pytest.raises(ValueError, match="no such linear layer"):
    lora.set_adapters(_unet(), {"nope/to_q": adapters[p0]})
  with pytest.raises(ValueError, match="match no linear layer"):
    lora.apply_lora(_unet(), lora.LoRAConfig(targets="nothing"))
