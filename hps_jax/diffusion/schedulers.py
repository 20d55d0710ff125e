"""Noise schedulers for Stable Diffusion sampling and training: PNDM (PLMS), DDIM and DDPM's forward process.

Everything is functional: a `SchedulerConfig` (frozen, hashable, so it can be a static argument of `jax.jit`) plus the
number of inference steps fix a scheduler; the step functions take the timestep as a (possibly traced) integer and
carry whatever history they need in an explicit pytree, so a whole sampling loop fits in one `jax.lax.scan`:

    ts = pndm_timesteps(config, 50)
    def body(carry, t):
      x, state = carry
      x, state = pndm_step(config, state, unet(x, t), t, x, 50)
      return (x, state), None
    (x0, _), _ = jax.lax.scan(body, (x_T, pndm_init_state(x_T.shape)), ts)

The numerics follow diffusers (PyTorch) to the bit where that is possible:

- The training noise table is built as diffusers builds it in float32: `torch.linspace` followed by squaring for
  "scaled_linear". torch's CPU linspace does not compute `start + i * step` in two roundings but, as compiled into
  its AVX2/AVX-512 kernels, as one fused multiply-add from the nearer end: `fma(step, i, start)` for the first half
  and `fma(-step, steps - 1 - i, end)` for the second, with `step = (end - start) / (steps - 1)` in float32.
  `_torch_linspace_f32` reproduces that with exact rational arithmetic (NumPy's float64 linspace, or the two-rounding
  float32 formula, differ in a third of the entries by one ulp).
- `torch.cumprod` on the CPU accumulates a float32 input in float64 and rounds each partial product to float32;
  a float32 `np.cumprod` differs from it in almost every entry (up to 3e-7 absolute).
- The per-timestep scalars (sqrt(alpha_bar), the PNDM coefficient denominators, ...) are computed once on the host in
  NumPy float32 in diffusers' operation order and gathered by timestep at run time. Computing them under `jit`
  instead would let XLA rewrite `x / sqrt(a)` into `x * rsqrt(a)` and contract `a * b + c` into FMAs.
  The host square root is IEEE's correctly rounded one. PyTorch's CPU `sqrt` (and `** 0.5`, which dispatches to
  it) is not: in the x86 (AVX2) build tested it is one ulp off for about a fifth of float32 inputs (and for some
  float64 ones). diffusers keeps `alphas_cumprod` on the CPU, so its scalars carry this even when sampling on a GPU.
  That, not operation order, is what separates this module from diffusers: with torch's sqrt substituted for
  `_host_sqrt` (the tests do), the op-by-op results are bit-identical.
- XLA's algebraic simplifier rewrites `x / broadcast(c)`, a tensor divided by a scalar, into `x * (1 / c)`, even
  op by op outside `jit`; that is one ulp off in about half the entries. PyTorch's CPU kernels divide (its CUDA
  kernels, given a CPU 0-d divisor as diffusers passes, do multiply by the reciprocal). `_divide` keeps the true
  division by materialising the divisor behind an optimization barrier (one latent-sized array per division).
- The PLMS combination takes its weights and divisor from a small table indexed by the (traced) step counter, which
  keeps the five cases in one branch-free code path and the divisors non-constant.

What remains: inside a jitted function XLA's CPU and GPU backends contract elementwise `a * x + b * y` into FMAs,
which PyTorch's eager kernels never do, so a jitted sampling loop differs from diffusers by a few float32 ulps;
run op by op (no `jit`), and with the host sqrt replaced by torch's, the step functions reproduce diffusers' CPU
results bit for bit (see tests/diffusion/test_schedulers.py).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from fractions import Fraction
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
  "SchedulerConfig",
  "PNDMState",
  "add_noise",
  "alphas_cumprod",
  "betas",
  "ddim_step",
  "ddim_timesteps",
  "final_alpha_cumprod",
  "pndm_init_state",
  "pndm_step",
  "pndm_timesteps",
  "training_target",
  "velocity",
]

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

# diffusers options left unimplemented: a config may carry them only at these (default) values.
_UNSUPPORTED_IF_SET = {"thresholding": False, "rescale_betas_zero_snr": False}


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """The numerical settings of diffusers' scheduler configs; the defaults are Stable Diffusion v1.x's
  `scheduler/scheduler_config.json` (PNDMScheduler, scaled-linear betas from 0.00085 to 0.012, steps_offset 1).

  Note that diffusers' own class defaults differ (beta_schedule "linear", steps_offset 0, and for DDIM
  set_alpha_to_one=True and clip_sample=True); a scheduler built from the SD config, as the pipelines do, gets these.
  """

  num_train_timesteps: int = 1000
  beta_start: float = 0.00085
  beta_end: float = 0.012
  beta_schedule: str = "scaled_linear"
  trained_betas: tuple[float, ...] | None = None
  steps_offset: int = 1
  set_alpha_to_one: bool = False
  skip_prk_steps: bool = True
  clip_sample: bool = False
  clip_sample_range: float = 1.0
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"

  def __post_init__(self):
    if self.trained_betas is None and self.beta_schedule not in BETA_SCHEDULES:
      raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {self.beta_schedule!r}")
    if self.trained_betas is not None:
      object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
      if len(self.trained_betas) != self.num_train_timesteps:
        raise ValueError(
          f"trained_betas has {len(self.trained_betas)} entries, num_train_timesteps is {self.num_train_timesteps}"
        )
    if self.prediction_type not in PREDICTION_TYPES:
      raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
    if self.timestep_spacing not in TIMESTEP_SPACINGS:
      raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.timestep_spacing!r}")

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
    """Builds a config from a diffusers config dict; keys that do not affect these schedulers are ignored, and
    features left unimplemented (thresholding, zero-terminal-SNR rescaling) are refused when switched on."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key, default in _UNSUPPORTED_IF_SET.items():
      if key in d and d[key] not in (None, default):
        raise NotImplementedError(f"scheduler option {key}={d[key]!r} is not supported")
    kwargs = {k: v for k, v in d.items() if k in names}
    return cls(**kwargs)

  @classmethod
  def from_json(cls, path: str | os.PathLike) -> "SchedulerConfig":
    """Reads a `scheduler_config.json`; `path` may also be the `scheduler/` folder or a model folder containing it."""
    path = os.fspath(path)
    if os.path.isdir(path):
      for candidate in (
        os.path.join(path, "scheduler_config.json"),
        os.path.join(path, "scheduler", "scheduler_config.json"),
      ):
        if os.path.exists(candidate):
          path = candidate
          break
      else:
        raise FileNotFoundError(f"no scheduler_config.json in {path}")
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    if d["trained_betas"] is not None:
      d["trained_betas"] = list(d["trained_betas"])
    return d


