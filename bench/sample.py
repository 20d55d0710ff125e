"""Stable Diffusion text-to-image sampling throughput: hps_jax's `StableDiffusion` vs diffusers' PyTorch
`StableDiffusionPipeline`, same random weights, same initial latents, same prompts, same machine, same run.

The model is the real SD v1.4 architecture (--preset sd14: UNet 320/640/1280/1280, VAE 128/256/512/512, CLIP
ViT-L/14 text tower) with random weights (diffusers / transformers default init; sampling speed does not depend on
the values, and nothing can be downloaded here). diffusers builds the pipeline and writes it with
`save_pretrained`; hps_jax loads that folder with `StableDiffusion.from_pretrained`. Both sides run classifier-free
guidance with the negative prompt "Weird image." from the same (B, 4, H/8, W/8) latents. The timed region is a whole
`sample` / `pipe(...)` call: tokenization, text encoder, the denoising loop and the VAE decode to [0, 1] images.
The JAX compile time (trace + lower + XLA compile of the first call) is reported separately. As a sanity number the
max abs difference of the two final [0, 1] images is reported. Prints one JSON line; --out also writes it.

--components adds a "components" entry: the median seconds of each piece of a call timed alone, on both sides, on
the same weights and inputs (text encoder on [prompts; negatives], one UNet call on the 2B-row CFG batch, the VAE
decode to images; the full call is about text + steps' UNet calls + decode, the scheduler steps are negligible), and
the JAX UNet call and whole `sample` call again with XLA's convolution everywhere (`CONV_AS_DOT_MAX_PIXELS = 0` in
`hps_jax.models.sd_blocks`, the code path before the small-map convs became dots), so that one run measures both.

Defaults are the acceptance setting (50 PNDM steps, CFG 7.5, 512x512, batch 1):

  python -m bench.sample --out bench/results/sample_h100_fp32.json                   # on a GPU
  python -m bench.sample --dtype bfloat16 --batch 4 --out bench/results/sample_h100_bf16.json
  python -m bench.sample --resolution 256 --steps 4 --iters 1 --out bench/results/sample_cpu.json   # CPU, reduced
  python -m bench.sample --resolution 256 --steps 4 --iters 2 --components --out bench/results/sample_cpu_profile.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from bench.common import SD_PRESETS, device_name, emit, timed

NEGATIVE = "Weird image."
PROMPTS = [
  "an astronaut riding a horse on the moon, highly detailed",
  "a watercolor painting of a lighthouse at dusk",
  "a red fox sitting in the snow, photograph",
  "a bowl of ramen, studio lighting, 4k",
]

# jax.monitoring events whose durations make up the compile time of a jitted call
COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


def hf_tokenizer():
  """transformers' CLIPTokenizer built from hps_jax's bundled BPE vocabulary (offline), so that
  `save_pretrained` writes a tokenizer/ folder both sides read."""
  import transformers

  from hps_jax.data.tokenizer import CLIPTokenizer

  ours = CLIPTokenizer.default()
  vocab = {
    {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}.get(k, k): v for k, v in ours.vocab.items()
  }
  merges = [m for m, _ in sorted(ours.ranks.items(), key=lambda kv: kv[1])]
  return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def build_pipeline(preset: dict, scheduler: str, seed: int = 0):
  """A random-weight diffusers StableDiffusionPipeline of the given architecture (fp32, eval mode)."""
  import diffusers
  import torch
  import transformers

  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**preset["unet"]).eval()
  vae = diffusers.AutoencoderKL(**preset["vae"]).eval()
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**preset["text"])).eval()
  # CompVis/stable-diffusion-v1-4 scheduler/scheduler_config.json
  sched = diffusers.PNDMScheduler(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
  )
  if scheduler == "ddim":  # SD 1.x configs say clip_sample=false; DDIM defaults to true when the key is absent
    sched = diffusers.DDIMScheduler.from_config(sched.config, clip_sample=False)
  return diffusers.StableDiffusionPipeline(
    vae=vae,
    text_encoder=text,
    tokenizer=hf_tokenizer(),
    unet=unet,
    scheduler=sched,
    safety_checker=None,
    feature_extractor=None,
    requires_safety_checker=False,
  )


def _median_s(fn, iters: int) -> float:
  fn()  # warm-up (compiles on the JAX side)
  return statistics.median(timed(fn, iters))


def jax_components(sd, prompts, latents, run_jax, iters: int) -> dict:
  """Median seconds of the pieces of hps_jax's `sample` call, each jitted alone on the model's own (sharded)
  state; then the UNet call and the whole call with XLA's convolution everywhere (CONV_AS_DOT_MAX_PIXELS = 0)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from hps_jax.models import sd_blocks

  graph, state = sd._graph, sd._state
  b = len(prompts)
  ids = jnp.asarray(np.concatenate([sd.tokenize([NEGATIVE] * b), sd.tokenize(prompts)]))
  x2 = jnp.asarray(np.concatenate([latents, latents]))
  z = jnp.asarray(latents)

  @jax.jit
  def text(state, ids):
    return nnx.merge(graph, state)[2](ids)

  @jax.jit
  def unet(state, x, context):
    return nnx.merge(graph, state)[0](x, jnp.full((x.shape[0],), 501), context)

  @jax.jit
  def decode(state, z):
    return nnx.merge(graph, state)[1].decode_latents(z)

  context = text(state, ids)
  out = {
    "jax_text_encoder_s": _median_s(lambda: jax.block_until_ready(text(state, ids)), iters),
    "jax_unet_call_s": _median_s(lambda: jax.block_until_ready(unet(state, x2, context)), iters),
    "jax_vae_decode_s": _median_s(lambda: jax.block_until_ready(decode(state, z)), iters),
  }
  saved = sd_blocks.CONV_AS_DOT_MAX_PIXELS
  sd_blocks.CONV_AS_DOT_MAX_PIXELS = 0
  try:
    jax.clear_caches()  # retrace every jitted function with the old path
    out["jax_unet_call_xla_conv_s"] = _median_s(lambda: jax.block_until_ready(unet(state, x2, context)), iters)
    out["jax_s_per_call_xla_conv"] = _median_s(run_jax, iters)
  finally:
    sd_blocks.CONV_AS_DOT_MAX_PIXELS = saved
    jax.clear_caches()
  return out


