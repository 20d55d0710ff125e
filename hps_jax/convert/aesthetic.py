"""LAION aesthetic predictor checkpoints (`sac+logos+ava1-l14-linearMSE.pth`, `ava+logos-l14-reluMSE.pth`) -> NNX.

The files are state dicts of a torch `nn.Sequential` named `layers`: Linear modules at indices {0,2,4,6,7} with
dropouts between them (linear variant) or at {0,3,6,9,11} with ReLU + dropout between them (ReLU variant). The
variant is read off the indices; layer sizes off the shapes.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import save_file

from hps_jax.convert.io import CheckpointError, load_state_dict
from hps_jax.models.aesthetic import AestheticMLP

_INDEX_VARIANT = {(0, 2, 4, 6, 7): "linear", (0, 3, 6, 9, 11): "relu"}


def aesthetic_params(sd, source="checkpoint"):
  idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.weight$", k))})
  variant = _INDEX_VARIANT.get(tuple(idx))
  if variant is None:
    raise CheckpointError(
      f"{source}: not a LAION aesthetic MLP (Linear layers at indices {idx}; expected {sorted(_INDEX_VARIANT)})"
    )
  dims = [sd[f"layers.{idx[0]}.weight"].shape[1]] + [sd[f"layers.{i}.weight"].shape[0] for i in idx]
  flat = {}
  for j, i in enumerate(idx):
    flat[f"layers/{j}/kernel"] = np.ascontiguousarray(np.asarray(sd[f"layers.{i}.weight"], np.float32).T)
    flat[f"layers/{j}/bias"] = np.asarray(sd[f"layers.{i}.bias"], np.float32)
  extra = set(sd) - {f"layers.{i}.{p}" for i in idx for p in ("weight", "bias")}
  if extra:
    raise CheckpointError(f"{source}: unexpected keys {sorted(extra)[:8]}")
  return variant, tuple(dims), flat


def load_aesthetic(path):
  """Reads an aesthetic MLP checkpoint (.pth pickle or .safetensors) into an `AestheticMLP`."""

  variant, dims, flat = aesthetic_params(load_state_dict(path), str(path))
  model = AestheticMLP(dims, variant)
  state = nnx.state(model, nnx.Param)
  for p, var in nnx.to_flat_state(state):
    var.set_value(jnp.asarray(flat["/".join(map(str, p))]))
  nnx.update(model, state)
  return model


def save_aesthetic(model, path) -> Path:
  """Writes an `AestheticMLP` as .safetensors in the LAION state-dict layout (`layers.{i}.weight` (out, in) /
  `.bias`, Linear indices of its variant) that `load_aesthetic` and the torch reference read."""

  idx = next(i for i, v in _INDEX_VARIANT.items() if v == model.variant)
  sd = {}
  for i, layer in zip(idx, model.layers):
    sd[f"layers.{i}.weight"] = np.ascontiguousarray(np.asarray(layer.kernel[...], np.float32).T)
    sd[f"layers.{i}.bias"] = np.asarray(layer.bias[...], np.float32)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  save_file(sd, str(path))
  return path


def default_weights_dir() -> Path:
  """Where the real aesthetic heads are looked for: $HPS_JAX_WEIGHTS, else ../shared/weights next to a checkout."""

  env = os.environ.get("HPS_JAX_WEIGHTS")
  if env:
    return Path(env)
  return Path(__file__).resolve().parents[3] / "shared" / "weights"