# ---------------------------------------------------------------------------------------------------------------------
# The training noise schedule (host side, NumPy)
# ---------------------------------------------------------------------------------------------------------------------


def _round_to_f32(q: Fraction) -> np.float32:
  """The float32 nearest to the rational q (ties to even), i.e. one correct rounding."""
  guess = np.float32(float(q))  # two roundings (to float64, then float32): off by one ulp at worst
  candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]

  def key(c):
    even = int(np.asarray(c, np.float32).view(np.uint32)) & 1
    return abs(Fraction(float(c)) - q), even

  return min(candidates, key=key)


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """`torch.linspace(start, end, steps, dtype=torch.float32)` as torch's CPU kernel computes it (see module doc)."""
  if steps == 1:
    return np.array([start], np.float32)
  s, e = np.float32(start), np.float32(end)
  step = np.float32(e - s) / np.float32(steps - 1)
  fs, fe, fstep = Fraction(float(s)), Fraction(float(e)), Fraction(float(step))
  half = steps // 2
  out = np.empty(steps, np.float32)
  for i in range(steps):
    exact = fs + fstep * i if i < half else fe - fstep * (steps - 1 - i)
    out[i] = _round_to_f32(exact)
  return out


def _alpha_bar_cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
  """diffusers' `betas_for_alpha_bar` (Glide cosine): float64 arithmetic, stored as float32."""

  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

  return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], np.float32)


