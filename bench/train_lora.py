"""LoRA train step at 512² (64² latents), rank 32, bf16: hps_jax (hand-written LoRA, optax) vs diffusers + peft
PyTorch, same architecture, same weights, same inputs, same machine, same run. MFU on a known GPU.

The model is the SD v1.4 UNet (--preset sd14, 860M parameters; --preset tiny: every SD 1.x block type at toy widths
for a smoke run) with random weights: diffusers builds it (`UNet2DConditionModel`, default init), writes it with
`save_pretrained`, and hps_jax reads that folder with `load_unet`, so both sides hold the same base weights. Both
sides then add rank-r adapters (alpha = r, scale 1) to to_q / to_k / to_v / to_out.0 of every attn1 / attn2: ours
with `hps_jax.lora.apply_lora`, PyTorch with `unet.add_adapter(peft.LoraConfig(..., init_lora_weights="gaussian"))`;
peft's initial A matrices are copied into ours (B is zero on both sides), and the two adapter parameter counts must
be equal. Every base weight is frozen.

One step is what LoRA training does on cached latents (configs/lora_sd14.py, hps_jax/adapt/train_lora.py): DDPM
`add_noise` of the latents at the given timesteps, the UNet on the noisy latents with a (B, 77, 768) text context,
epsilon-MSE in float32, backward to the adapters only, global-norm clipping and an AdamW update of the adapters,
with the paper recipe's optimizer settings (read from configs/lora_sd14.py: lr 1e-5, weight decay 1e-2, clip 1.0).
The latents, noise, timesteps and context are drawn once with numpy and fed to both sides (the trainer's
`diffusion_loss` draws them in-graph from per-example seeds instead: a few elementwise ops, negligible here), and
the same batch is used at every step.

JAX: `jax.jit` of (adapters, frozen base, optimizer state, batch) -> (adapters, optimizer state, loss) with the
adapters and optimizer state donated, as `hps_jax.train_loop` builds it; lowered and compiled ahead of time (both
timed separately). --dtype is the compute dtype of the base model; parameters and adapters stay float32 (the
adapter branch runs in float32). FLOPs per step come from XLA's `cost_analysis` of the compiled step; MFU =
FLOPs / step time / the device's dense peak (the table in bench/common.py), only on a known GPU (null elsewhere).
PyTorch: float32 parameters, `torch.autocast(bfloat16)` on CUDA for --dtype bfloat16; on CPU autocast bf16 is tried
when asked for and float32 is used if it fails (`torch_dtype` reports what ran); `torch.optim.AdamW` on the LoRA
parameters and `clip_grad_norm_`. The PyTorch side runs first and frees its GPU memory before JAX starts (JAX
reserves most of the GPU when it initializes).

Reported: step time (median of --iters after --warmup untimed steps) and images/s on both sides, the speedup, the
adapter parameter count, and as a sanity check the loss of the first step (identical weights and inputs; B = 0, so
this is the base model's loss) and of the last step (after the same updates) on both sides with their relative
difference: about 1e-6 to 1e-5 in float32; with bf16 compute expect about 1e-3 to 1e-2 (different bf16 rounding
points: XLA fusions vs autocast, which also runs peft's adapter branch in bf16). Prints one JSON line; --out also
writes it. The paper trained at batch 40, which needs a large GPU (add --batch 40; the default is 1).

  python -m bench.train_lora --batch 8 --out bench/results/train_lora_h100_bf16.json               # on a GPU
  python -m bench.train_lora --resolution 256 --dtype float32 --iters 2 --out bench/results/train_lora_cpu.json
  python -m bench.train_lora --preset tiny --resolution 32 --dtype float32 --iters 2               # smoke run
  python -m bench.train_lora --batch 40 --remat --out bench/results/train_lora_h200_bf16.json   # the paper's batch

--remat recomputes each UNet block in the backward pass on both sides (JAX: UNetConfig.remat with --remat-policy;
PyTorch: diffusers' gradient checkpointing): memory for compute, what batch 40 at 512² needs. --attention picks the
JAX attention backend (auto: cuDNN flash attention on a GPU in bf16; hps_jax.models.attention).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import (
  SD_PRESETS,
  aot_compile,
  attention_impls,
  device_name,
  emit,
  flops_per_s,
  mfu,
  peak_flops,
  timed,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # of every attn1 / attn2 (hps_jax.lora.DEFAULT_TARGETS)
CONTEXT_LENGTH = 77


def optim_config():
  """The paper recipe's optimizer settings (configs/lora_sd14.py), shared by both sides."""
  from hps_jax.configs.lora_sd14 import base

  return base().optim


