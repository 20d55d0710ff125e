"""Reading and writing state dicts: safetensors without torch, PyTorch pickles with `torch.load(weights_only=True)`.

torch is imported lazily and only for the pickled formats (`.pt`, `.pth`, `.bin`, `.ckpt`); everything returns
plain `dict[str, np.ndarray]` (float tensors as float32 unless `keep_dtype`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Mapping

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "params")


class CheckpointError(ValueError):
  """A checkpoint file that cannot be read or does not hold what was expected; the message names the file."""


def _is_safetensors(path: Path) -> bool:
  if path.suffix in SAFETENSORS_SUFFIXES:
    return True
  try:
    with open(path, "rb") as f:
      head = f.read(9)
  except OSError:
    return False
  # safetensors: 8-byte little-endian header length, then a JSON object.
  return len(head) == 9 and head[8:9] == b"{" and not zipfile.is_zipfile(path)


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:

  out = {}
  try:
    with safe_open(str(path), framework="flax") as f:  # the flax framework handles bf16 through ml_dtypes
      for k in f.keys():
        out[k] = np.asarray(f.get_tensor(k))
  except Exception as e:  # safetensors raises its own error types
    raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
  return out


def _torch_to_numpy(t) -> np.ndarray:
  import torch

  if t.dtype in (torch.bfloat16, torch.float16):
    t = t.float()
  return t.detach().cpu().numpy()


def load_torch_pickle(path: str | os.PathLike):
  try:
    import torch
  except ImportError as e:
    raise CheckpointError(
      f"{path}: reading PyTorch pickles needs torch (pip install 'hps_jax[torch]'), or convert the file to "
      "safetensors first"
    ) from e
  try:
    return torch.load(str(path), map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises pickle/zip/runtime errors of many kinds, often with long messages
    first = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
    reason = first if len(first) <= 200 else first[:197] + "..."
    raise CheckpointError(
      f"{path}: torch.load(weights_only=True) failed ({type(e).__name__}: {reason}). TorchScript archives (the "
      "OpenAI CLIP release .pt) are not plain state dicts: load them with torch.jit.load(...).state_dict() "
      "and save that"
    ) from e


def unwrap_state_dict(obj, path="checkpoint") -> dict:
  """Finds the tensor dict inside common training-checkpoint wrappers and strips DDP's `module.` prefix."""
  seen = 0
  while isinstance(obj, Mapping) and seen < 4:
    if any(k in obj for k in _WRAPPER_KEYS) and not _looks_like_tensors(obj):
      key = next(k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping))
      obj = obj[key]
      seen += 1
    else:
      break
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
  out = {}
  for k, v in obj.items():
    k = k[len("module.") :] if k.startswith("module.") else k
    out[k] = v
  return out


def _looks_like_tensors(d: Mapping) -> bool:
  vals = list(d.values())[:8]
  return bool(vals) and all(hasattr(v, "shape") for v in vals)


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a safetensors file, a PyTorch pickle (plain or wrapped in {'state_dict': ...}), or a sharded
  safetensors index (`*.safetensors.index.json`). Non-tensor entries are dropped."""
  path = Path(path)
  if not path.exists():
    raise CheckpointError(f"{path}: no such file")
  if path.is_dir():
    raise CheckpointError(f"{path}: is a directory; expected a weights file")
  if path.stat().st_size == 0:
    raise CheckpointError(f"{path}: empty file")
  if path.name.endswith(".index.json"):
    index = json.loads(path.read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
      out.update(load_state_dict(path.parent / shard))
    return out
  if _is_safetensors(path):
    return load_safetensors(path)
  obj = unwrap_state_dict(load_torch_pickle(path), path)
  out = {}
  for k, v in obj.items():
    if hasattr(v, "detach"):
      out[k] = _torch_to_numpy(v)
    elif isinstance(v, np.ndarray):
      out[k] = v
  if not out:
    raise CheckpointError(f"{path}: holds no tensors")
  return out


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None):

  Path(path).parent.mkdir(parents=True, exist_ok=True)
  # (np.ascontiguousarray would turn 0-d tensors such as logit_scale into shape (1,))
  save_file({k: np.array(v, order="C", copy=True) for k, v in tensors.items()}, str(path), metadata=metadata)
