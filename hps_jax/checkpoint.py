"""Orbax checkpoints of a training run: trainable parameters + optimizer state + step, and the Grain iterator state
(one JSON per process, written by Grain's own orbax handler) in the same step directory.

Pytrees are stored as flat {path-string: array} dicts, so custom pytree nodes (nnx.State, optax named tuples) never
reach the file format; restoring flattens a freshly built state the same way and fills it back (shapes checked,
shardings taken from the live arrays so multi-host restores land on the right devices).
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

try:
  import grain.checkpoint as grain_ckpt
except ImportError:  # pragma: no cover - grain is a core dependency; keep the module importable without it
  grain_ckpt = None


def flatten(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def unflatten_like(template, flat: dict):
  paths, treedef = jax.tree_util.tree_flatten_with_path(template)
  missing = [jax.tree_util.keystr(p) for p, _ in paths if jax.tree_util.keystr(p) not in flat]
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} entries, e.g. {missing[:4]}")
  return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


class Checkpointer:
  def __init__(self, directory, *, max_to_keep: int | None = 3):
    self.directory = Path(directory).absolute()
    handlers = {"state": ocp.StandardCheckpointHandler()}
    if grain_ckpt is not None:
      handlers["data"] = grain_ckpt.CheckpointHandler()
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
      item_handlers=handlers,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: dict, data_iterator=None) -> None:
    """state: a dict of pytrees (e.g. {'params': ..., 'opt': ..., 'step': ...}); saved flattened."""
    args = {"state": ocp.args.StandardSave({k: flatten(v) for k, v in state.items()})}
    if data_iterator is not None:
      args["data"] = grain_ckpt.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**args), force=True)
    self.manager.wait_until_finished()

  def restore(self, step: int, template: dict, data_iterator=None) -> dict:
    """Restores into the structure, dtypes and shardings of `template` (a dict like the one saved); the data
    iterator, if given, is set to its saved position in place."""
    flat_template = {k: flatten(v) for k, v in template.items()}
    args = {"state": ocp.args.StandardRestore(_abstract(flat_template))}
    if data_iterator is not None:
      args["data"] = grain_ckpt.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return {k: unflatten_like(template[k], restored["state"][k]) for k in template}

  def close(self):
    self.manager.close()
