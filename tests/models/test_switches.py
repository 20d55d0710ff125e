"""The GPU-relevant model switches, checked on the CPU: the attention backend (auto / xla / cudnn give the same
numbers; 'cudnn' where cuDNN cannot run falls back to XLA with one warning; 'auto' picks cuDNN exactly where
cuDNN takes the inputs), bf16 compute against fp32 within bf16 tolerances (UNet, VAE, CLIP), and the UNet's remat
policies (gradients equal to those without remat).

Measured on this CPU (tiny configs, default random init, seeds fixed): bf16 vs fp32 relative L2 error of whole
outputs 1.4e-2 (UNet), 1.1e-2 / 1.4e-2 (VAE encoder mean / decoder), 5e-3 / 8e-3 (CLIP image / text embeddings),
asserted < 3e-2: bf16 keeps 8 bits of mantissa (eps 7.8e-3) and the error grows with depth; remat vs plain
gradients agree to float32 rounding (asserted <= 1e-5 of the largest gradient).
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hps_jax.diffusion.tiny import TINY_UNET
from hps_jax.models import attention
from hps_jax.models.attention import AttentionFallbackWarning, cudnn_problem, resolve_backend
from hps_jax.models.clip import CLIP, CLIPConfig
from hps_jax.models.unet import REMAT_POLICIES, UNet2DConditionModel, UNetConfig
from hps_jax.models.vae import AutoencoderKL, VAEConfig

BF16_RTOL = 3e-2  # relative L2 error of a whole output, bf16 compute vs fp32 (measured up to 1.4e-2)

# every SD 1.x block type, toy widths: the demo's tiny UNet with 16-d text states
UNET_TINY = TINY_UNET.replace(cross_attention_dim=16, attention_head_dim=(2, 4))  # head dims 16 / 16
# one cross-attention block each way + the mid block: the cheapest UNet whose gradient still crosses every
# rematerialized block kind (compiling the gradient is what costs time on the CPU)
UNET_ONE_BLOCK = dict(
  sample_size=8,
  block_out_channels=(16,),
  layers_per_block=1,
  down_block_types=("CrossAttnDownBlock2D",),
  up_block_types=("CrossAttnUpBlock2D",),
  norm_num_groups=4,
  cross_attention_dim=8,
  attention_head_dim=2,
)
VAE_TINY = VAEConfig(
  down_block_types=("DownEncoderBlock2D",) * 2,
  up_block_types=("UpDecoderBlock2D",) * 2,
  block_out_channels=(16, 32),
  layers_per_block=1,
  norm_num_groups=8,
  sample_size=16,
)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
  """Each test sees the one-time fallback warning afresh."""
  monkeypatch.setattr(attention, "_warned", set())


def _unet_inputs(cfg: UNetConfig, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  s = cfg.sample_size
  x = jnp.asarray(rng.standard_normal((batch, s, s, cfg.in_channels)), jnp.float32)
  ctx = jnp.asarray(rng.standard_normal((batch, 5, cfg.cross_attention_dim)), jnp.float32)
  t = jnp.asarray(rng.integers(0, 1000, (batch,)), jnp.int32)
  return x, t, ctx


def _clip_inputs(cfg: CLIPConfig, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  pixels = jnp.asarray(rng.standard_normal((batch, cfg.image_size, cfg.image_size, 3)), jnp.float32)
  ids = rng.integers(1, 1000, (batch, cfg.context_length)).astype(np.int32)
  ids[:, 9] = cfg.vocab_size - 1  # an end-of-text token
  return pixels, jnp.asarray(ids)


def _with_params_of(model, source):
  """`model` with the parameters of `source` (same architecture, any compute dtype)."""
  nnx.update(model, nnx.state(source, nnx.Param))
  return model


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(a))


# ------------------------------------------------------------------------------------------------------------
# (a) attention backend
# ------------------------------------------------------------------------------------------------------------
def test_cudnn_conditions():
  """cudnn_problem names what keeps cuDNN's flash attention from the inputs; None exactly when it can run."""
  gpu = dict(platform="gpu", cudnn=True, capability=(9, 0))
  assert cudnn_problem(jnp.bfloat16, 64, **gpu) is None
  assert cudnn_problem(jnp.float16, 256, **gpu) is None  # Hopper: head dims up to 256
  assert cudnn_problem(jnp.bfloat16, 160, q_len=4096, kv_len=77, **gpu) is None  # SD UNet's deepest blocks
  assert "float32" in cudnn_problem(jnp.float32, 64, **gpu)
  assert "head dim 160" in cudnn_problem(jnp.bfloat16, 160, platform="gpu", cudnn=True, capability=(8, 0))
  assert "head dim 44" in cudnn_problem(jnp.bfloat16, 44, **gpu)
  assert "head dim 512" in cudnn_problem(jnp.bfloat16, 512, **gpu)  # the VAE's single-head attention
  assert "odd" in cudnn_problem(jnp.bfloat16, 64, q_len=77, kv_len=77, has_mask=True, **gpu)
  assert cudnn_problem(jnp.bfloat16, 64, q_len=76, kv_len=76, has_mask=True, **gpu) is None
  assert "cpu" in cudnn_problem(jnp.bfloat16, 64, platform="cpu")
  assert "not CUDA" in cudnn_problem(jnp.bfloat16, 64, platform="gpu", cudnn=False, capability=None)


