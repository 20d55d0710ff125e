"""Stable Diffusion UNet training step: forward + backward (gradient w.r.t. every UNet parameter) of an MSE loss
against a random target, hps_jax's `UNet2DConditionModel` vs diffusers' PyTorch `UNet2DConditionModel`, same
architecture, same machine, same run.

SD v1.4 UNet (--preset sd14, 860M parameters, random weights: speed does not depend on the values) on (B, 64, 64, 4)
latents (512² images), timesteps in [0, 1000) and a (B, 77, 768) text context. Parameters are float32; --dtype sets
the compute dtype (JAX: the model's `dtype`; PyTorch: `torch.autocast`), bf16 by default. The loss is taken in
float32. The timed region is one step on device-resident inputs, gradients materialized (JAX returns them from the
jitted step; PyTorch fills `.grad`); no optimizer update. JAX is compiled ahead of time (lower + compile timed
separately) and the FLOP count comes from XLA's `cost_analysis` of the compiled step (with --remat it includes the
recomputed forward). MFU = FLOPs / step time / the device's dense peak, reported only on a known GPU (null on CPU).
Prints one JSON line; --out also writes it.

  python -m bench.unet_step --batch 4 --out bench/results/unet_step_h100_bf16.json            # on a GPU
  python -m bench.unet_step --batch 1 --iters 2 --out bench/results/unet_step_cpu.json        # CPU
  python -m bench.unet_step --preset tiny --latent-size 8 --batch 1 --iters 1                 # smoke run

--attention picks the JAX attention backend (auto: cuDNN flash attention on a GPU in bf16; hps_jax.models.attention);
--remat-policy says what a rematerialized block keeps (default nothing_saveable: least memory).
"""

from __future__ import annotations

import argparse
import statistics
import time

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


def unet_kwargs(preset: str) -> dict:
  return dict(SD_PRESETS[preset]["unet"])  # the diffusers UNet arguments of the bench presets