@functools.lru_cache(maxsize=None)
def _betas(config: SchedulerConfig) -> np.ndarray:
  n = config.num_train_timesteps
  if config.trained_betas is not None:
    b = np.array(config.trained_betas, np.float32)
  elif config.beta_schedule == "linear":
    b = _torch_linspace_f32(config.beta_start, config.beta_end, n)
  elif config.beta_schedule == "scaled_linear":
    root = _torch_linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
    b = root * root  # torch's `** 2` is an exact float32 square
  else:
    b = _alpha_bar_cosine_betas(n)
  b.setflags(write=False)
  return b


def betas(config: SchedulerConfig) -> np.ndarray:
  """The float32 beta_t, t = 0..num_train_timesteps-1, bit-identical to diffusers' `scheduler.betas`."""
  return _betas(config).copy()


@functools.lru_cache(maxsize=None)
def _alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  alphas = np.float32(1.0) - _betas(config)  # float32, as torch's `1.0 - betas`
  # torch.cumprod on the CPU accumulates float32 in float64 and rounds each partial product.
  ac = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  ac.setflags(write=False)
  return ac


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
  """The float32 alpha_bar_t = prod_{s<=t} (1 - beta_s), bit-identical to diffusers' `scheduler.alphas_cumprod`."""
  return _alphas_cumprod(config).copy()


def final_alpha_cumprod(config: SchedulerConfig) -> np.float32:
  """alpha_bar used for the step that lands before t = 0: 1 with set_alpha_to_one, else alpha_bar_0."""
  return np.float32(1.0) if config.set_alpha_to_one else _alphas_cumprod(config)[0]


# The square root used for the host-side tables (a seam for tests that substitute PyTorch's).
_host_sqrt = np.sqrt


def _clear_table_caches():
  """Forgets the cached per-timestep tables (after `_host_sqrt` was replaced)."""
  for f in (_pndm_tables, _ddim_tables):
    f.cache_clear()


def _prev_alphas(config: SchedulerConfig, ratio: int) -> tuple[np.ndarray, np.ndarray]:
  """(alpha_bar_T, alpha_bar_{T - ratio}) for every T, the latter replaced by final_alpha_cumprod below 0."""
  ac = _alphas_cumprod(config)
  prev = np.arange(config.num_train_timesteps) - ratio
  a_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final_alpha_cumprod(config)).astype(np.float32)
  return ac, a_prev


# ---------------------------------------------------------------------------------------------------------------------
# Timesteps
# ---------------------------------------------------------------------------------------------------------------------


def _ascending_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
  """The inference grid in ascending order, by diffusers' `timestep_spacing` rules."""
  n_train = config.num_train_timesteps
  if not 0 < num_inference_steps <= n_train:
    raise ValueError(f"num_inference_steps must be in [1, {n_train}], got {num_inference_steps}")
  if config.timestep_spacing == "linspace":
    return np.linspace(0, n_train - 1, num_inference_steps).round().astype(np.int64)
  if config.timestep_spacing == "leading":
    ratio = n_train // num_inference_steps
    return (np.arange(num_inference_steps) * ratio).round().astype(np.int64) + config.steps_offset
  ratio = n_train / num_inference_steps  # trailing
  return (np.round(np.arange(n_train, 0, -ratio)).astype(np.int64) - 1)[::-1].copy()


def _step_ratio(config: SchedulerConfig, num_inference_steps: int) -> int:
  # diffusers steps back by this integer ratio whatever the spacing, and so do we.
  return config.num_train_timesteps // num_inference_steps


def ddim_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
  """The descending int64 timesteps of `DDIMScheduler.set_timesteps` (e.g. 981, 961, ..., 1 for 50 SD steps)."""
  return _ascending_timesteps(config, num_inference_steps)[::-1].copy()


def pndm_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
  """The int64 timesteps of `PNDMScheduler.set_timesteps` with skip_prk_steps: num_inference_steps + 1 entries,
  the second grid point repeated (981, 961, 961, 941, ..., 1 for 50 SD steps) because the first PLMS step is a
  two-evaluation (Heun-like) step that evaluates the model at both ends of the first interval."""
  _check_plms(config)
  ts = _ascending_timesteps(config, num_inference_steps)
  return np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1].copy()


