"""One device mesh with axes ('data', 'fsdp', 'tensor'), logical-axis rules, and host <-> global array helpers.

Parameters carry logical axis names (`nnx.with_partitioning` in the models: 'embed', 'mlp', 'heads', 'vocab',
'proj'); a rule table maps each logical name to a mesh axis (or None = replicated). Batches are split over
('data', 'fsdp'), which is what makes FSDP a data-parallel scheme with sharded parameters.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis. 'embed' over fsdp shards every weight matrix along its model dimension (ZeRO-3 style);
# 'mlp' / 'heads' / 'vocab' over tensor give Megatron-style tensor parallelism when that axis is > 1.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("proj", None),
)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
  """A mesh over `devices` (default: all devices of all processes); one axis size may be -1 (= the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = [data, fsdp, tensor]
  if shape.count(-1) > 1:
    raise ValueError("at most one mesh axis may be -1")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed axes {shape}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} devices, have {len(devices)}")
  try:
    from jax.experimental import mesh_utils
    arr = mesh_utils.create_device_mesh(shape, devices=devices)
  except (ValueError, NotImplementedError, AssertionError):
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def local_mesh() -> Mesh:
  """Pure data parallelism over this process's devices (used by inference: the Scorer, samplers)."""
  return make_mesh(devices=jax.local_devices())


def logical_to_mesh_spec(spec, rules: Mapping[str, object] | Iterable = DEFAULT_RULES) -> P:
  rules = dict(rules)
  if spec is None:
    return P()
  out = []
  for name in spec:
    if name is None:
      out.append(None)
    elif name in rules:
      out.append(rules[name])
    else:
      raise KeyError(f"no sharding rule for logical axis {name!r}; rules cover {sorted(rules)}")
  return P(*out)


def state_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a pytree of nnx Variables (an nnx.State, an optax state over one) and plain arrays.
  Variables are sharded by their logical-axis metadata through `rules`; plain arrays are replicated. A dimension
  that the mesh axis does not divide is replicated instead (e.g. a 77-row position table on 2 shards)."""
  from flax import nnx
  specs = nnx.get_partition_spec(tree)

  def one(spec, x):
    if spec is None:
      return None
    mesh_spec = logical_to_mesh_spec(spec, rules)
    shape = getattr(x, "shape", ())
    fixed = []
    for dim, axes in zip(shape, tuple(mesh_spec) + (None,) * (len(shape) - len(mesh_spec))):
      names = axes if isinstance(axes, tuple) else (axes,) if axes else ()
      size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      fixed.append(axes if size > 1 and dim % size == 0 else None)
    return NamedSharding(mesh, P(*fixed))

  return jax.tree.map(one, specs, tree, is_leaf=lambda x: isinstance(x, P) or x is None)


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
  return jax.device_put(state, state_shardings(state, mesh, rules))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_divisor(mesh: Mesh) -> int:
  """Global batch sizes must be multiples of this (the number of batch shards)."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def put_batch(mesh: Mesh, tree):
  """Host numpy arrays holding this process's part of the batch -> global arrays sharded over the batch axes."""
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)
  return jax.tree.map(put, tree)


def put_global(mesh: Mesh, tree):
  """Host numpy arrays holding the WHOLE global batch (identical on every process, e.g. evaluation batches) ->
  global arrays sharded over the batch axes; each process keeps only its devices' slices."""
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])
  return jax.tree.map(put, tree)
