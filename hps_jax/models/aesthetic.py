"""The LAION "improved aesthetic predictor": an MLP head on L2-normalized CLIP ViT-L/14 image embeddings that
predicts a 1-10 rating. Two published variants: `linear` (no activations between the layers) and `relu`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

VARIANTS = ("linear", "relu")
DEFAULT_DIMS = (768, 1024, 128, 64, 16, 1)


class AestheticMLP(nnx.Module):
  def __init__(
    self, dims=DEFAULT_DIMS, variant: str = "linear", *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None
  ):
    if variant not in VARIANTS:
      raise ValueError(f"aesthetic variant must be one of {VARIANTS}, got {variant!r}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    self.variant = variant
    self.dims = tuple(dims)
    self.layers = nnx.List([nnx.Linear(a, b, param_dtype=param_dtype, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, embeddings):
    """embeddings: (B, dims[0]) L2-normalized CLIP image embeddings -> (B,) ratings. Dropout is inactive."""
    x = embeddings.astype(jnp.float32)
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      x = layer(x)
      # the ReLU variant has a ReLU after every layer but the output layer
      if self.variant == "relu" and i < last:
        x = jax.nn.relu(x)
    return x[:, 0]