def _check_plms(config: SchedulerConfig):
  if not config.skip_prk_steps:
    raise NotImplementedError("only PNDM's PLMS path (skip_prk_steps=True, as Stable Diffusion uses) is implemented")


# ---------------------------------------------------------------------------------------------------------------------
# PNDM (PLMS)
# ---------------------------------------------------------------------------------------------------------------------


class PNDMState(NamedTuple):
  """PLMS history. `ets` holds the last (up to) four stored model outputs, newest last, zero-padded at the front;
  `counter` is the number of steps taken; `cur_sample` is the sample of the first step, reused by the second."""

  ets: jax.Array
  counter: jax.Array
  cur_sample: jax.Array


def pndm_init_state(shape, dtype=jnp.float32) -> PNDMState:
  """The state before the first `pndm_step`, for samples of the given shape and dtype (keep the dtype equal to
  the sample's so that the state is a fixed-type `lax.scan` carry)."""
  shape = tuple(shape)
  return PNDMState(
    ets=jnp.zeros((4,) + shape, dtype), counter=jnp.zeros((), jnp.int32), cur_sample=jnp.zeros(shape, dtype)
  )


# Linear-multistep cases, indexed by min(counter, 4): weights of the appended history (newest first), then a factor
# and a divisor applied in diffusers' order, `(w . e) * factor / divisor`:
#   0: first step, the new output alone;             1: second step, (e_new + e_first) / 2 (not stored);
#   2: (3 e1 - e2) / 2;   3: (23 e1 - 16 e2 + 5 e3) / 12;   4+: (1/24) * (55 e1 - 59 e2 + 37 e3 - 9 e4).
_PLMS_WEIGHTS = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [3, -1, 0, 0], [23, -16, 5, 0], [55, -59, 37, -9]], np.float32)
_PLMS_FACTOR = np.array([1, 1, 1, 1, 1 / 24], np.float32)
_PLMS_DIVISOR = np.array([1, 2, 2, 12, 1], np.float32)


@functools.lru_cache(maxsize=None)
def _pndm_tables(config: SchedulerConfig, num_inference_steps: int) -> dict[str, np.ndarray]:
  """Scalars of diffusers' `_get_prev_sample` for a step from T to T - ratio, for every T, in its float32 op order."""
  a_t, a_prev = _prev_alphas(config, _step_ratio(config, num_inference_steps))
  one = np.float32(1)
  b_t, b_prev = one - a_t, one - a_prev
  return {
    "sample_coeff": _host_sqrt(a_prev / a_t),
    "alpha_diff": a_prev - a_t,
    "denom": a_t * _host_sqrt(b_prev) + _host_sqrt(a_t * b_t * a_prev),
    "sqrt_alpha": _host_sqrt(a_t),
    "sqrt_beta": _host_sqrt(b_t),
  }


def _divide(x, divisor):
  """x / divisor for a scalar divisor, divided elementwise as PyTorch does rather than multiplied by the reciprocal
  (XLA's rewrite of a division by a broadcast scalar, see the module doc)."""
  divisor = jax.lax.optimization_barrier(jnp.broadcast_to(jnp.asarray(divisor, x.dtype), x.shape))
  return x / divisor


def _gather(table: np.ndarray, index, dtype):
  # Samples in reduced precision take the scalars in that precision, as torch's 0-d tensors promote to the sample's.
  return jnp.asarray(table)[index].astype(dtype)