def rel_diff(a: float, b: float) -> float:
  return abs(a - b) / max(abs(b), 1e-30)


# ------------------------------------------------------------------------------------------------------------
# the shared model: diffusers random init -> save_pretrained; peft adapters
# ------------------------------------------------------------------------------------------------------------
def build_torch(args, model_dir: Path):
  """A random-init diffusers UNet written to `model_dir`/unet, then given peft adapters (base frozen). Returns
  (model, {our layer path: Adapter} of the initial adapters, adapter parameter count)."""
  import diffusers
  import peft
  import torch

  from hps_jax.convert.lora import layer_path
  from hps_jax.lora import Adapter

  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel(**SD_PRESETS[args.preset]["unet"])
  model.save_pretrained(model_dir / "unet")
  model.requires_grad_(False)
  model.add_adapter(
    peft.LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGETS)
  )
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  stray = [n for n, _ in trainable if ".lora_" not in n]
  assert not stray, f"non-LoRA parameters are trainable on the PyTorch side: {stray[:4]}"
  adapters = {}
  for name, m in model.named_modules():
    if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {}):
      a = m.lora_A["default"].weight.detach().float().numpy()  # (r, in)
      b = m.lora_B["default"].weight.detach().float().numpy()  # (out, r)
      adapters[layer_path(name)] = Adapter(np.ascontiguousarray(a.T), np.ascontiguousarray(b.T), float(args.rank))
  return model, adapters, sum(p.numel() for _, p in trainable)


# ------------------------------------------------------------------------------------------------------------
# PyTorch: diffusers + peft, torch.optim.AdamW
# ------------------------------------------------------------------------------------------------------------
def torch_side(args, model, inputs) -> dict:
  import diffusers
  import peft
  import torch

  dev = "cuda" if torch.cuda.is_available() else "cpu"
  o = optim_config()
  model = model.to(dev).train()
  if args.remat:
    model.enable_gradient_checkpointing()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.AdamW(params, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  # CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json (the training noise schedule)
  sched = diffusers.DDPMScheduler(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
  )
  nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2))).to(dev)  # noqa: E731
  latents, noise = nchw(inputs["latents"]), nchw(inputs["noise"])
  t = torch.from_numpy(inputs["t"]).long().to(dev)
  ctx = torch.from_numpy(inputs["ctx"]).to(dev)
  state = {"bf16": args.dtype == "bfloat16"}
  losses = []

  def run():
    opt.zero_grad(set_to_none=True)
    noisy = sched.add_noise(latents, noise, t)
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=state["bf16"]):
      pred = model(noisy, t, encoder_hidden_states=ctx).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)  # epsilon target
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, o.grad_clip)
    opt.step()
    if dev == "cuda":
      torch.cuda.synchronize()
    losses.append(float(loss.detach()))

  note = None

  def first_run():  # on CPU, bf16 autocast is tried and float32 used if it fails (before any update ran)
    nonlocal note
    try:
      run()
    except Exception as e:  # noqa: BLE001
      if not (state["bf16"] and dev == "cpu"):
        raise
      note = f"CPU bf16 autocast failed ({type(e).__name__}: {e}); ran float32"
      state["bf16"] = False
      losses.clear()
      run()

  steps = [first_run] + [run] * (args.warmup + args.iters - 1)
  for fn in steps[: args.warmup]:
    fn()
  times = []
  for fn in steps[args.warmup :]:
    times.extend(timed(fn, 1))
  out = {
    "torch_device": dev,
    "torch_version": torch.__version__,
    "diffusers_version": diffusers.__version__,
    "peft_version": peft.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_dtype": "bfloat16 (autocast)" if state["bf16"] else "float32",
    "torch_step_s": statistics.median(times),
    "torch_times_s": times,
    "torch_loss_first": losses[0],
    "torch_loss_last": losses[-1],
  }
  if note:
    out["torch_note"] = note
  return out


