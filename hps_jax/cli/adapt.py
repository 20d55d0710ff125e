"""The Stable Diffusion adaptation commands: `hps-jax label` (HPS labelling with the alpha/n rule),
`hps-jax train-lora` (LoRA on the labelled manifest) and `hps-jax eval-generator` (Table 4, base vs adapted)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

from hps_jax.adapt import label as lab
from hps_jax.adapt import train_lora
from hps_jax.adapt.evaluate import GENERATOR_METRICS, markdown_table
from hps_jax.cli.common import (
  COUNT,
  LIMIT,
  Skips,
  UsageError,
  add_checkpoint_args,
  add_parser,
  add_paths_arg,
  add_training_args,
  check_outdir,
  check_output,
  check_report_output,
  progress,
  read_prompts,
  real,
  report_skips,
  run_training,
  say_wrote,
  text,
  write_report,
)
from hps_jax.cli.metrics import add_inception_args, load_inception_arg
from hps_jax.cli.sample import add_sampling_args, load_sd, sample_config
from hps_jax.cli.score import scorer_from_args
from hps_jax.data.diffusiondb import read_records
from hps_jax.diffusion.render import render, save_image
from hps_jax.metrics import compute


# ------------------------------------------------------------------------------------------------------------
# label
# ------------------------------------------------------------------------------------------------------------
def add_label(sub):
  p = add_parser(
    sub,
    "label",
    help="HPS-label generated images (DiffusionDB) for the LoRA adaptation",
    description="Scores every (image, prompt) with an HPS model; per prompt keeps the best image when "
    "softmax(HPS)[best] > alpha/n and the worst symmetrically (caption prefixed 'Weird "
    "image. '); adds regularization images; writes a JSONL manifest of {image, caption, "
    "kind}. Images from zip archives are written under <manifest dir>/images/.",
  )
  add_checkpoint_args(p, aliases=("--scorer",))
  p.add_argument("--preprocess", default="pad", choices=["pad", "clip"], help="image preprocessing (pad: the paper)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
  p.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass")
  p.add_argument(
    "--images",
    required=True,
    help='DiffusionDB folder (part-*.zip + metadata*.parquet) or a JSONL of {"image", "prompt"} rows',
  )
  p.add_argument(
    "--regularization", required=True, help="folder with metadata.jsonl, or a JSONL, of {file_name, caption} rows"
  )
  p.add_argument("--out", required=True, metavar="MANIFEST.jsonl", help="the manifest to write")
  p.add_argument(
    "--preset",
    default="paper",
    choices=sorted(lab.PRESETS),
    help="paper: the rule only; release: also drop near-constant images and prompts with < 4 images",
  )
  p.add_argument("--alpha", type=real(), help="selection factor (default: the preset's, 2.0)")
  p.add_argument(
    "--blur-threshold",
    type=LIMIT,
    help="drop images whose max horizontal neighbour difference is below this (0 = off; release: 10)",
  )
  p.add_argument("--min-images", type=LIMIT, help="drop prompts left with fewer images (0 = off; release: 4)")
  p.add_argument("--scores", metavar="SCORES.jsonl", help="also write every scored image: {image, prompt, hps, kind}")
  add_paths_arg(p)
  p.set_defaults(run=run_label)


def _label_config(args) -> lab.LabelConfig:
  over = {
    k: v
    for k, v in (("alpha", args.alpha), ("blur_threshold", args.blur_threshold), ("min_images", args.min_images))
    if v is not None
  }
  try:
    return dataclasses.replace(lab.PRESETS[args.preset], **over).validate()
  except ValueError as e:
    raise UsageError(str(e)) from e


def run_label(args) -> int:
  config = _label_config(args)
  check_output(
    args.out, overwrite=True, inputs=[args.images, args.regularization, args.scores], flag="--out", formats=(".jsonl",)
  )
  check_output(
    args.scores,
    overwrite=True,
    inputs=[args.images, args.regularization, args.out],
    flag="--scores",
    formats=(".jsonl",),
  )
  skips = Skips()
  try:
    records = read_records(args.images, skips.add, allow_outside=args.allow_outside_paths)
    regularization = lab.read_regularization(args.regularization, skips.add, allow_outside=args.allow_outside_paths)
  except ValueError as e:
    raise UsageError(str(e)) from e
  if not records:
    raise UsageError(f"{args.images}: no (image, prompt) records to label")
  counts = Counter(r.prompt for r in records)
  candidates = [(i, r) for i, r in enumerate(records) if lab.selectable(counts[r.prompt], config)]
  scorer = scorer_from_args(args)
  scored, blurry = lab.score_records(records, candidates, scorer, config, skips, progress, args.batch_size)
  selections, stats = lab.select_by_prompt(scored, config)
  out = Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  selections, paths = lab.extract_selected(records, selections, out.parent, skips)
  rows = lab.manifest_rows(selections, paths.__getitem__, config.negative_prefix)
  rows += lab.check_regularization(regularization, skips, scorer.workers, progress)
  lab.write_manifest(rows, out)
  if args.scores:
    lab.write_scores(args.scores, scored, records, selections)
  kinds = Counter(row["kind"] for row in rows)
  summary = {
    "manifest": str(out),
    "counts": {k: kinds[k] for k in lab.KINDS},
    "config": {"preset": args.preset, **dataclasses.asdict(config)},
    "images": len(records),
    "scored": len(scored),
    "blurry": blurry,
    "skipped": len(skips.items),
    "prompts": len(counts),
    "prompts_selected": len(selections),
    "prompts_not_scored": sum(1 for n in counts.values() if not lab.selectable(n, config)),
    "prompts_too_few_after_drops": stats["prompts_below_min_images"] + stats["prompts_n_le_alpha"],
  }
  print(json.dumps(summary))
  say_wrote(out, f"{len(rows)} manifest rows")
  return report_skips(skips, len(scored))


# ------------------------------------------------------------------------------------------------------------
# train-lora
# ------------------------------------------------------------------------------------------------------------
def add_train_lora(sub):
  p = add_parser(
    sub,
    "train-lora",
    help="LoRA-adapt Stable Diffusion on an HPS-labelled manifest",
    description="Trains LoRA adapters on the UNet's attention projections with the DDPM loss; VAE, "
    "text encoder and base weights stay frozen. Every hyperparameter is in the config; "
    "override any with --config.KEY=VALUE. Re-running with the same --workdir resumes. "
    "The adapter is exported to WORKDIR/export/pytorch_lora_weights.safetensors.",
  )
  add_training_args(
    p,
    config_example="lora_sd14:tiny or lora_sd14:paper",
    dry_run_help="print the adapter parameter count and the config, then exit",
  )
  p.set_defaults(run=run_train_lora)


def run_train_lora(args) -> int:
  return run_training(
    args, train_lora.run, lambda config, workdir: json.dumps(train_lora.adapter_counts(config, workdir))
  )


# ------------------------------------------------------------------------------------------------------------
# eval-generator: the paper's Table 4 (FID, aesthetic, CLIP score, HPS) for the base and the adapted model
# ------------------------------------------------------------------------------------------------------------
def add_eval_generator(sub):
  p = add_parser(
    sub,
    "eval-generator",
    help="Table 4: FID, aesthetic, CLIP score, HPS of base vs LoRA-adapted SD",
    description="Renders every prompt with the base model and, with --lora, the adapted one (same "
    "seeds; the adapted side uses --negative-prompt, 'Weird image.' by default), then "
    "computes the metrics of each image set. Writes the JSON (--output) and a markdown "
    "table next to it (.md); the images stay in --outdir.",
  )
  add_sampling_args(p, batch_flag="--sample-batch-size")
  p.add_argument("--prompts", required=True, help="text file, one prompt per line")
  p.add_argument(
    "--reference",
    "--reference-stats",
    dest="reference",
    help="FID reference: statistics .npz (`hps-jax fid --save-stats`) or an image directory / JSONL",
  )
  p.add_argument(
    "--metrics",
    default=",".join(GENERATOR_METRICS),
    help=f"comma-separated subset of {','.join(GENERATOR_METRICS)}",
  )
  p.add_argument("--clip-checkpoint", help="CLIP for the CLIP score and the aesthetic head (ViT-L/14)")
  p.add_argument("--aesthetic-mlp", help="LAION aesthetic head (.pth / .safetensors)")
  p.add_argument(
    "--checkpoint", "--hps-checkpoint", dest="checkpoint", metavar="CKPT", help="HPS checkpoint (hpc.pt, HF dir, ...)"
  )
  p.add_argument("--negative-prompt", type=text, default="Weird image.", help="negative prompt of the adapted model")
  p.add_argument("--base-negative-prompt", type=text, default="", help="negative prompt of the base model")
  add_inception_args(p)
  p.add_argument("--outdir", help="where the rendered images go (default: OUTPUT's name without suffix + _images)")
  p.add_argument("--output", required=True, metavar="FILE.json", help="the JSON results (a .md table goes next to it)")
  p.set_defaults(run=run_eval_generator)


def run_eval_generator(args) -> int:
  wanted = [m.strip() for m in args.metrics.split(",") if m.strip()]
  bad = [m for m in wanted if m not in GENERATOR_METRICS]
  if bad or not wanted:
    raise UsageError(f"unknown metrics {bad}; choose from {','.join(GENERATOR_METRICS)}")
  needs = {
    "fid": ("--reference", args.reference),
    "clip": ("--clip-checkpoint", args.clip_checkpoint),
    "aesthetic": ("--aesthetic-mlp and --clip-checkpoint", args.aesthetic_mlp and args.clip_checkpoint),
    "hps": ("--checkpoint", args.checkpoint),
  }
  for m in wanted:
    if not needs[m][1]:
      raise UsageError(f"the {m} metric needs {needs[m][0]} (or leave it out of --metrics)")
  prompts = read_prompts(None, args.prompts)
  if not prompts:
    raise UsageError(f"{args.prompts}: no prompts")
  check_report_output(args.output, inputs=[args.prompts, args.reference])
  output = Path(args.output)
  outdir = check_outdir(args.outdir or str(output.with_name(output.stem + "_images")))
  sd, _ = load_sd(args)
  cfg = sample_config(args, sd)
  jobs = [(p, args.seed + j * args.num_images + k) for j, p in enumerate(prompts) for k in range(args.num_images)]
  variants = [("base", 0.0, args.base_negative_prompt)]
  if args.lora:
    variants.append(("adapted", args.lora_scale, args.negative_prompt))
  inception = load_inception_arg(args) if "fid" in wanted else None
  results, all_skips = {}, Skips()
  sets = {}
  with progress(len(jobs) * len(variants), "sampling") as bar:
    for name, scale, negative in variants:
      if args.lora:
        sd.set_lora_scale(scale)
      images = render(sd, jobs, cfg, negative, args.sample_batch_size, bar.update)
      d = outdir / name
      d.mkdir(parents=True, exist_ok=True)
      with open(d / "images.jsonl", "w", encoding="utf-8") as f:
        for i, ((prompt, seed), img) in enumerate(zip(jobs, images)):
          save_image(img, d / f"{i:05d}_{seed}.png")
          row = {"image": f"{i:05d}_{seed}.png", "prompt": prompt, "seed": seed, "negative_prompt": negative}
          f.write(json.dumps(row) + "\n")
      sets[name] = d / "images.jsonl"
  for name, jsonl in sets.items():
    skips = Skips()
    try:
      items = compute.list_images(jsonl, skips)
      results[name] = compute.generator_metrics(
        items,
        wanted,
        skips,
        reference=args.reference,
        inception=inception,
        resize=args.resize,
        batch_size=args.batch_size,
        clip_checkpoint=args.clip_checkpoint,
        aesthetic_mlp=args.aesthetic_mlp,
        hps_checkpoint=args.checkpoint,
        inception_sha256=getattr(args, "inception_sha256", None),
      )
    except ValueError as e:
      raise UsageError(str(e)) from e
    results[name]["num_generated"] = len(items)
    results[name]["skipped"] = len(skips.items)
    all_skips.extend(skips, prefix=f"{name}: ")
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
      "reference_stats": args.reference,
      "clip_checkpoint": args.clip_checkpoint if {"clip", "aesthetic"} & set(wanted) else None,
      "aesthetic_mlp": args.aesthetic_mlp if "aesthetic" in wanted else None,
      "hps_checkpoint": args.checkpoint if "hps" in wanted else None,
      "inception_weights": args.inception_weights if "fid" in wanted else None,
      "resize": args.resize if "fid" in wanted else None,
      "metrics": wanted,
      "images": str(outdir),
    },
  }
  table = markdown_table(results, summary["settings"])
  write_report(output, summary, table, f"the results (images in {outdir})")
  print(table, end="")
  return report_skips(all_skips, len(jobs) * len(variants))
