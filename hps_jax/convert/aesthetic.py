"""LAION aesthetic predictor checkpoints (`sac+logos+ava1-l14-linearMSE.pth`, `ava+logos-l14-reluMSE.pth`) -> NNX.

The files are state dicts of a torch `nn.Sequential` named `layers`: Linear modules at indices {0,2,4,6,7} with
dropouts between them (linear variant) or at {0,3,6,9,11} with ReLU + dropout between them (ReLU variant). The
variant is read off the indices; layer sizes off the shapes, which must chain (each layer's input is the previous
layer's output, one output at the end, a bias of the layer's width) and are checked from the file's header before
the weights are read or the model is built (a file could otherwise declare layer sizes whose product is huge).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax.convert.io import CheckpointError, check_float_weights, load_state_dict, save_safetensors, tensor_info
from hps_jax.models.aesthetic import AestheticMLP

_INDEX_VARIANT = {(0, 2, 4, 6, 7): "linear", (0, 3, 6, 9, 11): "relu"}


def aesthetic_layout(sd, source="checkpoint") -> tuple[str, tuple[int, ...], tuple[int, ...]]:
  """(variant, dims, Linear indices) of an aesthetic-MLP state dict (arrays or `TensorInfo`s: only shapes are read),
  checked: known indices, exactly the weight and bias keys, 2-D weights whose sizes chain, biases of the layer
  widths, one output."""
  idx = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.weight$", k))})
  variant = _INDEX_VARIANT.get(tuple(idx))
  if variant is None:
    shown = idx[:12] + (["..."] if len(idx) > 12 else [])
    raise CheckpointError(
      f"{source}: not a LAION aesthetic MLP (Linear layers at indices {shown}; expected {sorted(_INDEX_VARIANT)})"
    )
  expected = {f"layers.{i}.{p}" for i in idx for p in ("weight", "bias")}
  extra, missing = sorted(set(sd) - expected), sorted(expected - set(sd))
  if missing:
    raise CheckpointError(f"{source}: missing key {missing[0]!r} of a LAION aesthetic MLP")
  if extra:
    raise CheckpointError(f"{source}: unexpected keys {extra[:8]}")
  dims = []
  for j, i in enumerate(idx):
    w, b = tuple(sd[f"layers.{i}.weight"].shape), tuple(sd[f"layers.{i}.bias"].shape)
    if len(w) != 2 or min(w) < 1:
      raise CheckpointError(f"{source}: layers.{i}.weight has shape {w}; expected (out, in)")
    if j == 0:
      dims.append(w[1])
    elif w[1] != dims[-1]:
      raise CheckpointError(
        f"{source}: layers.{i}.weight has shape {w}; its input must be the previous layer's {dims[-1]} outputs"
      )
    if b != (w[0],):
      raise CheckpointError(f"{source}: layers.{i}.bias has shape {b}; expected ({w[0]},)")
    dims.append(w[0])
  if dims[-1] != 1:
    raise CheckpointError(f"{source}: the last layer has {dims[-1]} outputs; expected 1 (a rating)")
  check_float_weights(sd, source)
  return variant, tuple(dims), tuple(idx)


def aesthetic_params(sd, source="checkpoint"):
  variant, dims, idx = aesthetic_layout(sd, source)
  flat = {}
  for j, i in enumerate(idx):
    flat[f"layers/{j}/kernel"] = np.ascontiguousarray(np.asarray(sd[f"layers.{i}.weight"], np.float32).T)
    flat[f"layers/{j}/bias"] = np.asarray(sd[f"layers.{i}.bias"], np.float32)
  return variant, dims, flat


def load_aesthetic(path):
  """Reads an aesthetic MLP checkpoint (.pth pickle or .safetensors) into an `AestheticMLP` (layout checked from the
  file's header first, see `aesthetic_layout`)."""

  aesthetic_layout(tensor_info(path), str(path))
  variant, dims, flat = aesthetic_params(load_state_dict(path), str(path))
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: AestheticMLP(dims, variant)), nnx.Param, ...)
  for p, var in nnx.to_flat_state(params):
    var.set_value(jnp.asarray(flat["/".join(map(str, p))]))
  return nnx.merge(graphdef, params, rest)


def save_aesthetic(model, path) -> Path:
  """Writes an `AestheticMLP` as .safetensors in the LAION state-dict layout (`layers.{i}.weight` (out, in) /
  `.bias`, Linear indices of its variant) that `load_aesthetic` and the torch reference read."""

  idx = next(i for i, v in _INDEX_VARIANT.items() if v == model.variant)
  sd = {}
  for i, layer in zip(idx, model.layers):
    sd[f"layers.{i}.weight"] = np.ascontiguousarray(np.asarray(layer.kernel[...], np.float32).T)
    sd[f"layers.{i}.bias"] = np.asarray(layer.bias[...], np.float32)
  path = Path(path)
  save_safetensors(sd, path)
  return path


def default_weights_dir() -> Path:
  """Where the real aesthetic heads are looked for: $HPS_JAX_WEIGHTS, else ../shared/weights next to a checkout."""

  env = os.environ.get("HPS_JAX_WEIGHTS")
  if env:
    return Path(env)
  return Path(__file__).resolve().parents[3] / "shared" / "weights"
