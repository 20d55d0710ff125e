"""`hps-jax score` (HPS of images against prompts) and `hps-jax aesthetic` (the LAION aesthetic rating)."""

from __future__ import annotations

from hps_jax.cli.common import (
  COUNT,
  Skips,
  UsageError,
  add_checkpoint_args,
  add_parser,
  add_paths_arg,
  check_output,
  expand_images,
  read_pairs,
  text,
  write_rows,
)
from hps_jax.preference.scorer import AestheticScorer, Scorer


def add_output_args(p) -> None:
  p.add_argument(
    "--output",
    help="results file by extension: .jsonl, .csv or .parquet (default: JSONL on stdout); one row per image",
  )
  p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")


def add_preprocess_arg(p, default: str) -> None:
  p.add_argument(
    "--preprocess",
    default=default,
    choices=["pad", "clip"],
    help="pad: longest edge to the input size + zero pad (the paper); clip: resize short side + center crop",
  )


def add_score(sub):
  p = add_parser(
    sub,
    "score",
    help="HPS of images against prompts (JSONL out)",
    description="Scores images with a preference model: hps = 100 * cos(image, prompt). Scores only "
    "compare images of the same prompt; `rank` is each image's place among the images of its prompt (1 = best).",
  )
  add_checkpoint_args(p)
  add_preprocess_arg(p, "pad")
  p.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="compute dtype")
  add_output_args(p)
  add_paths_arg(p)
  g = p.add_mutually_exclusive_group(required=True)
  g.add_argument("--prompt", type=text, help="one prompt for all IMAGES")
  g.add_argument("--pairs", help='JSONL with {"image": PATH, "prompt": TEXT} per line')
  p.add_argument("images", nargs="*", help="image files or folders (searched recursively), with --prompt")
  p.set_defaults(run=run_score)


def run_score(args) -> int:
  if args.prompt is not None and not args.images:
    raise UsageError("--prompt needs at least one IMAGE")
  if args.pairs is not None and args.images:
    raise UsageError("give images either on the command line (with --prompt) or in --pairs, not both")
  check_output(args.output, overwrite=args.overwrite, inputs=[args.pairs, *args.images])
  skips = Skips()
  if args.pairs is not None:
    items = list(read_pairs(args.pairs, skips, allow_outside=args.allow_outside_paths))
  else:
    items = [(img, args.prompt) for img in expand_images(args.images)]
  rows = scorer_from_args(args).iter_scores(items)
  return write_rows(rows, len(items), args.output, "scoring", skips, rank_by="hps")


def scorer_from_args(args) -> Scorer:
  """The Scorer of --checkpoint (a path, or a published model's name: hps-v2.1, hps-v1, clip-vit-l-14, ...) with
  --format / --preprocess / --dtype / --tokenizer / --activation / --batch-size."""
  kw = dict(preprocess=args.preprocess, dtype=args.dtype, activation=args.activation, batch_size=args.batch_size)
  if args.format != "auto":
    kw["format"] = args.format
  if args.tokenizer:
    kw["tokenizer"] = args.tokenizer
  try:
    return Scorer.from_pretrained(args.checkpoint, **kw)
  except ValueError as e:  # WeightsError, CheckpointError, a config / tokenizer mismatch: one line, exit 2
    raise UsageError(str(e)) from e


def add_aesthetic(sub):
  p = add_parser(
    sub,
    "aesthetic",
    help="LAION aesthetic score of images (JSONL out)",
    description="Rates images with the LAION aesthetic predictor: an MLP head on the CLIP ViT-L/14 image "
    "embedding (the prompt plays no part).",
  )
  p.add_argument(
    "--aesthetic-mlp",
    "--mlp",
    dest="mlp",
    required=True,
    help="sac+logos+ava1-l14-linearMSE.pth or ava+logos-l14-reluMSE.pth",
  )
  p.add_argument("--clip-checkpoint", required=True, help="CLIP ViT-L/14 (OpenAI) checkpoint in any supported format")
  p.add_argument(
    "--clip-format", default="auto", choices=["auto", "hf", "openai", "open_clip"], help="the CLIP checkpoint's layout"
  )
  add_preprocess_arg(p, "clip")
  p.add_argument("--batch-size", type=COUNT, default=32, help="images per forward pass")
  add_output_args(p)
  p.add_argument("images", nargs="+", help="image files or folders (searched recursively)")
  p.set_defaults(run=run_aesthetic)


def run_aesthetic(args) -> int:
  check_output(args.output, overwrite=args.overwrite, inputs=args.images)
  images = expand_images(args.images)
  try:
    scorer = AestheticScorer.from_checkpoint(
      args.mlp, args.clip_checkpoint, args.clip_format, preprocess=args.preprocess, batch_size=args.batch_size
    )
  except ValueError as e:  # e.g. a head whose input is not the CLIP model's embedding size
    raise UsageError(str(e)) from e
  return write_rows(scorer.iter_scores(images), len(images), args.output, "aesthetic", Skips())