def test_resolve_backend_on_this_cpu():
  """On the CPU every backend resolves to XLA; 'cudnn' warns once per reason, 'auto' and 'xla' never warn."""
  assert jax.default_backend() == "cpu"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert resolve_backend("auto", jnp.bfloat16, head_dim=64) == "xla"
    assert resolve_backend("xla", jnp.bfloat16, head_dim=64) == "xla"
  with pytest.warns(AttentionFallbackWarning, match="no cuDNN on the cpu backend"):
    assert resolve_backend("cudnn", jnp.bfloat16, head_dim=64) == "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert resolve_backend("cudnn", jnp.float32, head_dim=32) == "xla"  # same reason: no second warning
  with pytest.raises(ValueError, match="attention backend"):
    resolve_backend("flash", jnp.float32)


def test_auto_picks_cudnn_where_it_runs(monkeypatch):
  """With a (pretended) Hopper GPU with cuDNN, 'auto' and 'cudnn' choose cuDNN for bf16 inputs it takes and XLA
  otherwise; 'xla' always stays XLA. (Nothing is run: only the decision is checked.)"""
  monkeypatch.setattr(attention, "_device_info", lambda: ("gpu", True, (9, 0)))
  assert resolve_backend("auto", jnp.bfloat16, head_dim=64, q_len=257, kv_len=257) == "cudnn"
  assert resolve_backend("cudnn", jnp.bfloat16, head_dim=160) == "cudnn"
  assert resolve_backend("xla", jnp.bfloat16, head_dim=64) == "xla"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert resolve_backend("auto", jnp.float32, head_dim=64) == "xla"  # auto falls back silently
    assert resolve_backend("auto", jnp.bfloat16, head_dim=512) == "xla"
  with pytest.warns(AttentionFallbackWarning, match="float32"):
    assert resolve_backend("cudnn", jnp.float32, head_dim=64) == "xla"


def test_attention_backends_same_numbers_clip():
  """CLIP (tiny, both towers; the text tower is causal) gives identical outputs with auto / xla / cudnn here,
  and every traced attention call ran XLA."""
  outs = {}
  for backend in ("auto", "xla", "cudnn"):
    cfg = CLIPConfig.tiny(attention_backend=backend)
    model = CLIP(cfg, rngs=nnx.Rngs(0))
    pixels, ids = _clip_inputs(cfg)
    attention.reset_attention_stats()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", AttentionFallbackWarning)
      outs[backend] = (np.asarray(model.encode_image(pixels)), np.asarray(model.encode_text(ids)))
    assert set(attention.attention_stats()) == {"xla"}
  for backend in ("xla", "cudnn"):
    for a, b in zip(outs["auto"], outs[backend]):
      np.testing.assert_array_equal(a, b)


def test_attention_backends_same_numbers_unet():
  """The UNet (tiny, self- and cross-attention) gives identical outputs with auto / xla / cudnn here."""
  outs = {}
  for backend in ("auto", "xla", "cudnn"):
    cfg = UNET_TINY.replace(attention_backend=backend)
    model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", AttentionFallbackWarning)
      outs[backend] = np.asarray(model(*_unet_inputs(cfg)))
  np.testing.assert_array_equal(outs["auto"], outs["xla"])
  np.testing.assert_array_equal(outs["auto"], outs["cudnn"])


def test_cudnn_request_warns_once_and_runs():
  """A model configured for cuDNN runs on the CPU: one AttentionFallbackWarning for all its attention layers."""
  cfg = UNET_TINY.replace(attention_backend="cudnn")
  model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = model(*_unet_inputs(cfg))
  fallbacks = [w for w in caught if issubclass(w.category, AttentionFallbackWarning)]
  assert len(fallbacks) == 1, [str(w.message) for w in fallbacks]
  assert np.isfinite(np.asarray(y)).all()


# ------------------------------------------------------------------------------------------------------------
# (b) bf16 compute vs fp32
# ------------------------------------------------------------------------------------------------------------
def test_bf16_unet_close_to_fp32():
  cfg = UNET_TINY
  m32 = UNet2DConditionModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  m16 = _with_params_of(UNet2DConditionModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)), m32)
  x, t, ctx = _unet_inputs(cfg)
  a, b = m32(x, t, ctx), m16(x, t, ctx)
  assert b.dtype == jnp.bfloat16
  assert _rel(a, b) < BF16_RTOL, _rel(a, b)


def test_bf16_vae_close_to_fp32():
  m32 = AutoencoderKL(VAE_TINY, dtype=jnp.float32, rngs=nnx.Rngs(0))
  m16 = _with_params_of(AutoencoderKL(VAE_TINY, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)), m32)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  mean32, _ = m32.encode(images)
  mean16, _ = m16.encode(images)
  assert _rel(mean32, mean16) < BF16_RTOL, _rel(mean32, mean16)
  dec32, dec16 = m32.decode(mean32), m16.decode(mean32)
  assert dec16.dtype == jnp.bfloat16
  assert _rel(dec32, dec16) < BF16_RTOL, _rel(dec32, dec16)


