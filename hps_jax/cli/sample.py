"""`hps-jax sample`: Stable Diffusion v1.x text-to-image with CFG and a negative prompt, optionally LoRA-adapted,
an A/B grid of base vs adapted, and best-of-N by HPS; the SD options shared with `eval-generator`."""

from __future__ import annotations

import json
from pathlib import Path

from hps_jax import weights
from hps_jax.cli.common import (
  COUNT,
  IMAGE_SIDE,
  SEED,
  UsageError,
  add_parser,
  check_outdir,
  progress,
  read_prompts,
  real,
  say_wrote,
  text,
)
from hps_jax.diffusion.render import best_of_jobs, contact_sheet, labelled_grid, pick_best, render, save_image
from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion
from hps_jax.models.dtypes import as_dtype
from hps_jax.preference.scorer import Scorer


def add_sampling_args(p, *, batch_flag: str = "--batch-size") -> None:
  """The Stable Diffusion sampling settings `sample` and `eval-generator` share."""
  p.add_argument(
    "--model", required=True, help="diffusers-layout SD dir (unet/ vae/ text_encoder/ tokenizer/), or sd-v1-4 (by name)"
  )
  p.add_argument("--steps", type=COUNT, default=50, help="denoising steps")
  p.add_argument("--guidance", type=real(), default=7.5, help="classifier-free guidance scale")
  p.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim"], help="sampler")
  p.add_argument("--seed", type=SEED, default=0, help="image k of prompt j gets seed + j * num_images + k")
  p.add_argument("--num-images", type=COUNT, default=1, help="images per prompt")
  p.add_argument(
    "--height", type=IMAGE_SIDE, help="image height in pixels (default: the model's native size, 512 for SD 1.x)"
  )
  p.add_argument("--width", type=IMAGE_SIDE, help="image width in pixels (default: the model's native size)")
  p.add_argument(batch_flag, type=COUNT, default=4, help="images per sampling batch (one compiled shape)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="compute dtype")
  p.add_argument("--lora", help="LoRA file or dir: PEFT/diffusers safetensors, kohya/A1111, or the HPS v1 release .bin")
  p.add_argument("--lora-scale", type=real(), default=1.0, help="adapter strength (0 = base model)")


def load_sd(args):
  """The StableDiffusion of --model (with --lora at --lora-scale when given) -> (sd, LoRA info or None)."""
  try:
    model = weights.resolve(args.model) if args.model in weights.REGISTRY else args.model  # e.g. sd-v1-4
    sd = StableDiffusion.from_pretrained(model, dtype=as_dtype(args.dtype))
    info = sd.load_lora(args.lora, args.lora_scale) if args.lora else None
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from e
  return sd, info


def sample_config(args, sd: StableDiffusion) -> SampleConfig:
  """The sampling settings; --height / --width default to the model's native size and must be positive multiples
  of the VAE factor (checked here, before any compilation)."""
  args.height = args.height or sd.native_size
  args.width = args.width or sd.native_size
  f = sd.vae_factor
  if min(args.height, args.width) < f or args.height % f or args.width % f:
    raise UsageError(
      f"--height and --width must be positive multiples of {f} (the VAE factor), got {args.height}x{args.width}"
    )
  return SampleConfig(
    steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=args.height, width=args.width
  )


def add_sample(sub):
  p = add_parser(
    sub,
    "sample",
    help="Stable Diffusion v1.x text-to-image (CFG with a negative prompt)",
    description="Samples a diffusers-layout Stable Diffusion dir (unet/ vae/ text_encoder/ tokenizer/ "
    "scheduler/), optionally LoRA-adapted. Writes PNGs and samples.jsonl (file, prompt, "
    "seed, settings). --ab renders base and adapted from the same seeds side by side; "
    "--best-of N keeps the highest-HPS of N candidates per image.",
  )
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompt", type=text, help="one prompt")
  g.add_argument("--prompts", help="text file, one prompt per line")
  p.add_argument("--negative-prompt", type=text, default="", help='e.g. "Weird image." for the HPS-adapted model')
  add_sampling_args(p)
  p.add_argument(
    "--ab",
    action="store_true",
    help="with --lora: render base and adapted with the same seeds into "
    "OUTDIR/base and OUTDIR/adapted, and ab_grid.png (base | adapted, labelled, the prompt under each row)",
  )
  p.add_argument("--base-negative-prompt", type=text, default="", help="negative prompt of the base side in --ab")
  p.add_argument(
    "--best-of",
    type=COUNT,
    default=1,
    metavar="N",
    help="render N candidates per image and keep the one with the highest HPS (needs --checkpoint)",
  )
  p.add_argument("--checkpoint", "--scorer", dest="checkpoint", metavar="CKPT", help="HPS checkpoint for --best-of")
  p.add_argument("--grid", action="store_true", help="also write grid.png, a contact sheet")
  p.add_argument("--outdir", required=True, help="where the PNGs and samples.jsonl go")
  p.set_defaults(run=run_sample)


def run_sample(args) -> int:
  check_outdir(args.outdir)
  prompts = read_prompts(args.prompt, args.prompts)
  if not prompts or min(args.num_images, args.batch_size, args.steps, args.best_of) < 1:
    raise UsageError("need at least one prompt, and --num-images, --batch-size, --steps, --best-of >= 1")
  if args.ab and not args.lora:
    raise UsageError("--ab compares the base model with its LoRA: give --lora")
  if args.best_of > 1 and not args.checkpoint:
    raise UsageError("--best-of ranks candidates by HPS: give --checkpoint CKPT")
  slots = [(p, args.seed + j * args.num_images + k, j) for j, p in enumerate(prompts) for k in range(args.num_images)]
  sd, lora_info = load_sd(args)
  scorer = Scorer.from_checkpoint(args.checkpoint) if args.best_of > 1 else None
  cfg = sample_config(args, sd)
  out = Path(args.outdir)
  settings = {
    "model": str(args.model),
    "steps": args.steps,
    "guidance": args.guidance,
    "scheduler": args.scheduler,
    "height": args.height,
    "width": args.width,
  }
  if args.lora:
    settings.update(lora=str(args.lora), lora_format=lora_info.get("format"))
  variants = (
    [
      ("adapted", args.lora_scale, args.negative_prompt, out / "adapted"),
      ("base", 0.0, args.base_negative_prompt, out / "base"),
    ]
    if args.ab
    else [(None, args.lora_scale, args.negative_prompt, out)]
  )
  n = args.best_of
  rendered = {}
  with progress(len(slots) * n * len(variants), "sampling") as bar:
    for name, scale, negative, vdir in variants:
      if args.lora:
        sd.set_lora_scale(scale)
      vdir.mkdir(parents=True, exist_ok=True)
      jobs = best_of_jobs([(p, seed) for p, seed, _ in slots], n)
      images = render(sd, jobs, cfg, negative, args.batch_size, bar.update)
      hps = scorer.score(list(images), [p for p, _ in jobs]) if scorer is not None else None
      kept = []
      with open(vdir / "samples.jsonl", "w", encoding="utf-8") as log:
        for i, ((prompt, seed, j), best) in enumerate(zip(slots, pick_best(hps, len(slots), n))):
          file = f"{j:04d}_{seed}.png"
          save_image(images[best], vdir / file)
          row = {
            "file": file,
            "prompt": prompt,
            "seed": jobs[best][1],
            "negative_prompt": negative,
            "lora_scale": scale if args.lora else None,
            **settings,
          }
          if hps is not None:
            row["hps"] = float(hps[best])
            row["candidates"] = [{"seed": jobs[c][1], "hps": float(hps[c])} for c in range(i * n, (i + 1) * n)]
          log.write(json.dumps(row) + "\n")
          kept.append(images[best])
      rendered[name] = kept
      if args.grid:
        cols = args.num_images if len(prompts) > 1 else min(len(kept), 8)
        save_image(contact_sheet(kept, cols), vdir / "grid.png")
  if args.ab:
    captions = [f"{prompt}  (seed {seed})" for prompt, seed, _ in slots]
    grid, _ = labelled_grid([rendered["base"], rendered["adapted"]], ["base", "adapted"], captions)
    save_image(grid, out / "ab_grid.png")
    say_wrote(out / "ab_grid.png", "the A/B grid (left: base, right: adapted; one row per image, its prompt below)")
  say_wrote(out, f"{len(slots) * len(variants)} images and samples.jsonl")
  return 0
