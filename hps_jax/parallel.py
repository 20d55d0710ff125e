"""One device mesh with axes ('data', 'fsdp', 'tensor'), logical-axis rules, and host <-> global array helpers.

Parameters carry logical axis names (`nnx.with_partitioning` in the models: 'embed', 'mlp', 'heads', 'vocab',
'proj'); a rule table maps each logical name to a mesh axis (or None = replicated). Batches are split over
('data', 'fsdp'), which is what makes FSDP a data-parallel scheme with sharded parameters.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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


# ------------------------------------------------------------------------------------------------------------
# joining a multi-process run
# ------------------------------------------------------------------------------------------------------------
ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID = "HPS_COORDINATOR", "HPS_NUM_PROCESSES", "HPS_PROCESS_ID"
ENV_DISTRIBUTED = "HPS_DISTRIBUTED"  # "off": never join a run; "auto": let JAX detect one (OpenMPI, k8s, ...)
# What JAX's own Slurm detection reads (jax/_src/clusters/slurm_cluster.py); it is only trusted inside a job step.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# Environment a multi-host Cloud TPU slice sets (GKE / queued resources / multislice), as JAX's TPU detection reads.
_TPU_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
_initialized = False


def _slurm_job_step(environ) -> bool:
  """Inside an `srun` step of more than one task (a batch script running one process is not a multi-process run)."""
  if not all(v in environ for v in _SLURM_VARS):
    return False
  try:
    return int(environ.get("SLURM_STEP_NUM_TASKS", environ["SLURM_NTASKS"])) > 1
  except ValueError:
    return False


def _cloud_tpu(environ) -> bool:
  """A Cloud TPU VM, detected as JAX does: libtpu installed, and TPU chips on the PCI bus (JAX's own probe) or a
  slice's environment set. Not when JAX_PLATFORMS leaves the TPU out (e.g. a CPU-only run on a TPU VM)."""

  platforms = environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.lower().split(","):
    return False
  if importlib.util.find_spec("libtpu") is None:
    return False
  if any(environ.get(v) for v in _TPU_VARS):
    return True
  try:
    from jax._src import hardware_utils  # reads /sys/bus/pci only; initializes nothing

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError):  # moved in another JAX version: HPS_DISTRIBUTED=auto still works
    return False


def launch_settings(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ: Mapping[str, str] | None = None,
) -> dict | None:
  """How this process joins a multi-process run, decided from the arguments and the environment (no device is
  touched): None for a single process, else the keyword arguments for
  `jax.distributed.initialize` (an empty dict: JAX detects everything, as under Slurm or on a Cloud TPU slice).

  Precedence: arguments, then HPS_COORDINATOR / HPS_NUM_PROCESSES / HPS_PROCESS_ID, then a Slurm job step or a
  Cloud TPU VM (which fill whatever was not given). HPS_DISTRIBUTED=off disables all of it; =auto asks JAX to
  detect any cluster it knows (OpenMPI, Kubernetes, ...). One process in all (HPS_NUM_PROCESSES=1) is no run."""
  environ = os.environ if environ is None else environ
  mode = environ.get(ENV_DISTRIBUTED, "").strip().lower()
  if mode in ("0", "off", "false", "no", "none"):
    return None

  def pick(value, name, cast):
    if value is not None:
      return cast(value)
    raw = environ.get(name, "").strip()
    if not raw:
      return None
    try:
      return cast(raw)
    except ValueError:
      raise ValueError(f"{name}={raw!r} is not a valid {cast.__name__}") from None

  explicit = {
    "coordinator_address": pick(coordinator, ENV_COORDINATOR, str),
    "num_processes": pick(num_processes, ENV_NUM_PROCESSES, int),
    "process_id": pick(process_id, ENV_PROCESS_ID, int),
  }
  given = {k: v for k, v in explicit.items() if v is not None}
  if given.get("num_processes") == 1:
    if given.get("process_id", 0) != 0:
      raise ValueError(f"process id {given['process_id']} of a single-process run")
    return None
  cluster = mode == "auto" or _slurm_job_step(environ) or _cloud_tpu(environ)
  if cluster:
    return given
  if not given:
    return None
  missing = [
    name
    for key, name in (
      ("coordinator_address", ENV_COORDINATOR),
      ("num_processes", ENV_NUM_PROCESSES),
      ("process_id", ENV_PROCESS_ID),
    )
    if key not in given
  ]
  if missing:
    raise ValueError(
      f"a multi-process run needs the coordinator address, the number of processes and this process's "
      f"id; {', '.join(missing)} not set (and no Slurm step or Cloud TPU slice to detect them from)"
    )
  if given["num_processes"] < 1 or not 0 <= given["process_id"] < given["num_processes"]:
    raise ValueError(f"process id {given['process_id']} is not in [0, {given['num_processes']})")
  if ":" not in given["coordinator_address"]:
    raise ValueError(f"coordinator {given['coordinator_address']!r} must be HOST:PORT")
  return given


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
) -> bool:
  """Joins this process to a multi-process run (`jax.distributed.initialize`) when the arguments or the environment
  describe one (see `launch_settings`); a lone process with nothing set is left alone. Must run before anything
  touches a JAX device. A second call does nothing. On the CPU, cross-process collectives go through gloo (unless
  JAX_CPU_COLLECTIVES_IMPLEMENTATION says otherwise). Returns whether the process is part of a distributed run."""
  global _initialized
  if _initialized or jax.distributed.is_initialized():
    _initialized = True
    return True
  settings = launch_settings(coordinator, num_processes, process_id)
  if settings is None:
    return False
  if "JAX_CPU_COLLECTIVES_IMPLEMENTATION" not in os.environ:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if local_device_ids is not None:
    settings["local_device_ids"] = list(local_device_ids)
  jax.distributed.initialize(**settings)
  _initialized = True
  if jax.process_index() == 0:
    how = settings.get("coordinator_address") or "auto-detected"
    print(
      f"distributed: {jax.process_count()} processes, {jax.device_count()} devices "
      f"({jax.local_device_count()} on process 0); coordinator {how}",
      file=sys.stderr,
      flush=True,
    )
  return True
