"""FID Inception-v3 weights (`pt_inception-2015-12-05-6726825d.pth`) <-> `hps_jax.models.inception.FIDInception`.

pytorch-fid's `fid_inception_v3()` (torchvision Inception3, aux_logits=False, 1008 classes, FID blocks) and
torch-fidelity's `FeatureExtractorInceptionV3` name their modules identically (their `state_dict()` key sets are
equal; tests/models/test_inception.py checks it), and both load their weights file with a strict `load_state_dict`, so one
layout serves pytorch-fid's `pt_inception-...pth` and torch-fidelity's `weights-inception-...pth` alike:

  <module>.conv.weight                 (O, I, kh, kw)  -> <module>/conv/kernel (kh, kw, I, O)
  <module>.bn.weight | bias            (C,)            -> <module>/bn/scale | bias
  <module>.bn.running_mean | var       (C,)            -> <module>/bn/mean | var
  <module>.bn.num_batches_tracked      ()              -> ignored (optional; training bookkeeping)
  fc.weight (1008, 2048), fc.bias      -> fc/kernel (2048, 1008), fc/bias

with <module> e.g. `Conv2d_1a_3x3`, `Mixed_5b.branch1x1`, `Mixed_7c.branch3x3dbl_3b`. Conversion is strict: a
missing key, an unknown key or a wrong shape raises `CheckpointError` naming the file and the keys.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hps_jax import files
from hps_jax.convert.io import CheckpointError, check_float_weights, load_state_dict, save_safetensors, tensor_info
from hps_jax.models.inception import FIDInception

# ours (last path components) <-> torch (key suffix)
_SUFFIXES = (
  ("conv/kernel", "conv.weight"),
  ("bn/scale", "bn.weight"),
  ("bn/bias", "bn.bias"),
  ("bn/mean", "bn.running_mean"),
  ("bn/var", "bn.running_var"),
)
_IGNORED_SUFFIX = ".num_batches_tracked"


def _torch_name(ours: str) -> str:
  if ours == "fc/kernel":
    return "fc.weight"
  if ours == "fc/bias":
    return "fc.bias"
  for mine, theirs in _SUFFIXES:
    if ours.endswith("/" + mine):
      return ours[: -len(mine)].replace("/", ".") + theirs
  raise KeyError(f"no torch name for parameter {ours}")


def _to_torch(ours: str, arr: np.ndarray) -> np.ndarray:
  if ours.endswith("conv/kernel"):
    return np.ascontiguousarray(np.transpose(arr, (3, 2, 0, 1)))  # HWIO -> OIHW
  if ours == "fc/kernel":
    return np.ascontiguousarray(arr.T)
  return arr


def _torch_shape(ours: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """The torch layout's shape of our parameter `ours` of `shape`."""
  if ours.endswith("conv/kernel"):
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if ours == "fc/kernel":
    return tuple(reversed(shape))
  return tuple(shape)


def _from_torch(ours: str, arr: np.ndarray) -> np.ndarray:
  if ours.endswith("conv/kernel"):
    return np.ascontiguousarray(np.transpose(arr, (2, 3, 1, 0)))  # OIHW -> HWIO
  if ours == "fc/kernel":
    return np.ascontiguousarray(arr.T)
  return arr


def _abstract_model(cfg=None, dtype=None, param_dtype=None):

  return nnx.eval_shape(
    lambda: FIDInception(cfg, dtype=dtype or jnp.float32, param_dtype=param_dtype or jnp.float32, rngs=nnx.Rngs(0))
  )


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg) -> tuple[tuple[str, tuple[int, ...]], ...]:

  state = nnx.state(_abstract_model(cfg), nnx.Param)
  return tuple(("/".join(map(str, p)), tuple(v.shape)) for p, v in nnx.to_flat_state(state))


def expected_shapes(cfg=None) -> dict[str, tuple[int, ...]]:
  """{our flat parameter path: shape} of the FID Inception (computed abstractly, no arrays allocated; cached)."""
  return dict(_expected_shapes(cfg))


