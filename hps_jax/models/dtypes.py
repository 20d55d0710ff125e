"""Dtype names as configs and command lines spell them ('float32', 'bf16', ...) -> JAX dtypes: the one helper."""

from __future__ import annotations

import jax.numpy as jnp

DTYPES = {
  "float32": jnp.float32,
  "fp32": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
  "float16": jnp.float16,
  "fp16": jnp.float16,
}


def as_dtype(d):
  """A dtype from its name (None -> float32); a dtype object passes through."""
  if d is None:
    return jnp.float32
  if isinstance(d, str):
    if d not in DTYPES:
      raise ValueError(f"unknown dtype {d!r}; choose from {sorted(DTYPES)}")
    return DTYPES[d]
  return d