def torch_components(pipe, prompts, latents, iters: int) -> dict:
  """Median seconds of the same pieces in the diffusers pipeline (inference mode)."""
  import torch

  b = len(prompts)
  tok = lambda texts: pipe.tokenizer(
    texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
  ).input_ids.to(latents.device)
  ids = torch.cat([tok([NEGATIVE] * b), tok(prompts)])
  with torch.inference_mode():
    context = pipe.text_encoder(ids)[0]
    x2 = torch.cat([latents, latents])
    t = torch.tensor(501, device=latents.device)
    sync = torch.cuda.synchronize if latents.is_cuda else (lambda: None)

    def run(fn):
      fn()
      sync()

    return {
      "torch_text_encoder_s": _median_s(lambda: run(lambda: pipe.text_encoder(ids)), iters),
      "torch_unet_call_s": _median_s(lambda: run(lambda: pipe.unet(x2, t, encoder_hidden_states=context)), iters),
      "torch_vae_decode_s": _median_s(
        lambda: run(lambda: pipe.vae.decode(latents / pipe.vae.config.scaling_factor)), iters
      ),
    }


def count(module) -> int:
  return sum(p.numel() for p in module.parameters())


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--preset", default="sd14", choices=sorted(SD_PRESETS))
  ap.add_argument("--steps", type=int, default=50)
  ap.add_argument("--resolution", type=int, default=512, help="image side in pixels")
  ap.add_argument("--batch", type=int, default=1, help="images per call (each with CFG: 2x UNet batch)")
  ap.add_argument("--guidance", type=float, default=7.5)
  ap.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim"])
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--iters", type=int, default=3, help="timed calls per framework (median reported)")
  ap.add_argument(
    "--warmup",
    type=int,
    default=1,
    help="untimed calls before timing (JAX: the first, compiling call always runs, counted here)",
  )
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--no-torch", action="store_true", help="time only the JAX side")
  ap.add_argument(
    "--components",
    action="store_true",
    help="also time text encoder, one UNet call and the VAE decode alone on both sides, and the JAX side with "
    "XLA's convolution everywhere (the path before small-map convs became dots)",
  )
  ap.add_argument("--out", help="also write the JSON result here")
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import torch

  from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion

  preset = SD_PRESETS[args.preset]
  pipe = build_pipeline(preset, args.scheduler, args.seed)
  n_params = {"unet": count(pipe.unet), "vae": count(pipe.vae), "text_encoder": count(pipe.text_encoder)}
  tmp = tempfile.TemporaryDirectory(prefix="bench_sd_")
  t = time.perf_counter()
  pipe.save_pretrained(tmp.name)
  jdtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  sd = StableDiffusion.from_pretrained(tmp.name, dtype=jdtype)
  load_s = time.perf_counter() - t

  b, res = args.batch, args.resolution
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
  seeds = list(range(args.seed, args.seed + b))
  cfg = SampleConfig(steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=res, width=res)
  latents = np.asarray(sd.initial_latents(seeds, res, res))  # (B, h, w, 4), shared with torch (NCHW)

  def run_jax():
    return sd.sample(prompts, seeds, cfg, negative_prompt=NEGATIVE, latents=latents, output="float")  # host numpy

  compile_s = []
  listener = lambda event, duration, **kw: compile_s.append(duration) if event in COMPILE_EVENTS else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  t = time.perf_counter()
  jax_images = run_jax()
  first_call_s = time.perf_counter() - t
  jax.monitoring.unregister_event_duration_listener(listener)
  for _ in range(max(args.warmup - 1, 0)):
    run_jax()
  jax_times = timed(run_jax, args.iters)
  jstep = statistics.median(jax_times)
  components = jax_components(sd, prompts, latents, run_jax, args.iters) if args.components else None

  result = {
    "bench": "sample",
    "preset": args.preset,
    "device": device_name(),
    "backend": jax.default_backend(),
    "resolution": res,
    "latent_size": res // sd.vae_factor,
    "steps": args.steps,
    "scheduler": args.scheduler,
    "guidance": args.guidance,
    "negative_prompt": NEGATIVE,
    "batch": b,
    "dtype": args.dtype,
    "iters": args.iters,
    "warmup": args.warmup,
    "params": n_params,
    "jax_version": jax.__version__,
    "save_and_load_s": load_s,
    "jax_first_call_s": first_call_s,
    "jax_compile_s": sum(compile_s),
    "jax_s_per_call": jstep,
    "jax_times_s": jax_times,
    "jax_images_per_s": b / jstep,
  }

  if not args.no_torch:
    import diffusers

    tdev = "cuda" if torch.cuda.is_available() else "cpu"
    tdtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    pipe = pipe.to(tdev, dtype=tdtype)
    pipe.set_progress_bar_config(disable=True)
    lat = torch.from_numpy(np.ascontiguousarray(latents.transpose(0, 3, 1, 2))).to(tdev, tdtype)

    last = {}

    def run_torch():
      with torch.inference_mode():
        out = pipe(
          prompts,
          negative_prompt=[NEGATIVE] * b,
          latents=lat,
          num_inference_steps=args.steps,
          guidance_scale=args.guidance,
          height=res,
          width=res,
          output_type="np",
        )
      last["images"] = np.asarray(out.images, np.float32)  # (B, H, W, 3) in [0, 1] on the host: includes the sync

    for _ in range(args.warmup):
      run_torch()
    torch_times = timed(run_torch, args.iters)
    torch_images = last["images"]
    tstep = statistics.median(torch_times)
    if components is not None:
      components.update(torch_components(pipe, prompts, lat, args.iters))
    diff = np.abs(jax_images.astype(np.float32) - torch_images)
    inside = lambda x: float(np.mean((x > 0) & (x < 1)))
    result.update(
      {
        "torch_device": tdev,
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_s_per_call": tstep,
        "torch_times_s": torch_times,
        "torch_images_per_s": b / tstep,
        "speedup_jax_over_torch": tstep / jstep,
        "max_abs_diff_images": float(diff.max()),
        "mean_abs_diff_images": float(diff.mean()),
        # share of pixels not clipped to 0 or 1: a diff over saturated images would say little
        "unclipped_fraction_jax": inside(jax_images),
        "unclipped_fraction_torch": inside(torch_images),
      }
    )
  if components is not None:
    result["components"] = components
  tmp.cleanup()
  emit(result, args.out)


if __name__ == "__main__":
  main()