def _fmt(keys, n: int = 10) -> str:
  keys = sorted(keys)
  more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
  return ", ".join(keys[:n]) + more


def check_inception_state_dict(sd, source: str = "state dict", cfg=None) -> None:
  """Raises CheckpointError unless `sd` (arrays or `TensorInfo`s: only names and shapes are read) has exactly the FID
  Inception-v3's keys with their torch-layout shapes."""
  shapes = expected_shapes(cfg)
  names = {_torch_name(k): k for k in shapes}
  keys = {k for k in sd if not k.endswith(_IGNORED_SUFFIX)}
  missing = set(names) - keys
  unknown = keys - set(names)
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"missing keys [{_fmt(missing)}]")
    if unknown:
      parts.append(f"unexpected keys [{_fmt(unknown)}]")
    raise CheckpointError(f"{source}: not an FID Inception-v3 state dict: {'; '.join(parts)}")
  bad = [
    f"{theirs} {tuple(sd[theirs].shape)}"
    for theirs, ours in names.items()
    if tuple(sd[theirs].shape) != _torch_shape(ours, shapes[ours])
  ]
  if bad:
    raise CheckpointError(f"{source}: wrong shapes for the FID Inception-v3: {_fmt(bad)}")
  check_float_weights({k: sd[k] for k in names}, source)


def inception_params_from_torch(sd, source: str = "state dict", cfg=None) -> dict[str, np.ndarray]:
  """Torch state dict (pytorch-fid / torch-fidelity layout) -> {our flat path: float32 array}, strictly checked."""
  check_inception_state_dict(sd, source, cfg)
  shapes = expected_shapes(cfg)
  return {ours: _from_torch(ours, np.asarray(sd[_torch_name(ours)], np.float32)) for ours in shapes}


def inception_params_to_torch(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Inverse of `inception_params_from_torch` (without `num_batches_tracked`)."""
  return {_torch_name(k): _to_torch(k, np.asarray(v)) for k, v in flat.items()}


def model_params(model) -> dict[str, np.ndarray]:

  return {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def build_inception(flat: dict[str, np.ndarray], *, cfg=None, dtype=None, param_dtype=None):
  """An `FIDInception` holding `flat` (every parameter must be present), without running the initializers."""

  param_dtype = param_dtype or jnp.float32
  graphdef, params, rest = nnx.split(_abstract_model(cfg, dtype, param_dtype), nnx.Param, ...)
  for path, var in nnx.to_flat_state(params):
    var.set_value(jnp.asarray(flat["/".join(map(str, path))], dtype=param_dtype))
  return nnx.merge(graphdef, params, rest)


def load_inception(path: str | os.PathLike, *, dtype=None, param_dtype=None, cfg=None):
  """Reads `pt_inception-2015-12-05-6726825d.pth` (or torch-fidelity's copy, or a .safetensors with the same keys)
  into an `FIDInception`; names and shapes are checked from the file's header before the weights are read."""
  check_inception_state_dict(tensor_info(path), str(path), cfg)
  flat = inception_params_from_torch(load_state_dict(path), str(path), cfg)
  return build_inception(flat, cfg=cfg, dtype=dtype, param_dtype=param_dtype)


def save_inception_torch(model, path: str | os.PathLike, num_batches_tracked: bool = True) -> Path:
  """Writes `model` in the torch layout: `.safetensors` by suffix, otherwise a `torch.save` pickle loadable with
  `load_state_dict(strict=True)` by pytorch-fid's `fid_inception_v3()` and torch-fidelity's extractor."""
  path = Path(path)
  sd = inception_params_to_torch({k: np.asarray(v, np.float32) for k, v in model_params(model).items()})
  if path.suffix == ".safetensors":
    save_safetensors(sd, path)
    return path
  import torch

  tensors = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in sd.items()}
  if num_batches_tracked:
    for k in sd:
      if k.endswith(".bn.running_mean"):
        tensors[k[: -len("running_mean")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
  with files.atomic_path(path) as tmp:
    torch.save(tensors, str(tmp))
  return path
