"""`hps-jax` subcommands of the Stable Diffusion adaptation (train-lora, eval-generator). Kept apart from the
implementations so that building the CLI parser imports nothing heavy."""

from __future__ import annotations

import json
import sys
from pathlib import Path


# ------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------
def add_train_lora(sub):
  p = sub.add_parser(
    "train-lora",
    help="LoRA-adapt Stable Diffusion on an HPS-labelled manifest",
    description="Trains LoRA adapters on the UNet's attention projections with the DDPM loss; VAE, "
    "text encoder and base weights stay frozen. Every hyperparameter is in the config; "
    "override any with --config.KEY=VALUE. Re-running with the same --workdir resumes. "
    "The adapter is exported to WORKDIR/export/pytorch_lora_weights.safetensors.",
  )
  p.add_argument("--config", required=True, help="configs/lora_sd14.py:tiny or :paper")
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/, export/ go here")
  p.add_argument("--dry-run", action="store_true", help="print the adapter parameter count and the config, then exit")
  p.set_defaults(run=run_train_lora, accepts_config_overrides=True)


def run_train_lora(args) -> int:
  from flax import nnx

  from hps_jax import lora
  from hps_jax.adapt.train_lora import base_model_dir, lora_config, run
  from hps_jax.cli import UsageError, load_config

  config = load_config(args.config, args.overrides)
  workdir = Path(args.workdir)
  if args.dry_run:
    from hps_jax.diffusion.tiny import TINY_UNET
    from hps_jax.models.unet import UNet2DConditionModel, UNetConfig

    if config.model.init == "tiny":
      ucfg = TINY_UNET
    else:
      ucfg = UNetConfig.from_diffusers(
        json.loads((base_model_dir(config, workdir) / "unet" / "config.json").read_text())
      )
    unet = nnx.eval_shape(lambda: UNet2DConditionModel(ucfg, rngs=nnx.Rngs(0)))
    paths = lora.apply_lora(unet, lora_config(config))
    print(json.dumps({"lora_layers": len(paths), "lora_params": lora.count_lora_params(unet)}))
    print(config)
    return 0
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    result = run(config, workdir)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from e
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
  print(
    json.dumps(
      {
        "status": result.status,
        "step": result.step,
        "trainable_params": result.trainable_params,
        "frozen_params": result.frozen_params,
        "eval": result.eval,
        "export": result.export_path,
      }
    )
  )
  return 0 if result.status == "done" else 3


# ------------------------------------------------------------------------------------------------------------
# eval-generator: the paper's Table 4 (FID, aesthetic, CLIP score, HPS) for the base and the adapted model
# ------------------------------------------------------------------------------------------------------------
TABLE_COLUMNS = (
  ("fid", "FID ↓"),
  ("aesthetic_mean", "Aesthetic ↑"),
  ("clip_score", "CLIP score ↑"),
  ("hps_mean", "HPS ↑"),
)
GENERATOR_METRICS = ("fid", "aesthetic", "clip", "hps")


