"""The one training loop every trainer uses (preference classifier, LoRA): split/merge NNX train step compiled ahead
of time with explicit shardings and donation, orbax checkpoints with the Grain iterator, resume, NaN stop, JSONL +
TensorBoard scalars, periodic evaluation, progress bar.

A trainer supplies a `Task`: the model, which parameters train (an nnx filter), a loss, a data iterator factory and
optional evaluate/export hooks. Frozen parameters are never differentiated and carry no optimizer state.

What a run survives (see `train`):
- SIGTERM / SIGINT (what clusters and Ctrl-C send) stop the loop at the next step boundary with a checkpoint at that
  step, then `hps_jax.errors.Interrupted` (exit 143 / 130); resuming reproduces the uninterrupted trajectory.
- kills: resuming drops the metrics.jsonl rows (and TensorBoard events) logged after the restored checkpoint, so
  every step is logged once.
- a second run on the same workdir: refused by `workdir_lock` (InputError naming the holder).
- a changed config on resume: refused unless allowed (`check_config_change`), and recorded in
  WORKDIR/config_history.jsonl.
- bad values (batch_size 0, a NaN lr...): refused before anything is built (`validate_config`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import fcntl
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from hps_jax import files, parallel
from hps_jax.checkpoint import Checkpointer
from hps_jax.errors import InputError, Interrupted


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
  """Scalars to WORKDIR/metrics.jsonl and TensorBoard event files (WORKDIR/tb), from process 0 only.

  `resume_step`: the step training goes on from (None: a fresh start). metrics.jsonl rows logged after it by an
  earlier, killed run are dropped first (`truncate_metrics`), and TensorBoard is told to purge its events after it
  (tensorboardX's purge_step), so every step is logged once however often the run was killed and resumed."""

  def __init__(self, workdir: Path, enabled: bool = True, *, resume_step: int | None = None, finished: bool = False):
    self.enabled = enabled and jax.process_index() == 0
    self.jsonl = None
    self.tb = None
    if self.enabled:
      workdir.mkdir(parents=True, exist_ok=True)
      truncate_metrics(workdir / "metrics.jsonl", resume_step or 0, finished=finished)
      purge = {"purge_step": resume_step + 1} if resume_step and (workdir / "tb").exists() else {}
      self.jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
      try:
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(str(workdir / "tb"), **purge)
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


def truncate_metrics(path: Path, last_step: int, *, finished: bool = False) -> None:
  """Keeps the metrics.jsonl rows of steps <= last_step (the checkpoint training resumes from; 0 = a fresh start)
  and drops the rest: rows a killed run logged after its last checkpoint, which the resumed run logs again, and a
  line cut short by the kill. finished (nothing is left to train: only the final evaluation runs again): the rows
  without a loss at last_step (that evaluation's, logged after the checkpoint) go too. Rewritten atomically, and
  only when something is dropped."""
  if not path.exists():
    return
  kept, dropped = [], 0
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
      step = int(row["step"])
    except (ValueError, TypeError, KeyError):
      dropped += 1
      continue
    if step > last_step or (finished and step == last_step and "loss" not in row):
      dropped += 1
      continue
    kept.append(line)
  if dropped:
    files.write_text(path, "".join(line + "\n" for line in kept))


def _agree(value: int) -> int:
  """The largest of every process's `value` (one tiny allgather in a multi-process run; free in a single one):
  how the processes of one run take the same decision (stop now, refuse to start)."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils

  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


# ------------------------------------------------------------------------------------------------------------
# config values, checked before anything is built
# ------------------------------------------------------------------------------------------------------------
_ABSENT = object()


def _lookup(config, key: str):
  node = config
  for part in key.split("."):
    try:
      if part not in node:
        return _ABSENT
    except TypeError:
      return _ABSENT
    node = node[part]
  return node


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# key -> (check, what it must be); keys a config lacks are skipped
_CHECKS: dict[str, tuple[Callable, str]] = {
  "seed": (_is_int, "an integer"),
  "batch_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
  "eval_batch_size": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
  "num_epochs": (lambda v: _is_int(v) and v >= 1, "a positive integer"),
  "log_every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = only the last step)"),
  "eval_every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = only at the end)"),
  "checkpoint_every": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = only at the end)"),
  "keep_checkpoints": (lambda v: v is None or (_is_int(v) and v >= 1), "a positive integer (or None: keep all)"),
  "optim.lr": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
  "optim.end_lr": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
  "optim.weight_decay": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
  "optim.grad_clip": (lambda v: _is_number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0 (0 = off)"),
  "optim.b1": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
  "optim.b2": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
  "optim.eps": (lambda v: _is_number(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
  "optim.warmup_steps": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
  "optim.schedule": (lambda v: v in ("constant", "cosine"), "constant or cosine"),
  "mesh.data": (lambda v: _is_int(v) and (v >= 1 or v == -1), "a positive integer or -1 (the remaining devices)"),
  "mesh.fsdp": (lambda v: _is_int(v) and (v >= 1 or v == -1), "a positive integer or -1 (the remaining devices)"),
  "mesh.tensor": (lambda v: _is_int(v) and (v >= 1 or v == -1), "a positive integer or -1 (the remaining devices)"),
}


def validate_config(config) -> None:
  """The training values the loop reads, checked before any model is built or file written: InputError naming the
  first bad key and what it must be (e.g. 'config: batch_size must be a positive integer, got 0'). num_steps must
  be >= 1, or -1 in configs that have num_epochs (-1 = num_epochs over the train split)."""
  num_steps = _lookup(config, "num_steps")
  if num_steps is not _ABSENT:
    epochs = _lookup(config, "num_epochs") is not _ABSENT
    if not (_is_int(num_steps) and (num_steps >= 1 or (epochs and num_steps == -1))):
      what = "a positive integer (or -1: num_epochs over the train split)" if epochs else "a positive integer"
      raise InputError(f"config: num_steps must be {what}, got {num_steps!r}")
  for key, (ok, what) in _CHECKS.items():
    value = _lookup(config, key)
    if value is not _ABSENT and not ok(value):
      raise InputError(f"config: {key} must be {what}, got {value!r}")


# ------------------------------------------------------------------------------------------------------------
# one run per workdir
# ------------------------------------------------------------------------------------------------------------
_HELD: dict[str, list] = {}  # lock file -> [fd, how many nested `workdir_lock`s hold it]
_HELD_GUARD = threading.Lock()


def _lock_path(workdir: Path) -> Path:
  index = jax.process_index()
  return Path(workdir).absolute() / (".lock" if index == 0 else f".lock.{index}")


def _lock_holder(fd: int) -> str:
  """Who holds the lock, from the JSON its holder wrote (retried briefly: it writes just after locking)."""
  for _ in range(20):
    try:
      info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
      return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (ValueError, KeyError, TypeError, OSError):
      time.sleep(0.05)
  return "pid unknown"


@contextlib.contextmanager
def workdir_lock(workdir):
  """Holds WORKDIR/.lock for the run's life, so a second training run on the same workdir fails at once with an
  InputError naming the holder ('WORKDIR is in use by another training run (pid 1234 on host x, started ...)').

  An exclusive, non-blocking `fcntl.flock` on an open file descriptor: the kernel releases it when the process
  dies however it dies (SIGKILL, OOM killer), so a lock file left by a killed run never blocks the next one (the
  file itself stays, holding the dead run's pid; only the flock counts). The file holds {pid, host, started}.

  Multi-process runs: every process locks a file of its own (process 0 WORKDIR/.lock, process i WORKDIR/.lock.i), so
  the processes of one run never contend with each other, whether WORKDIR is shared or a per-host folder, and a
  second run is refused on every host; whether to go on is agreed by all processes (one allgather), so they fail
  together instead of some waiting in a collective for the others. Re-entrant in a process: the CLI locks before
  building the task (which may write into WORKDIR), `train` locks again for library callers."""
  path = _lock_path(workdir)
  key = str(path)
  with _HELD_GUARD:
    held = _HELD.get(key)
    if held is not None:
      held[1] += 1
  if held is None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      holder = None
    except BlockingIOError:
      holder = _lock_holder(fd)
    if _agree(holder is not None):
      os.close(fd)  # releases the flock, if this process got it
      where = Path(workdir)
      if holder is None:
        raise InputError(f"{where} is in use by another training run (on another of this run's hosts)")
      raise InputError(f"{where} is in use by another training run ({holder}); wait for it or choose another --workdir")
    info = {
      "pid": os.getpid(),
      "host": socket.gethostname(),
      "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8"), 0)
    os.fsync(fd)
    with _HELD_GUARD:
      _HELD[key] = [fd, 1]
  try:
    yield path
  finally:
    with _HELD_GUARD:
      entry = _HELD[key]
      entry[1] -= 1
      last = entry[1] == 0
      if last:
        del _HELD[key]
    if last:
      try:
        os.ftruncate(entry[0], 0)  # a released lock file names no holder
      finally:
        os.close(entry[0])  # releases the flock


# ------------------------------------------------------------------------------------------------------------
# resuming with a changed config
# ------------------------------------------------------------------------------------------------------------
# Keys that may change between a run and its resumption without --allow-config-change: how long the run is
# (extending num_steps is the common case; the LR schedule is rebuilt for the new length, so a cosine decay stretches
# over it from the resumed step on), how often it logs / evaluates / checkpoints, how it is laid out on the devices (a
# resumed job may get another allocation), and what is evaluated (every key named eval_* or *_eval_*, e.g.
# data.eval_split: a run may be trained first and evaluated when resumed). None of them changes what a training step
# computes. They are still recorded in config_history.jsonl. IGNORED_ON_RESUME is neither compared nor recorded.
RESUMABLE_KEYS = (
  "num_steps",
  "num_epochs",
  "log_every",
  "checkpoint_every",
  "keep_checkpoints",
  "data.prefetch_threads",
  "mesh.data",
  "mesh.fsdp",
  "mesh.tensor",
  "sharding_rules",
)
_EVAL_KEY = re.compile(r"(^|[._])eval(_|$)")
IGNORED_ON_RESUME = ("progress",)

_allow_config_change = contextvars.ContextVar("allow_config_change", default=False)


@contextlib.contextmanager
def allowing_config_change(allow: bool = True):
  """`train` calls inside accept a changed config on resume (the CLI's --allow-config-change): the task factories
  between the CLI and `train` (preference.train.run, adapt.train_lora.run) need not pass the flag along."""
  token = _allow_config_change.set(bool(allow))
  try:
    yield
  finally:
    _allow_config_change.reset(token)


def _flat(tree, prefix: str = "") -> dict:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
  """dotted key -> (old, new) for every value that differs between two configs' JSON (IGNORED_ON_RESUME left out;
  a key only one of them has shows '(absent)' on the other side)."""
  a, b = _flat(old), _flat(new)
  changes = {}
  for key in sorted(set(a) | set(b)):
    if key in IGNORED_ON_RESUME:
      continue
    va, vb = a.get(key, "(absent)"), b.get(key, "(absent)")
    if va != vb:
      changes[key] = (va, vb)
  return changes


def _resumable(key: str) -> bool:
  return key in RESUMABLE_KEYS or _EVAL_KEY.search(key) is not None


def _short(value) -> str:
  text = value if value == "(absent)" else json.dumps(value)
  return text if len(text) <= 40 else text[:37] + "..."


def has_checkpoint(workdir) -> bool:
  """Whether WORKDIR/checkpoints holds a finished checkpoint (a step-named folder; orbax writes under a temporary
  name and renames), i.e. whether a run there would resume."""
  d = Path(workdir) / "checkpoints"
  return d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir())


def check_config_change(config, workdir, *, allow: bool | None = None, resuming: bool | None = None) -> dict:
  """The changes between the config a run in WORKDIR started with (WORKDIR/config.json) and `config`, when the run
  resumes (a checkpoint exists); {} for a fresh start or an unreadable config.json. A change to a key outside
  RESUMABLE_KEYS is an InputError listing the first few changes ('key: old -> new'), unless allowed (the argument,
  else `allowing_config_change`)."""
  workdir = Path(workdir)
  if resuming is None:
    resuming = has_checkpoint(workdir)
  path = workdir / "config.json"
  old = None
  if resuming and path.exists():
    try:
      old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
      log(f"cannot read {path} ({e}): resuming without comparing configs")
  if not isinstance(old, dict):
    _agree(0)  # the processes that can compare may refuse: take part in their decision
    return {}
  changes = config_changes(old, json.loads(config.to_json_best_effort()))
  flagged = [k for k in changes if not _resumable(k)]
  allow = _allow_config_change.get() if allow is None else allow
  refuse = bool(flagged) and not allow
  if _agree(refuse):  # every process of a multi-process run refuses, not only those that can read config.json
    if not refuse:
      raise InputError(f"{path}: another process of this run refused the changed config")
    shown = "; ".join(f"{k}: {_short(changes[k][0])} -> {_short(changes[k][1])}" for k in flagged[:4])
    more = f"; {len(flagged) - 4} more" if len(flagged) > 4 else ""
    raise InputError(
      f"{path}: resuming with a config that differs from the one this run started with ({shown}{more}); "
      "pass --allow-config-change to resume with it, or choose another --workdir"
    )
  return changes


# ------------------------------------------------------------------------------------------------------------
# SIGTERM / SIGINT: stop at the next step boundary with a checkpoint
# ------------------------------------------------------------------------------------------------------------
class StopSignals:
  """SIGTERM and SIGINT handlers for the training loop's duration (main thread only; the previous handlers are put
  back on exit). A signal only sets `signum`: the loop sees it at the next step boundary, saves a checkpoint there
  and raises Interrupted. Further signals while stopping are acknowledged and otherwise ignored, so a second
  Ctrl-C cannot cut the checkpoint short (orbax also writes it under a temporary name and renames it when complete,
  so even SIGKILL leaves the previous checkpoints intact)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.signum = 0
    self._previous: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._previous[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, handler in self._previous.items():
      signal.signal(s, signal.SIG_DFL if handler is None else handler)
    self._previous.clear()

  def _handle(self, signum, frame):
    name = signal.Signals(signum).name
    if self.signum:
      text = f"{name} again: already stopping, saving the checkpoint; wait for it\n"
    else:
      self.signum = signum
      text = f"{name}: stopping after the current step (a checkpoint is saved there)\n"
    if jax.process_index() == 0:
      try:
        os.write(2, text.encode())  # not print(): a handler may interrupt a write to sys.stderr
      except OSError:
        pass


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


def train(task: Task, config, workdir, *, allow_config_change: bool | None = None) -> TrainResult:
  """Runs (or resumes) training as configured. Config keys used: seed, batch_size, num_steps, mesh.{data,fsdp,tensor},
  sharding_rules, optim.*, log_every, eval_every, checkpoint_every, keep_checkpoints, progress.

  The config's values are checked first (`validate_config`), WORKDIR is locked for the run (`workdir_lock`), and a
  resumed run's config is compared with WORKDIR/config.json (`check_config_change`; allow_config_change None: as
  `allowing_config_change` says); every change on resume is appended to WORKDIR/config_history.jsonl as
  {time, step, changes: {key: [old, new]}}, and config.json is rewritten (atomically) with the config in force.

  SIGTERM / SIGINT during the loop: at the next step boundary a checkpoint of that step is saved (with the data
  iterator, like every checkpoint) and `Interrupted(signum)` is raised once the writers and the checkpointer are
  closed. In a multi-process run the processes agree on the stop each step (one allgather of the signal number, see
  `_agree`), so all of them save the same step and stop together; a single-process run only reads a flag."""
  validate_config(config)
  with workdir_lock(workdir):
    return _train(task, config, Path(workdir), allow_config_change)


def _record_config(config, workdir: Path, latest: int | None, allow: bool | None) -> None:
  """The resume check, then config.json and the config_history.jsonl record (process 0 writes them)."""
  changes = check_config_change(config, workdir, allow=allow, resuming=latest is not None)
  if jax.process_index() != 0:  # what this run is, next to its checkpoints (one writer in a multi-process run)
    return
  workdir.mkdir(parents=True, exist_ok=True)
  if changes:
    log(
      f"resuming at step {latest} with a changed config: "
      + "; ".join(f"{k}: {_short(a)} -> {_short(b)}" for k, (a, b) in changes.items())
    )
    record = {
      "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
      "step": latest,
      "changes": {k: list(v) for k, v in changes.items()},
    }
    with open(workdir / "config_history.jsonl", "a", encoding="utf-8") as f:
      f.write(json.dumps(record) + "\n")
  files.write_text(workdir / "config.json", config.to_json_best_effort(indent=2))


def _train(task: Task, config, workdir: Path, allow_config_change: bool | None) -> TrainResult:
  ckpt = Checkpointer(workdir / "checkpoints", max_to_keep=config.get("keep_checkpoints", 3))
  try:
    latest = ckpt.latest_step()
    _record_config(config, workdir, latest, allow_config_change)
    return _run(task, config, workdir, ckpt, latest)
  finally:
    ckpt.close()


def _run(task: Task, config, workdir: Path, ckpt: Checkpointer, latest: int | None) -> TrainResult:
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

  iterator = task.make_iterator()
  start = 0
  if latest is not None:
    restored = ckpt.restore(latest, {"params": trainable, "opt": opt_state}, data_iterator=iterator)
    trainable, opt_state, start = restored["params"], restored["opt"], latest
    log(f"resumed from {ckpt.directory / str(latest)} at step {start}")

  writer = MetricWriter(workdir, resume_step=latest, finished=latest is not None and latest >= total)
  losses: dict[int, float] = {}
  eval_metrics: dict = {}
  every = lambda n, s: n and s % n == 0
  status, last_good = "done", latest
  bar = None

  def stop(signum: int, step: int):
    """The agreed stop after `step`: its checkpoint (unless it has one), then Interrupted."""
    name = signal.Signals(signum).name
    if bar is not None:
      bar.close()
    if step > 0 and step != last_good:
      log(f"{name}: saving a checkpoint at step {step} before stopping")
      ckpt.save(step, {"params": trainable, "opt": opt_state}, data_iterator=iterator)
    where = (
      f"its checkpoint is {ckpt.directory / str(step)}: run the same command to resume"
      if step > 0
      else "no step had been taken, nothing to save"
    )
    raise Interrupted(signum, f"stopped by {name} at step {step}; {where}")

  try:
    with StopSignals() as signals:
      bar = _progress(total, start, config.get("progress", True))
      for step in range(start + 1, total + 1):
        signum = _agree(signals.signum)  # a step boundary: the previous step is done, this one not started
        if signum:
          stop(signum, step - 1)
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
      final_step = max([start] + list(losses))
      if status == "done":  # a signal during the last step: stop before the final evaluation and export
        signum = _agree(signals.signum)
        if signum:
          stop(signum, final_step)
    if bar is not None:
      bar.close()
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
  return TrainResult(status, final_step, losses, eval_metrics, export_path, n_train, n_frozen)


def _progress(total: int, start: int, enabled: bool):
  if not enabled or jax.process_index() != 0:
    return None

  return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)