def pndm_step(
  config: SchedulerConfig, state: PNDMState, model_output, timestep, sample, num_inference_steps: int
) -> tuple[jax.Array, PNDMState]:
  """One step of `PNDMScheduler.step` (PLMS path) for the current `timestep` (an entry of `pndm_timesteps`).

  Returns the previous sample and the new state. `timestep` and `state` may be traced; `config` and
  `num_inference_steps` are static. Step k (counter k) does, with r = num_train_timesteps // num_inference_steps:
    k = 0: x' = prev(x, t -> t - r, e_0); the sample x is kept.
    k = 1: x' = prev(x_kept, t + r -> t, (e_1 + e_0) / 2), i.e. a Heun step redoing the first interval; e_1 is
           not added to the history.
    k >= 2: Adams-Bashforth of order min(k, 4) over the stored outputs (e_0, e_2, e_3, ...).
  prev() is PNDM's formula (9): x' = sqrt(a'/a) x - (a' - a) e / (a sqrt(1 - a') + sqrt(a (1 - a) a')).
  """
  _check_plms(config)
  ratio = _step_ratio(config, num_inference_steps)
  dtype = sample.dtype
  model_output = model_output.astype(dtype)
  timestep = jnp.asarray(timestep, jnp.int32)
  counter = state.counter
  first, second = counter == 0, counter == 1

  appended = jnp.concatenate([state.ets[1:], model_output[None]], axis=0)
  case = jnp.clip(counter, 0, 4)
  w = _gather(_PLMS_WEIGHTS, case, dtype)
  combo = w[0] * appended[3] + w[1] * appended[2] + w[2] * appended[1] + w[3] * appended[0]
  eps = _divide(combo * _gather(_PLMS_FACTOR, case, dtype), _gather(_PLMS_DIVISOR, case, dtype))

  x = jnp.where(second, state.cur_sample, sample)
  t_from = jnp.clip(jnp.where(second, timestep + ratio, timestep), 0, config.num_train_timesteps - 1)
  tab = _pndm_tables(config, num_inference_steps)
  if config.prediction_type == "v_prediction":
    eps = _gather(tab["sqrt_alpha"], t_from, dtype) * eps + _gather(tab["sqrt_beta"], t_from, dtype) * x
  elif config.prediction_type != "epsilon":
    raise ValueError(f"PNDM supports prediction_type 'epsilon' or 'v_prediction', not {config.prediction_type!r}")
  prev_sample = _gather(tab["sample_coeff"], t_from, dtype) * x - _divide(
    _gather(tab["alpha_diff"], t_from, dtype) * eps, _gather(tab["denom"], t_from, dtype)
  )

  new_state = PNDMState(
    ets=jnp.where(second, state.ets, appended),
    counter=counter + 1,
    cur_sample=jnp.where(first, sample, state.cur_sample),
  )
  return prev_sample, new_state


# ---------------------------------------------------------------------------------------------------------------------
# DDIM
# ---------------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _ddim_tables(config: SchedulerConfig, num_inference_steps: int, eta: float | None) -> dict[str, np.ndarray]:
  """Scalars of `DDIMScheduler.step` for a step from T to T - ratio, for every T; the eta-dependent ones only for a
  static eta."""
  a_t, a_prev = _prev_alphas(config, _step_ratio(config, num_inference_steps))
  one = np.float32(1)
  b_t, b_prev = one - a_t, one - a_prev
  variance = (b_prev / b_t) * (one - a_t / a_prev)
  tab = {
    "sqrt_alpha": _host_sqrt(a_t),
    "sqrt_beta": _host_sqrt(b_t),
    "sqrt_alpha_prev": _host_sqrt(a_prev),
    "one_minus_alpha_prev": one - a_prev,
    "sqrt_variance": _host_sqrt(variance),
  }
  if eta is not None:
    std = np.float32(eta) * tab["sqrt_variance"]
    tab["std"] = std
    with np.errstate(invalid="ignore"):  # eta > 1 can make this NaN, as in diffusers
      tab["direction"] = _host_sqrt(one - a_prev - std * std)
  return tab