def test_bf16_clip_close_to_fp32():
  cfg = CLIPConfig.tiny()
  m32 = CLIP(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0))
  m16 = _with_params_of(CLIP(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(1)), m32)
  pixels, ids = _clip_inputs(cfg)
  for f in ("encode_image", "encode_text"):
    a, b = (
      getattr(m32, f)(pixels if f == "encode_image" else ids),
      getattr(m16, f)(pixels if f == "encode_image" else ids),
    )
    assert _rel(a, b) < BF16_RTOL, (f, _rel(a, b))


# ------------------------------------------------------------------------------------------------------------
# (c) UNet remat policies
# ------------------------------------------------------------------------------------------------------------
def _unet_grads(cfg: UNetConfig, source=None):
  model = UNet2DConditionModel(cfg, rngs=nnx.Rngs(0))
  if source is not None:
    _with_params_of(model, source)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x, t, ctx = _unet_inputs(cfg, seed=1)
  target = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)

  def loss(p):
    return jnp.mean((nnx.merge(graphdef, p, rest)(x, t, ctx) - target) ** 2)

  return model, jax.jit(jax.value_and_grad(loss))(params), jax.make_jaxpr(jax.grad(loss))(params)


def _remat_policies(jaxpr) -> list:
  """The `policy` parameter of every jax.checkpoint (remat2) equation, nested jaxprs included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "remat2":
      found.append(eqn.params.get("policy"))
    for p in eqn.params.values():
      inner = getattr(p, "jaxpr", None)
      if inner is not None:
        found += _remat_policies(getattr(inner, "jaxpr", inner))
  return found


def test_remat_policy_gradients_equal_plain():
  """Gradients of an MSE loss with per-block remat (each policy) equal those without remat (1e-5), and each
  block's jax.checkpoint carries the configured policy."""
  plain_model, (loss0, g0), jaxpr0 = _unet_grads(UNetConfig(**UNET_ONE_BLOCK))
  assert _remat_policies(jaxpr0.jaxpr) == []
  for policy in REMAT_POLICIES:
    cfg = UNetConfig(**UNET_ONE_BLOCK, remat=True, remat_policy=policy)
    _, (loss1, g1), jaxpr1 = _unet_grads(cfg, source=plain_model)
    policies = _remat_policies(jaxpr1.jaxpr)
    assert len(policies) == 3  # down block, mid block, up block
    assert all(p is getattr(jax.checkpoint_policies, policy) for p in policies), policies
    assert abs(float(loss1) - float(loss0)) <= 1e-6
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g0, g1))
    scale = max(float(jnp.max(jnp.abs(a))) for a in jax.tree.leaves(g0))
    assert max(diffs) <= 1e-5 * max(scale, 1.0), (policy, max(diffs), scale)


def test_remat_policy_config():
  """remat_policy is validated, is not a diffusers config key, and is set through load-time overrides."""
  with pytest.raises(ValueError, match="remat_policy"):
    UNetConfig(remat_policy="offload_everything")
  cfg = UNetConfig.from_diffusers(UNET_TINY.to_diffusers(), remat=True, remat_policy="dots_saveable")
  assert (cfg.remat, cfg.remat_policy) == (True, "dots_saveable")
  assert "remat_policy" not in cfg.to_diffusers() and "remat" not in cfg.to_diffusers()
  with pytest.raises(ValueError, match="unknown diffusers UNet config key"):
    UNetConfig.from_diffusers({**UNET_TINY.to_diffusers(), "remat_policy": "dots_saveable"})


def test_remat_with_lora_adapters():
  """A LoRA step (trainable adapters, frozen base, merged inside jax.grad) runs with remat and gives the adapter
  gradients it gives without (nnx.remat refused such a mix of traces; the functional checkpoint does not)."""
  from hps_jax import lora

  grads = {}
  for remat in (False, True):
    model = UNet2DConditionModel(UNetConfig(**UNET_ONE_BLOCK, remat=remat), rngs=nnx.Rngs(0))
    lora.apply_lora(model, lora.LoRAConfig(rank=2, alpha=2.0))
    for layer in lora.lora_layers(model).values():  # nonzero B, so every adapter gets a gradient
      layer.lora_up[...] = 0.1 * jnp.ones_like(layer.lora_up[...])
    graphdef, adapters, frozen = nnx.split(model, lora.LORA, ...)
    x, t, ctx = _unet_inputs(model.config, seed=1)

    def loss(a, frozen=frozen, graphdef=graphdef, x=x, t=t, ctx=ctx):
      return jnp.mean(nnx.merge(graphdef, a, frozen)(x, t, ctx) ** 2)

    grads[remat] = jax.jit(jax.grad(loss))(adapters)
  leaves0, leaves1 = jax.tree.leaves(grads[False]), jax.tree.leaves(grads[True])
  assert len(leaves0) == len(leaves1) > 0
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(leaves0, leaves1)) <= 1e-6
  assert max(float(jnp.max(jnp.abs(a))) for a in leaves0) > 0