def add_eval_generator(sub):
  from hps_jax.cli import _add_inception_args

  p = sub.add_parser(
    "eval-generator",
    help="Table 4: FID, aesthetic, CLIP score, HPS of base vs LoRA-adapted SD",
    description="Renders every prompt with the base model and, with --lora, the adapted one (same "
    "seeds; the adapted side uses --negative-prompt, 'Weird image.' by default), then "
    "computes the metrics of each image set. Writes the JSON (--output) and a markdown "
    "table next to it (.md); the images stay in --outdir.",
  )
  p.add_argument("--model", required=True, help="diffusers-layout SD dir")
  p.add_argument("--lora", help="adapter to compare with the base (any format `sample --lora` reads)")
  p.add_argument("--lora-scale", type=float, default=1.0)
  p.add_argument("--prompts", required=True, help="text file, one prompt per line")
  p.add_argument("--reference-stats", help="FID reference statistics .npz (`hps-jax fid --save-stats`) or images")
  p.add_argument(
    "--metrics", default=",".join(GENERATOR_METRICS), help=f"comma-separated subset of {','.join(GENERATOR_METRICS)}"
  )
  p.add_argument("--clip-checkpoint", help="CLIP for the CLIP score and the aesthetic head (ViT-L/14)")
  p.add_argument("--aesthetic-mlp", help="LAION aesthetic head (.pth / .safetensors)")
  p.add_argument("--hps-checkpoint", help="HPS checkpoint (hpc.pt, HF dir, ...)")
  p.add_argument("--negative-prompt", default="Weird image.", help="negative prompt of the adapted model")
  p.add_argument("--base-negative-prompt", default="", help="negative prompt of the base model")
  p.add_argument("--num-images", type=int, default=1, help="images per prompt")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--guidance", type=float, default=7.5)
  p.add_argument("--scheduler", default="pndm", choices=["pndm", "ddim"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--height", type=int, default=512)
  p.add_argument("--width", type=int, default=512)
  p.add_argument("--sample-batch-size", type=int, default=4)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  _add_inception_args(p)
  p.add_argument("--outdir", help="where the rendered images go (default: OUTPUT's name without suffix + _images)")
  p.add_argument("--output", required=True, metavar="FILE.json")
  p.set_defaults(run=run_eval_generator)


def markdown_table(results: dict) -> str:
  """| model | FID | Aesthetic | CLIP score | HPS | rows for each evaluated model (absent metrics as '–')."""
  cols = [(k, name) for k, name in TABLE_COLUMNS if any(k in r for r in results.values())]
  lines = ["| model | " + " | ".join(n for _, n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for model, r in results.items():
    cells = [f"{r[k]:.4g}" if k in r else "–" for k, _ in cols]
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def run_eval_generator(args) -> int:
  from PIL import Image

  from hps_jax.cli import UsageError, _inception, _read_prompts, _report_skipped, progress, render
  from hps_jax.diffusion.sampler import SampleConfig, StableDiffusion
  from hps_jax.metrics import compute
  from hps_jax.preference.scorer import as_dtype

  wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
  bad = [m for m in wanted if m not in GENERATOR_METRICS]
  if bad or not wanted:
    raise UsageError(f"unknown metrics {bad}; choose from {','.join(GENERATOR_METRICS)}")
  needs = {
    "fid": ("--reference-stats", args.reference_stats),
    "clip": ("--clip-checkpoint", args.clip_checkpoint),
    "aesthetic": ("--aesthetic-mlp and --clip-checkpoint", args.aesthetic_mlp and args.clip_checkpoint),
    "hps": ("--hps-checkpoint", args.hps_checkpoint),
  }
  for m in wanted:
    if not needs[m][1]:
      raise UsageError(f"the {m} metric needs {needs[m][0]} (or leave it out of --metrics)")
  prompts = _read_prompts(args)
  if not prompts or min(args.num_images, args.sample_batch_size, args.steps) < 1:
    raise UsageError("need at least one prompt, and --num-images, --sample-batch-size, --steps >= 1")
  output = Path(args.output)
  outdir = Path(args.outdir) if args.outdir else output.with_name(output.stem + "_images")
  try:
    sd = StableDiffusion.from_pretrained(args.model, dtype=as_dtype(args.dtype))
    if args.lora:
      sd.load_lora(args.lora, args.lora_scale)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from e
  cfg = SampleConfig(
    steps=args.steps, guidance=args.guidance, scheduler=args.scheduler, height=args.height, width=args.width
  )
  jobs = [(p, args.seed + j * args.num_images + k) for j, p in enumerate(prompts) for k in range(args.num_images)]
  variants = [("base", 0.0, args.base_negative_prompt)]
  if args.lora:
    variants.append(("adapted", args.lora_scale, args.negative_prompt))
  inception = _inception(args) if "fid" in wanted else None
  results, all_skipped = {}, compute.Skipped()
  with progress(len(jobs) * len(variants), "sampling") as bar:
    sets = {}
    for name, scale, negative in variants:
      if args.lora:
        sd.set_lora_scale(scale)
      images = render(sd, jobs, cfg, negative, args.sample_batch_size, bar)
      d = outdir / name
      d.mkdir(parents=True, exist_ok=True)
      with open(d / "images.jsonl", "w", encoding="utf-8") as f:
        for i, ((prompt, seed), img) in enumerate(zip(jobs, images)):
          Image.fromarray(img).save(d / f"{i:05d}_{seed}.png")
          f.write(
            json.dumps({"image": f"{i:05d}_{seed}.png", "prompt": prompt, "seed": seed, "negative_prompt": negative})
            + "\n"
          )
      sets[name] = d / "images.jsonl"
  for name, jsonl in sets.items():
    skipped = compute.Skipped()
    try:
      items = compute.list_images(jsonl, skipped)
      results[name] = compute.generator_metrics(
        items,
        wanted,
        skipped,
        reference=args.reference_stats,
        inception=inception,
        resize=args.resize,
        batch_size=args.batch_size,
        clip_checkpoint=args.clip_checkpoint,
        aesthetic_mlp=args.aesthetic_mlp,
        hps_checkpoint=args.hps_checkpoint,
      )
    except ValueError as e:
      raise UsageError(str(e)) from e
    results[name]["num_generated"] = len(items)
    for what, why in skipped.items:
      all_skipped.add(f"{name}: {what}", why)
  summary = {
    "results": results,
    "settings": {
      "model": str(args.model),
      "lora": args.lora,
      "lora_scale": args.lora_scale,
      "prompts": str(args.prompts),
      "num_prompts": len(prompts),
      "num_images": args.num_images,
      "steps": args.steps,
      "guidance": args.guidance,
      "scheduler": args.scheduler,
      "seed": args.seed,
      "height": args.height,
      "width": args.width,
      "negative_prompt": args.negative_prompt,
      "base_negative_prompt": args.base_negative_prompt,
      "reference_stats": args.reference_stats,
      "images": str(outdir),
    },
  }
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(summary, indent=2) + "\n")
  table = markdown_table(results)
  output.with_suffix(".md").write_text(table)
  print(table, end="")
  print(f"wrote {output} and {output.with_suffix('.md')}; images in {outdir}", file=sys.stderr)
  return _report_skipped(all_skipped, len(jobs) * len(variants))
