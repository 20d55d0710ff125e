"""PNDM / DDIM / DDPM schedulers against diffusers' PyTorch ones, configured as Stable Diffusion v1.x ships them.

The sampling loops drive both implementations with the same deterministic fake model: an ideal denoiser towards a
fixed target, eps(x, t) = (x - sqrt(a_t) target) / sqrt(1 - a_t), plus a per-call jitter array. It depends on the
sample (so step errors feed back, as with a real UNet) yet keeps the sample O(1) (a model that pushes samples
outwards, such as eps = tanh(x), makes the PLMS ODE expand and turns ulp differences into O(1) ones).

Tolerances: the noise table is bit-identical. Per-step outputs agree to a few float32 ulps of the sample: the max
abs error divided by max(1, max |x|) of the step is checked against 1e-6, the plain max abs error (samples reach
|x| ~ 3.3, ulp 2.4e-7) against 2e-6; measured: <= 5.5e-7 scaled, <= 1.7e-6 abs. The only difference op by op
is PyTorch's CPU sqrt, which is not correctly rounded: with it substituted for the host-side sqrt, the eager loops
are bit-identical (tolerance 0). Under `jit`, XLA contracts multiply-adds into FMAs (in the fake model too), so the
scanned loops differ from the eager ones by a few ulps as well.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hps_jax.diffusion import schedulers as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# stable-diffusion-v1-4/scheduler/scheduler_config.json
SD_SCHEDULER_JSON = {
  "_class_name": "PNDMScheduler",
  "_diffusers_version": "0.7.0.dev0",
  "beta_end": 0.012,
  "beta_schedule": "scaled_linear",
  "beta_start": 0.00085,
  "num_train_timesteps": 1000,
  "set_alpha_to_one": False,
  "skip_prk_steps": True,
  "steps_offset": 1,
  "trained_betas": None,
  "clip_sample": False,
}
SHAPE = (2, 4, 8, 8)
TOL = 1e-6
ABS_TOL = 2e-6  # samples reach |x| ~ 3.3 (float32 ulp 2.4e-7); see the module doc for the few-ulp budget


def reference(kind: str, **overrides):
  cls = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler, "ddpm": diffusers.DDPMScheduler}[kind]
  return cls.from_config({**SD_SCHEDULER_JSON, **overrides})


class FakeModel:
  """eps (or v) of an ideal denoiser towards a fixed target, plus jitter[i] at the i-th call; the same float32
  operations in torch and in JAX (eagerly or traced)."""

  def __init__(self, config: S.SchedulerConfig, n_calls: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ac = S.alphas_cumprod(config)
    self.sqrt_a = np.sqrt(ac)
    self.sqrt_b = np.sqrt(np.float32(1) - ac)
    self.inv_sqrt_b = (np.float32(1) / self.sqrt_b).astype(np.float32)
    self.target = rng.uniform(-1, 1, SHAPE).astype(np.float32)
    self.jitter = (0.1 * rng.standard_normal((n_calls,) + SHAPE)).astype(np.float32)
    self.x_T = rng.standard_normal(SHAPE).astype(np.float32)
    self.v = config.prediction_type == "v_prediction"
    self.j = {name: jnp.asarray(getattr(self, name)) for name in ("sqrt_a", "sqrt_b", "inv_sqrt_b", "target", "jitter")}

  def torch(self, x, t, i):
    t = int(t)
    sa, sb, isb = float(self.sqrt_a[t]), float(self.sqrt_b[t]), float(self.inv_sqrt_b[t])
    target = torch.from_numpy(self.target)
    eps = (x - sa * target) * isb + torch.from_numpy(self.jitter[i])
    return sa * eps - sb * target if self.v else eps

  def jax(self, x, t, i):
    j = self.j
    sa, sb, isb = j["sqrt_a"][t], j["sqrt_b"][t], j["inv_sqrt_b"][t]
    eps = (x - sa * j["target"]) * isb + j["jitter"][i]
    return sa * eps - sb * j["target"] if self.v else eps


def run_reference(kind, n, model, overrides=None, noises=None, eta=0.0):
  sched = reference(kind, **(overrides or {}))
  sched.set_timesteps(n)
  x, outs = torch.from_numpy(model.x_T.copy()), []
  for i, t in enumerate(sched.timesteps):
    kwargs = {}
    if kind == "ddim":
      kwargs = {"eta": eta}
      if noises is not None:
        kwargs["variance_noise"] = torch.from_numpy(noises[i])
    x = sched.step(model.torch(x, t, i), t, x, **kwargs).prev_sample
    outs.append(x.numpy().copy())
  return sched.timesteps.numpy(), np.stack(outs)


def run_eager(kind, n, model, config, noises=None, eta=0.0):
  """Our step functions called op by op from a Python loop."""
  ts = S.pndm_timesteps(config, n) if kind == "pndm" else S.ddim_timesteps(config, n)
  x, state, outs = jnp.asarray(model.x_T), S.pndm_init_state(SHAPE), []
  for i, t in enumerate(ts):
    mo = model.jax(x, int(t), i)
    if kind == "pndm":
      x, state = S.pndm_step(config, state, mo, int(t), x, n)
    else:
      x = S.ddim_step(config, mo, int(t), x, n, eta=eta, variance_noise=None if noises is None else noises[i])
    outs.append(np.asarray(x))
  return ts, np.stack(outs)


@functools.partial(jax.jit, static_argnames=("kind", "n", "config", "model"))
def run_scan(x_T, ts, noises, eta, *, kind, n, config, model):
  """The same loop as one `lax.scan` under `jit`, timestep and step counter traced."""

  def body(carry, inputs):
    x, state = carry
    t, i, z = inputs
    mo = model.jax(x, t, i)
    if kind == "pndm":
      x, state = S.pndm_step(config, state, mo, t, x, n)
    else:
      x = S.ddim_step(config, mo, t, x, n, eta=eta, variance_noise=z)
    return (x, state), x

  _, xs = jax.lax.scan(body, (x_T, S.pndm_init_state(x_T.shape, x_T.dtype)), (ts, jnp.arange(ts.shape[0]), noises))
  return xs


def max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def max_scaled(ours, ref):
  """Over the steps of a loop, the largest max-abs error divided by max(1, max |x|) of that step's reference."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  axes = tuple(range(1, ref.ndim))
  return float(np.max(np.abs(ours - ref).max(axis=axes) / np.maximum(1.0, np.abs(ref).max(axis=axes))))


