"""The one training loop every trainer uses (preference classifier, LoRA): split/merge NNX train step compiled ahead
of time with explicit shardings and donation, orbax checkpoints with the Grain iterator, resume, NaN stop, JSONL +
TensorBoard scalars, periodic evaluation, progress bar.

A trainer supplies a `Task`: the model, which parameters train (an nnx filter), a loss, a data iterator factory and
optional evaluate/export hooks. Frozen parameters are never differentiated and carry no optimizer state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from hps_jax import parallel
from hps_jax.checkpoint import Checkpointer


class TrainingStopped(RuntimeError):
  """Training stopped early (non-finite loss); the message names the step and the last good checkpoint."""


# ------------------------------------------------------------------------------------------------------------
# trainable-parameter selection by regex on parameter paths
# ------------------------------------------------------------------------------------------------------------
def path_str(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def regex_filter(patterns: Sequence[str]):
  """An nnx filter selecting Params whose path ('vision/blocks/14/attn/query/kernel') fully matches a pattern."""
  rx = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None

  def filt(path, value):
    return rx is not None and isinstance(value, nnx.Param) and rx.fullmatch(path_str(path)) is not None

  return filt


def count_params(state) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))


# ------------------------------------------------------------------------------------------------------------
# optimizer
# ------------------------------------------------------------------------------------------------------------
def make_schedule(cfg, total_steps: int):
  warmup = int(cfg.get("warmup_steps", 0))
  if cfg.schedule == "constant":
    sched = optax.constant_schedule(cfg.lr)
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), sched], [warmup]) if warmup else sched
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0 if warmup else cfg.lr, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=cfg.get("end_lr", 0.0)
    )
  raise ValueError(f"unknown schedule {cfg.schedule!r} (constant or cosine)")


def make_optimizer(cfg, total_steps: int):
  """AdamW with optional global-norm clipping, all settings from the config's `optim` section."""
  sched = make_schedule(cfg, total_steps)
  parts = []
  if cfg.get("grad_clip", 0.0):
    parts.append(optax.clip_by_global_norm(cfg.grad_clip))
  parts.append(optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts), sched


# ------------------------------------------------------------------------------------------------------------
# logging
# ------------------------------------------------------------------------------------------------------------
class MetricWriter:
  """Scalars to WORKDIR/metrics.jsonl and TensorBoard event files (WORKDIR/tb), from process 0 only."""

  def __init__(self, workdir: Path, enabled: bool = True):
    self.enabled = enabled and jax.process_index() == 0
    self.jsonl = None
    self.tb = None
    if self.enabled:
      workdir.mkdir(parents=True, exist_ok=True)
      self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tb"))
      except ImportError:
        self.tb = None

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    row = {"step": step, **{k: float(v) for k, v in scalars.items()}}
    self.jsonl.write(json.dumps(row) + "\n")
    self.jsonl.flush()
    if self.tb is not None:
      for k, v in scalars.items():
        self.tb.add_scalar(k, float(v), step)
      self.tb.flush()

  def close(self):
    if self.jsonl:
      self.jsonl.close()
    if self.tb is not None:
      self.tb.close()


def log(msg: str):
  if jax.process_index() == 0:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
  model: nnx.Module
  trainable: Callable  # nnx filter
  loss_fn: Callable  # (model, batch) -> (scalar loss, dict of scalar metrics)
  make_iterator: Callable[[], Iterator]  # -> checkpointable iterator of process-local numpy batches
  example: dict  # name -> one example's array (no batch axis): the batch's shapes and dtypes are derived from it
  checksum_key: str | None = None  # the batch entry whose checksum is logged as data_checksum (resume checks)
  evaluate: Callable | None = None  # (model) -> dict of scalars
  export: Callable | None = None  # (model, directory) -> path


def global_batch_shapes(example: dict, batch_size: int) -> dict:
  """name -> ShapeDtypeStruct of the global batch, from one example."""
  return {k: jax.ShapeDtypeStruct((batch_size,) + np.shape(v), np.asarray(v).dtype) for k, v in example.items()}


def data_checksum(x) -> jax.Array:
  """A checksum of a batch entry that depends on which examples it holds and in which rows: sum over rows of
  (row + 1) * sum(row values), in wrapping uint32 arithmetic (exact, identical on every backend)."""
  flat = jnp.asarray(x).reshape(x.shape[0], -1)
  per_row = jnp.sum(flat.astype(jnp.uint32), axis=1, dtype=jnp.uint32)
  rows = jnp.arange(1, x.shape[0] + 1, dtype=jnp.uint32)
  return jnp.sum(per_row * rows, dtype=jnp.uint32)


@dataclasses.dataclass
class TrainResult:
  status: str  # "done" or "nan"
  step: int
  losses: dict[int, float]
  eval: dict
  export_path: str | None
  trainable_params: int
  frozen_params: int


