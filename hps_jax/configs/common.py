"""The config blocks every training config shares: AdamW optimizer, device mesh and logical-axis rules, and the
logging / checkpoint cadence. Each config calls these and then sets its own values, so every hyperparameter is still
visible in (and overridable from) the resulting ConfigDict."""

import ml_collections

from hps_jax.parallel import DEFAULT_RULES


def optimizer(
  lr: float,
  weight_decay: float,
  schedule: str,
  *,
  warmup_steps: int = 0,
  grad_clip: float = 0.0,
  end_lr: float = 0.0,
) -> ml_collections.ConfigDict:
  """AdamW (b1 0.9, b2 0.999, eps 1e-8) with a constant or cosine schedule; grad_clip 0 = off."""
  o = ml_collections.ConfigDict()
  o.lr = lr
  o.weight_decay = weight_decay
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.schedule = schedule  # cosine | constant
  o.warmup_steps = warmup_steps
  o.end_lr = end_lr  # the cosine schedule's final value
  o.grad_clip = grad_clip  # 0 = off
  return o


def mesh_and_rules(c: ml_collections.ConfigDict) -> None:
  """c.mesh (data x fsdp x tensor; one size may be -1 = the rest of the devices) and c.sharding_rules (logical
  parameter/batch axis name -> mesh axes)."""
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.sharding_rules = [(k, list(v) if isinstance(v, tuple) else v) for k, v in DEFAULT_RULES]


def cadence(c: ml_collections.ConfigDict, *, log_every: int, checkpoint_every: int, eval_every: int = 0) -> None:
  """How often the loop logs scalars, evaluates (0 = only at the end) and checkpoints; checkpoints kept; tqdm."""
  c.log_every = log_every
  c.eval_every = eval_every
  c.checkpoint_every = checkpoint_every
  c.keep_checkpoints = 3
  c.progress = True