def jax_side(args, inputs):
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from hps_jax.models.unet import UNet2DConditionModel, UNetConfig

  cfg = UNetConfig.from_diffusers(
    unet_kwargs(args.preset), remat=args.remat, remat_policy=args.remat_policy, attention_backend=args.attention
  )
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  t0 = time.perf_counter()
  model = UNet2DConditionModel(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  init_s = time.perf_counter() - t0
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  def loss_fn(params, rest, x, t, ctx, target):
    pred = nnx.merge(graphdef, params, rest)(x, t, ctx).astype(jnp.float32)
    return jnp.mean((pred - target) ** 2)

  step = jax.jit(jax.value_and_grad(loss_fn))
  x, t, ctx, target = (
    jax.device_put(jnp.asarray(v)) for v in (inputs["x"], inputs["t"], inputs["ctx"], inputs["target"])
  )
  compiled, lower_s, compile_s, flops = aot_compile(step, params, rest, x, t, ctx, target)
  out = {}

  def run():
    out["loss"], grads = compiled(params, rest, x, t, ctx, target)
    jax.block_until_ready(grads)

  for _ in range(args.warmup):
    run()
  times = timed(run, args.iters)
  return {
    "jax_params": n_params,
    "jax_init_s": init_s,
    "jax_lower_s": lower_s,
    "jax_compile_s": compile_s,
    "step_flops": flops,
    "jax_step_s": statistics.median(times),
    "jax_times_s": times,
    "jax_loss": float(out["loss"]),
  }


def torch_side(args, inputs):
  import diffusers
  import torch

  torch.manual_seed(0)
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  model = diffusers.UNet2DConditionModel(**unet_kwargs(args.preset)).to(dev).train()
  if args.remat:
    model.enable_gradient_checkpointing()
  x = torch.from_numpy(np.ascontiguousarray(inputs["x"].transpose(0, 3, 1, 2))).to(dev)
  target = torch.from_numpy(np.ascontiguousarray(inputs["target"].transpose(0, 3, 1, 2))).to(dev)
  t = torch.from_numpy(inputs["t"]).long().to(dev)
  ctx = torch.from_numpy(inputs["ctx"]).to(dev)
  autocast = torch.autocast(dev, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
  out = {}

  def run():
    model.zero_grad(set_to_none=True)
    with autocast:
      pred = model(x, t, encoder_hidden_states=ctx).sample
    loss = torch.nn.functional.mse_loss(pred.float(), target)
    loss.backward()
    if dev == "cuda":
      torch.cuda.synchronize()
    out["loss"] = float(loss)

  for _ in range(args.warmup):
    run()
  times = timed(run, args.iters)
  return {
    "torch_device": dev,
    "torch_version": torch.__version__,
    "diffusers_version": diffusers.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_params": sum(p.numel() for p in model.parameters()),
    "torch_autocast": f"{dev} bfloat16" if args.dtype == "bfloat16" else None,
    "torch_step_s": statistics.median(times),
    "torch_times_s": times,
    "torch_loss": out["loss"],
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="sd14", choices=["sd14", "tiny"])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--latent-size", type=int, default=64, help="latent side (64 = 512² images)")
  ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"], help="compute dtype")
  ap.add_argument("--remat", action="store_true", help="UNet remat (JAX) / gradient checkpointing (PyTorch)")
  ap.add_argument(
    "--remat-policy",
    default="nothing_saveable",
    choices=["nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable"],
    help="what a rematerialized UNet block keeps for the backward pass (jax.checkpoint_policies; JAX only)",
  )
  ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn"], help="JAX attention backend")
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=1)
  ap.add_argument("--no-torch", action="store_true", help="time only the JAX side")
  ap.add_argument("--out", help="also write the JSON result here")
  args = ap.parse_args(argv)

  import jax

  kw = unet_kwargs(args.preset)
  rng = np.random.default_rng(0)
  b, s = args.batch, args.latent_size
  ctx_dim = kw["cross_attention_dim"]
  inputs = {
    "x": rng.standard_normal((b, s, s, kw["in_channels"])).astype(np.float32),
    "target": rng.standard_normal((b, s, s, kw["out_channels"])).astype(np.float32),
    "t": rng.integers(0, 1000, (b,)).astype(np.int32),
    "ctx": rng.standard_normal((b, 77, ctx_dim)).astype(np.float32),
  }

  res = jax_side(args, inputs)
  dev = jax.devices()[0]
  jstep, flops = res["jax_step_s"], res["step_flops"]
  peak = peak_flops(dev, args.dtype)
  result = {
    "bench": "unet_step",
    "preset": args.preset,
    "device": device_name(),
    "backend": dev.platform,
    "batch": b,
    "latent_size": s,
    "image_size": 8 * s,
    "context": [77, ctx_dim],
    "dtype": args.dtype,
    "param_dtype": "float32",
    "remat": args.remat,
    "remat_policy": args.remat_policy if args.remat else None,
    "attention": args.attention,
    "attention_impls": attention_impls(),
    "iters": args.iters,
    "warmup": args.warmup,
    "jax_version": jax.__version__,
    **res,
    "jax_samples_per_s": b / jstep,
    "jax_flops_per_s": flops_per_s(flops, jstep),
    "peak_flops": peak,
    "mfu": mfu(flops, jstep, peak),
  }
  if not args.no_torch:
    try:
      tres = torch_side(args, inputs)
      result.update(tres)
      result["torch_samples_per_s"] = b / tres["torch_step_s"]
      result["speedup_jax_over_torch"] = tres["torch_step_s"] / jstep
    except Exception as e:  # noqa: BLE001  (record why the PyTorch side did not run, keep the JAX numbers)
      result["torch_error"] = f"{type(e).__name__}: {e}"
  emit(result, args.out)


if __name__ == "__main__":
  main()