def train(task: Task, config, workdir) -> TrainResult:
  """Runs (or resumes) training as configured. Config keys used: seed, batch_size, num_steps, mesh.{data,fsdp,tensor},
  sharding_rules, optim.*, log_every, eval_every, checkpoint_every, keep_checkpoints, progress."""
  workdir = Path(workdir)
  if jax.process_index() == 0:  # what this run is, next to its checkpoints (one writer in a multi-process run)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh = parallel.make_mesh(**dict(config.mesh))
  rules = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)
  total = int(config.num_steps)

  graphdef, trainable, frozen = nnx.split(task.model, task.trainable, ...)
  n_train, n_frozen = count_params(trainable), count_params(frozen)
  if n_train == 0:
    raise ValueError("no trainable parameters: the trainable patterns match nothing")
  log(f"parameters: {n_train:,} trainable, {n_frozen:,} frozen; mesh {dict(mesh.shape)}; {total} steps")

  tr_sh = parallel.state_shardings(trainable, mesh, rules)
  fr_sh = parallel.state_shardings(frozen, mesh, rules)
  trainable, frozen = jax.device_put(trainable, tr_sh), jax.device_put(frozen, fr_sh)
  tx, schedule = make_optimizer(config.optim, total)
  opt_sh = parallel.state_shardings(jax.eval_shape(tx.init, trainable), mesh, rules)
  opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
  batch_shapes = global_batch_shapes(task.example, int(config.batch_size))
  batch_sh = {k: parallel.batch_sharding(mesh, len(v.shape)) for k, v in batch_shapes.items()}
  repl = parallel.replicated(mesh)

  def train_step(trainable, frozen, opt_state, batch):
    def loss_of(trainable):
      return task.loss_fn(nnx.merge(graphdef, trainable, frozen), batch)

    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
    if task.checksum_key is not None:
      metrics = {**metrics, "data_checksum": data_checksum(batch[task.checksum_key])}
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **metrics}

  abstract = lambda tree, sh: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
  t0 = time.time()
  step_fn = jax.jit(
    train_step,
    in_shardings=(tr_sh, fr_sh, opt_sh, batch_sh),
    out_shardings=(tr_sh, opt_sh, repl),
    donate_argnums=(0, 2),
  )
  batch_abs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh[k]) for k, v in batch_shapes.items()}
  compiled = step_fn.lower(
    abstract(trainable, tr_sh), abstract(frozen, fr_sh), abstract(opt_state, opt_sh), batch_abs
  ).compile()
  log(f"train step compiled ahead of time in {time.time() - t0:.1f}s")

  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3))
  iterator = task.make_iterator()
  start = 0
  latest = ckpt.latest_step()
  if latest is not None:
    restored = ckpt.restore(latest, {"params": trainable, "opt": opt_state}, data_iterator=iterator)
    trainable, opt_state, start = restored["params"], restored["opt"], latest
    log(f"resumed from {ckpt.directory / str(latest)} at step {start}")

  writer = MetricWriter(workdir)
  losses: dict[int, float] = {}
  eval_metrics: dict = {}
  every = lambda n, s: n and s % n == 0
  status, last_good = "done", latest
  try:
    bar = _progress(total, start, config.get("progress", True))
    for step in range(start + 1, total + 1):
      try:
        host_batch = next(iterator)
      except StopIteration:
        log(f"data ran out at step {step - 1} (of {total})")
        break
      batch = parallel.put_batch(mesh, {k: host_batch[k] for k in batch_shapes})
      trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, batch)
      loss = float(metrics["loss"])
      losses[step] = loss
      if not math.isfinite(loss):
        status = "nan"
        where = (
          f"the last good checkpoint (step {last_good}) is kept in {ckpt.directory}"
          if last_good
          else "no checkpoint had been written yet"
        )
        log(f"non-finite loss {loss} at step {step}: stopping; {where}")
        break
      if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}")
      if every(config.log_every, step) or step == total:
        scalars = {k: float(v) for k, v in metrics.items()}
        scalars["lr"] = float(schedule(step - 1))
        writer.write(step, scalars)
      if task.evaluate is not None and every(config.get("eval_every", 0), step) and step != total:
        eval_metrics = task.evaluate(nnx.merge(graphdef, trainable, frozen))
        writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items() if np.isscalar(v)})
      if every(config.checkpoint_every, step) or step == total:
        ckpt.save(step, {"params": trainable, "opt": opt_state}, data_iterator=iterator)
        last_good = step
    if bar is not None:
      bar.close()
    final_step = max([start] + list(losses))
    export_path = None
    if status == "done":
      model = nnx.merge(graphdef, trainable, frozen)
      if task.evaluate is not None:
        eval_metrics = task.evaluate(model)
        writer.write(final_step, {f"eval/{k}": v for k, v in eval_metrics.items() if np.isscalar(v)})
      if task.export is not None and jax.process_count() > 1:
        # weights sharded over other processes' devices cannot be read here: every process takes part in
        # replicating them (one collective), then process 0 alone writes the export
        model = nnx.merge(graphdef, *jax.jit(lambda *s: s, out_shardings=repl)(trainable, frozen))
      if task.export is not None and jax.process_index() == 0:
        export_path = str(task.export(model, workdir / "export"))
        log(f"exported the trained model to {export_path}")
  finally:
    writer.close()
    ckpt.close()
  return TrainResult(status, final_step, losses, eval_metrics, export_path, n_train, n_frozen)


def _progress(total: int, start: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None

  return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