def check_loop(parity, name, ours, ref):
  """Abs error within a few float32 ulps of the sample's scale; scaled error within 1e-6."""
  parity(f"{name} (max abs)", max_abs(ours, ref), ABS_TOL)
  parity(f"{name} (max abs / max(1, |x|))", max_scaled(ours, ref), TOL)


# --------------------------------------------------------------------------------------------------------------------
# Config and noise table
# --------------------------------------------------------------------------------------------------------------------


def test_config_from_sd_json(tmp_path):
  (tmp_path / "scheduler").mkdir()
  (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER_JSON))
  for path in (tmp_path, tmp_path / "scheduler", tmp_path / "scheduler" / "scheduler_config.json"):
    assert S.SchedulerConfig.from_json(path) == S.SchedulerConfig()
  assert S.SchedulerConfig.from_dict(S.SchedulerConfig().to_dict()) == S.SchedulerConfig()
  hash(S.SchedulerConfig())  # usable as a static jit argument
  with pytest.raises(NotImplementedError):
    S.SchedulerConfig.from_dict({"thresholding": True})
  with pytest.raises(ValueError):
    S.SchedulerConfig(prediction_type="x0")


@pytest.mark.parametrize(
  "overrides",
  [
    {},
    {"beta_schedule": "linear"},
    {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02, "num_train_timesteps": 999},
    {"beta_schedule": "squaredcos_cap_v2"},
    {"set_alpha_to_one": True},
  ],
  ids=["sd", "linear", "linear-999", "cosine", "alpha-one"],
)
def test_noise_table_bit_identical(parity, overrides):
  config = S.SchedulerConfig.from_dict({**SD_SCHEDULER_JSON, **overrides})
  ref = reference("pndm", **overrides)
  tag = "-".join(f"{k}={v}" for k, v in overrides.items()) or "sd"
  parity(f"schedulers/betas {tag} (bit-exact)", max_abs(S.betas(config), ref.betas.numpy()), 0.0)
  parity(
    f"schedulers/alphas_cumprod {tag} (bit-exact)", max_abs(S.alphas_cumprod(config), ref.alphas_cumprod.numpy()), 0.0
  )
  assert S.final_alpha_cumprod(config) == ref.final_alpha_cumprod.item()
  assert S.alphas_cumprod(config).dtype == np.float32


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [50, 25, 7])
def test_timesteps_identical(n, spacing):
  config = S.SchedulerConfig(timestep_spacing=spacing)
  for kind, ours in (("pndm", S.pndm_timesteps(config, n)), ("ddim", S.ddim_timesteps(config, n))):
    ref = reference(kind, timestep_spacing=spacing)
    ref.set_timesteps(n)
    np.testing.assert_array_equal(ours, ref.timesteps.numpy(), err_msg=f"{kind} {spacing} {n}")
  if spacing == "leading" and n == 50:
    assert list(S.pndm_timesteps(config, n)[:4]) == [981, 961, 961, 941]


# --------------------------------------------------------------------------------------------------------------------
# Sampling loops
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
@pytest.mark.parametrize("n", [50, 25])
def test_loop_matches_diffusers(parity, kind, n):
  config = S.SchedulerConfig()
  model = FakeModel(config, n + 1)
  ref_ts, ref = run_reference(kind, n, model)
  ts, ours = run_eager(kind, n, model, config)
  np.testing.assert_array_equal(ts, ref_ts)
  assert np.abs(ref).max() < 4  # the fake model keeps the sample O(1)
  check_loop(parity, f"schedulers/{kind} {n} steps, every step vs diffusers", ours, ref)

  xs = run_scan(
    jnp.asarray(model.x_T),
    jnp.asarray(ts, jnp.int32),
    jnp.zeros((len(ts),) + SHAPE),
    0.0,
    kind=kind,
    n=n,
    config=config,
    model=model,
  )
  check_loop(parity, f"schedulers/{kind} {n} steps, jit(scan) vs eager loop", xs, ours)
  check_loop(parity, f"schedulers/{kind} {n} steps, jit(scan) vs diffusers", xs, ref)