# ------------------------------------------------------------------------------------------------------------
# JAX: hps_jax UNet + apply_lora, optax (train_loop's step)
# ------------------------------------------------------------------------------------------------------------
def jax_side(args, model_dir: Path, adapters, inputs) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from hps_jax import lora
  from hps_jax.convert.diffusers import load_unet
  from hps_jax.diffusion import schedulers as sch
  from hps_jax.train_loop import count_params, make_optimizer

  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  t0 = time.perf_counter()
  unet = load_unet(
    model_dir,
    dtype=dtype,
    param_dtype=jnp.float32,
    remat=args.remat,
    remat_policy=args.remat_policy,
    attention_backend=args.attention,
  )
  load_s = time.perf_counter() - t0
  paths = lora.apply_lora(unet, lora.LoRAConfig(rank=args.rank, alpha=float(args.rank)))
  assert sorted(paths) == sorted(adapters), (
    f"adapted layers differ: ours only {sorted(set(paths) - set(adapters))[:4]}, "
    f"peft only {sorted(set(adapters) - set(paths))[:4]}"
  )
  lora.set_adapters(unet, adapters, source="peft's initial adapters")
  n_adapter = lora.count_lora_params(unet)
  sched = sch.SchedulerConfig()  # SD v1.x: scaled-linear betas 0.00085 .. 0.012, epsilon prediction

  graphdef, trainable, frozen = nnx.split(unet, lora.LORA, ...)
  tx, _ = make_optimizer(optim_config(), args.warmup + args.iters)
  opt_state = tx.init(trainable)

  def train_step(trainable, frozen, opt_state, batch):
    def loss_of(trainable):
      model = nnx.merge(graphdef, trainable, frozen)
      latents, noise, t = batch["latents"], batch["noise"], batch["t"]
      noisy = sch.add_noise(sched, latents, noise, t)
      target = sch.training_target(sched, latents, noise, t)
      pred = model(noisy, t, batch["ctx"]).astype(jnp.float32)
      return jnp.mean((pred - target) ** 2)

    loss, grads = jax.value_and_grad(loss_of)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state, loss

  batch = jax.device_put(
    {
      "latents": jnp.asarray(inputs["latents"]),
      "noise": jnp.asarray(inputs["noise"]),
      "t": jnp.asarray(inputs["t"]),
      "ctx": jnp.asarray(inputs["ctx"]),
    }
  )
  step = jax.jit(train_step, donate_argnums=(0, 2))
  compiled, lower_s, compile_s, flops = aot_compile(step, trainable, frozen, opt_state, batch)
  state = {"t": trainable, "o": opt_state}
  losses = []

  def run():
    state["t"], state["o"], loss = compiled(state["t"], frozen, state["o"], batch)
    jax.block_until_ready((state["t"], state["o"], loss))
    losses.append(loss)

  for _ in range(args.warmup):
    run()
  times = timed(run, args.iters)
  return {
    "jax_adapter_params": n_adapter,
    "jax_frozen_params": count_params(frozen),
    "jax_load_s": load_s,
    "jax_lower_s": lower_s,
    "jax_compile_s": compile_s,
    "step_flops": flops,
    "jax_step_s": statistics.median(times),
    "jax_times_s": times,
    "jax_loss_first": float(losses[0]),
    "jax_loss_last": float(losses[-1]),
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="sd14", choices=sorted(SD_PRESETS))
  ap.add_argument("--batch", type=int, default=1, help="images per step (the paper: 40, on a large GPU)")
  ap.add_argument("--resolution", type=int, default=512, help="image side in pixels (latents: resolution / 8)")
  ap.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank)")
  ap.add_argument(
    "--dtype",
    default="bfloat16",
    choices=["float32", "bfloat16"],
    help="compute dtype of the frozen base (parameters and adapters stay float32)",
  )
  ap.add_argument("--remat", action="store_true", help="UNet remat (JAX) / gradient checkpointing (PyTorch)")
  ap.add_argument(
    "--remat-policy",
    default="nothing_saveable",
    choices=["nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"],
    help="what a rematerialized UNet block keeps for the backward pass (jax.checkpoint_policies; JAX only)",
  )
  ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"], help="JAX attention backend")
  ap.add_argument("--iters", type=int, default=5, help="timed steps per framework (median reported)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
  ap.add_argument("--no-torch", action="store_true", help="time only the JAX side")
  ap.add_argument("--out", help="also write the JSON result here")
  args = ap.parse_args(argv)
  kw = SD_PRESETS[args.preset]["unet"]
  down = 2 ** (len(kw["block_out_channels"]) - 1)
  if args.resolution % (8 * down):
    ap.error(f"--resolution must be a multiple of {8 * down} for the {args.preset} UNet")
  if args.iters < 1 or args.warmup < 0 or args.batch < 1 or args.rank < 1:
    ap.error("need --iters >= 1, --warmup >= 0, --batch >= 1, --rank >= 1")

  b, s, ctx_dim = args.batch, args.resolution // 8, kw["cross_attention_dim"]
  rng = np.random.default_rng(0)
  inputs = {
    "latents": rng.standard_normal((b, s, s, kw["in_channels"])).astype(np.float32),
    "noise": rng.standard_normal((b, s, s, kw["in_channels"])).astype(np.float32),
    "t": rng.integers(0, 1000, (b,)).astype(np.int32),
    "ctx": rng.standard_normal((b, CONTEXT_LENGTH, ctx_dim)).astype(np.float32),
  }
  o = optim_config()
  result = {
    "bench": "train_lora",
    "preset": args.preset,
    "batch": b,
    "resolution": args.resolution,
    "latent_size": s,
    "context": [CONTEXT_LENGTH, ctx_dim],
    "rank": args.rank,
    "alpha": float(args.rank),
    "lora_targets": [f"attn1|attn2.{m}" for m in TARGETS],
    "dtype": args.dtype,
    "param_dtype": "float32",
    "adapter_dtype": "float32",
    "remat": args.remat,
    "remat_policy": args.remat_policy if args.remat else None,
    "attention": args.attention,
    "optimizer": {
      "name": "adamw",
      "lr": o.lr,
      "weight_decay": o.weight_decay,
      "b1": o.b1,
      "b2": o.b2,
      "eps": o.eps,
      "grad_clip": o.grad_clip,
    },
    "iters": args.iters,
    "warmup": args.warmup,
  }

  with tempfile.TemporaryDirectory() as tmp:
    model_dir = Path(tmp)
    t0 = time.perf_counter()
    model, adapters, n_torch = build_torch(args, model_dir)
    result["build_and_save_s"] = time.perf_counter() - t0
    result["torch_adapter_params"] = n_torch
    if not args.no_torch:  # first, then freed: JAX reserves most of a GPU's memory when it starts
      try:
        result.update(torch_side(args, model, inputs))
      except Exception as e:  # noqa: BLE001  (record why the PyTorch side did not run, keep the JAX numbers)
        result["torch_error"] = f"{type(e).__name__}: {e}"
    del model
    gc.collect()
    try:
      import torch

      if torch.cuda.is_available():
        torch.cuda.empty_cache()
    except ImportError:
      pass
    jres = jax_side(args, model_dir, adapters, inputs)

  import jax

  assert jres["jax_adapter_params"] == n_torch, (
    f"adapter parameter counts differ: hps_jax {jres['jax_adapter_params']}, peft {n_torch}"
  )
  dev = jax.devices()[0]
  jstep, flops = jres["jax_step_s"], jres["step_flops"]
  peak = peak_flops(dev, args.dtype)
  result.update(
    {
      "device": device_name(),
      "backend": dev.platform,
      "jax_version": jax.__version__,
      "adapter_params": n_torch,
      "attention_impls": attention_impls(),
      **jres,
      "jax_images_per_s": b / jstep,
      "jax_flops_per_s": flops_per_s(flops, jstep),
      "peak_flops": peak,
      "mfu": mfu(flops, jstep, peak),
    }
  )
  if "torch_step_s" in result:
    tstep = result["torch_step_s"]
    result["torch_images_per_s"] = b / tstep
    result["speedup_jax_over_torch"] = tstep / jstep
    result["loss_first_rel_diff"] = rel_diff(jres["jax_loss_first"], result["torch_loss_first"])
    result["loss_last_rel_diff"] = rel_diff(jres["jax_loss_last"], result["torch_loss_last"])
    both_fp32 = args.dtype == "float32" and result["torch_dtype"] == "float32"
    result["loss_note"] = (
      "float32 on both sides, same weights and inputs: expect ~1e-6..1e-5 relative"
      if both_fp32
      else "bf16 compute: rounding differs between XLA and autocast, expect ~1e-3..1e-2 relative"
    )
  # key order: identification first, then the numbers
  head = ["bench", "preset", "device", "backend"]
  emit({**{k: result[k] for k in head}, **{k: v for k, v in result.items() if k not in head}}, args.out)


if __name__ == "__main__":
  main()
