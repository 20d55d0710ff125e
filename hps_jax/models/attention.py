"""The one attention function every model in hps_jax calls.

Inputs use the (batch, length, heads, head_dim) layout of `jax.nn.dot_product_attention`. The backend is a
switch so a model can be moved between XLA, cuDNN flash attention (GPU, fp16/bf16 only) and future TPU kernels
without touching model code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BACKENDS = ("auto", "xla", "cudnn")


def resolve_backend(backend: str, dtype) -> str | None:
  """Maps a config value to the `implementation` argument of `jax.nn.dot_product_attention`."""
  if backend not in BACKENDS:
    raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
  if backend == "xla":
    return "xla"
  if backend == "cudnn":
    return "cudnn"
  # auto: cuDNN's fused kernel only exists on GPU for half precision; everything else runs the XLA path.
  if jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return None  # let JAX pick cuDNN when the shapes allow it, XLA otherwise
  return "xla"


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False, backend: str = "auto"):
  """Scaled dot-product attention, softmax scale 1/sqrt(head_dim)."""
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=is_causal, implementation=resolve_backend(backend, q.dtype)
  )