@pytest.fixture
def torch_sqrt(monkeypatch):
  """Host tables computed with PyTorch's (CPU, not correctly rounded) sqrt instead of IEEE's."""

  def sqrt(a):
    return torch.sqrt(torch.from_numpy(np.array(a, np.float32))).numpy()

  S._clear_table_caches()
  monkeypatch.setattr(S, "_host_sqrt", sqrt)
  yield
  S._clear_table_caches()


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_eager_loop_bit_identical_with_torch_sqrt(parity, torch_sqrt, kind):
  """With diffusers' own scalar square roots, every step reproduces diffusers' operation order to the bit."""
  config, n = S.SchedulerConfig(), 50
  model = FakeModel(config, n + 1, seed=1)
  _, ref = run_reference(kind, n, model)
  _, ours = run_eager(kind, n, model, config)
  parity(f"schedulers/{kind} 50 steps with torch's sqrt, every step vs diffusers (bit-exact)", max_abs(ours, ref), 0.0)


@pytest.mark.parametrize("kind", ["pndm", "ddim"])
def test_v_prediction(parity, kind):
  config, n = S.SchedulerConfig(prediction_type="v_prediction"), 25
  model = FakeModel(config, n + 1, seed=2)
  _, ref = run_reference(kind, n, model, overrides={"prediction_type": "v_prediction"})
  _, ours = run_eager(kind, n, model, config)
  check_loop(parity, f"schedulers/{kind} v_prediction {n} steps vs diffusers", ours, ref)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta(parity, eta):
  config, n = S.SchedulerConfig(), 25
  model = FakeModel(config, n, seed=3)
  noises = np.random.default_rng(4).standard_normal((n,) + SHAPE).astype(np.float32)
  _, ref = run_reference("ddim", n, model, noises=noises, eta=eta)
  ts, ours = run_eager("ddim", n, model, config, noises=noises, eta=eta)
  check_loop(parity, f"schedulers/ddim eta={eta} {n} steps vs diffusers (same noise)", ours, ref)
  # a traced eta takes the run-time path for the eta-dependent scalars
  xs = run_scan(
    jnp.asarray(model.x_T),
    jnp.asarray(ts, jnp.int32),
    jnp.asarray(noises),
    jnp.float32(eta),
    kind="ddim",
    n=n,
    config=config,
    model=model,
  )
  check_loop(parity, f"schedulers/ddim eta={eta} {n} steps, jit(scan) traced eta vs diffusers", xs, ref)


def test_ddim_eta_key():
  """With a key instead of explicit noise, x' = x'_deterministic + s z with z ~ N(0, 1) (one jit: compiling
  jax.random.normal takes seconds on the CPU, so it is done once)."""
  config, n, shape = S.SchedulerConfig(), 25, (4, 32, 32)
  x, mo = jnp.ones(shape), jnp.zeros(shape)
  det = S.ddim_step(config, mo, 501, x, n)
  noisy = jax.jit(lambda k: S.ddim_step(config, mo, 501, x, n, eta=1.0, key=k))(jax.random.PRNGKey(0))
  z = (np.asarray(noisy) - np.asarray(det)) / S._ddim_tables(config, n, 1.0)["std"][501]
  assert np.isfinite(z).all() and abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
  with pytest.raises(ValueError):
    S.ddim_step(config, mo, 501, x, n, eta=1.0)


# --------------------------------------------------------------------------------------------------------------------
# Training: forward process
# --------------------------------------------------------------------------------------------------------------------


def test_add_noise_and_velocity(parity):
  config = S.SchedulerConfig()
  ref = reference("ddpm")
  rng = np.random.default_rng(5)
  x0 = rng.standard_normal((6,) + SHAPE[1:]).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 1, 250, 500, 981, 999])
  want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  want_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
  parity("schedulers/ddpm add_noise vs diffusers", max_abs(S.add_noise(config, x0, noise, t), want), TOL)
  jitted = jax.jit(S.add_noise, static_argnums=0)(config, x0, noise, jnp.asarray(t, jnp.int32))
  parity("schedulers/ddpm add_noise jit vs diffusers", max_abs(jitted, want), TOL)
  parity("schedulers/ddpm velocity vs diffusers", max_abs(S.velocity(config, x0, noise, t), want_v), TOL)
  vconfig = S.SchedulerConfig(prediction_type="v_prediction")
  assert max_abs(S.training_target(vconfig, x0, noise, t), want_v) <= TOL
  assert S.training_target(config, x0, noise, t) is noise
  # one timestep for the whole batch broadcasts like diffusers' flatten/unsqueeze
  want1 = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.tensor(500)).numpy()
  assert max_abs(S.add_noise(config, x0, noise, 500), want1) <= TOL