def ddim_step(
  config: SchedulerConfig,
  model_output,
  timestep,
  sample,
  num_inference_steps: int,
  eta: float = 0.0,
  key: jax.Array | None = None,
  variance_noise=None,
  use_clipped_model_output: bool = False,
) -> jax.Array:
  """One step of `DDIMScheduler.step` from `timestep` (an entry of `ddim_timesteps`) to timestep - ratio.

  x0 = (x - sqrt(1 - a) e) / sqrt(a) (or the v / sample parametrisations), optionally clipped;
  x' = sqrt(a') x0 + sqrt(1 - a' - s^2) e + s z, with s = eta sqrt((1 - a') / (1 - a) (1 - a / a')).
  eta = 0 is deterministic. For eta > 0, z is `variance_noise` if given, else drawn from `key`. A Python-number
  eta is folded into the host-side tables; a traced eta is applied at run time (then the noise term is always
  added, which for eta = 0 adds exactly zero).
  """
  dtype = sample.dtype
  model_output = model_output.astype(dtype)
  t = jnp.clip(jnp.asarray(timestep, jnp.int32), 0, config.num_train_timesteps - 1)
  static_eta = isinstance(eta, (int, float, np.floating, np.integer))
  tab = _ddim_tables(config, num_inference_steps, float(eta) if static_eta else None)
  g = lambda name: _gather(tab[name], t, dtype)  # noqa: E731
  sqrt_a, sqrt_b = g("sqrt_alpha"), g("sqrt_beta")

  if config.prediction_type == "epsilon":
    x0 = _divide(sample - sqrt_b * model_output, sqrt_a)
    eps = model_output
  elif config.prediction_type == "sample":
    x0 = model_output
    eps = _divide(sample - sqrt_a * x0, sqrt_b)
  else:  # v_prediction
    x0 = sqrt_a * sample - sqrt_b * model_output
    eps = sqrt_a * model_output + sqrt_b * sample
  if config.clip_sample:
    x0 = jnp.clip(x0, -config.clip_sample_range, config.clip_sample_range)

  if static_eta:
    std, direction = g("std"), g("direction")
  else:
    std = jnp.asarray(eta, dtype) * g("sqrt_variance")
    direction = jnp.sqrt(g("one_minus_alpha_prev") - std * std)
  if use_clipped_model_output:
    eps = _divide(sample - sqrt_a * x0, sqrt_b)
  prev_sample = g("sqrt_alpha_prev") * x0 + direction * eps

  if not static_eta or eta > 0:
    if variance_noise is None:
      if key is None:
        raise ValueError("ddim_step with eta > 0 needs `key` or `variance_noise`")
      variance_noise = jax.random.normal(key, sample.shape, dtype)
    prev_sample = prev_sample + std * jnp.asarray(variance_noise, dtype)
  return prev_sample


# ---------------------------------------------------------------------------------------------------------------------
# DDPM forward process (training)
# ---------------------------------------------------------------------------------------------------------------------


def _noise_scales(config: SchedulerConfig, timesteps, like):
  """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) in `like`'s dtype, shaped to broadcast over its trailing axes."""
  ac = jnp.asarray(_alphas_cumprod(config)).astype(like.dtype)  # diffusers casts the table first, then takes roots
  a = ac[jnp.asarray(timesteps, jnp.int32)].reshape(-1)
  a = a.reshape(a.shape + (1,) * (like.ndim - 1)) if like.ndim >= 1 else a.reshape(())
  return jnp.sqrt(a), jnp.sqrt(1 - a)


def add_noise(config: SchedulerConfig, original_samples, noise, timesteps) -> jax.Array:
  """`DDPMScheduler.add_noise`: sqrt(a_t) x0 + sqrt(1 - a_t) noise, one timestep per leading-axis entry."""
  sqrt_a, sqrt_1ma = _noise_scales(config, timesteps, original_samples)
  return sqrt_a * original_samples + sqrt_1ma * noise.astype(original_samples.dtype)


def velocity(config: SchedulerConfig, sample, noise, timesteps) -> jax.Array:
  """`DDPMScheduler.get_velocity`: the v-prediction target sqrt(a_t) noise - sqrt(1 - a_t) x0."""
  sqrt_a, sqrt_1ma = _noise_scales(config, timesteps, sample)
  return sqrt_a * noise.astype(sample.dtype) - sqrt_1ma * sample


def training_target(config: SchedulerConfig, sample, noise, timesteps) -> jax.Array:
  """The regression target of the denoiser for `config.prediction_type`."""
  if config.prediction_type == "epsilon":
    return noise
  if config.prediction_type == "v_prediction":
    return velocity(config, sample, noise, timesteps)
  return sample
