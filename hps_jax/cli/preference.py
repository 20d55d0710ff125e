"""`hps-jax train-preference` (the HPS classifier from a config) and `hps-jax eval-preference` (Table 2)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from hps_jax import parallel
from hps_jax.cli.common import (
  CHECKPOINT_FORMATS,
  COUNT,
  UsageError,
  add_dataset_args,
  add_parser,
  add_training_args,
  check_report_output,
  integer,
  open_dataset,
  require_finite,
  run_training,
  write_report,
)
from hps_jax.convert.aesthetic import load_aesthetic
from hps_jax.convert.clip import load_clip
from hps_jax.data.pipeline import RecordTransform
from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.sources import limit
from hps_jax.preference import train
from hps_jax.preference.evaluate import (
  aesthetic_score_fn,
  clip_score_fn,
  markdown_table,
  preference_report,
  slot_scores,
)
from hps_jax.preference.scorer import resolve_tokenizer


def add_train_preference(sub):
  p = add_parser(
    sub,
    "train-preference",
    help="train the preference classifier (HPS) from a config",
    description="Trains CLIP on human choices (n-way choice loss). Every hyperparameter is in the "
    "config; override any with --config.KEY=VALUE (e.g. --config.optim.lr=3e-5). "
    "Re-running with the same --workdir resumes from its last checkpoint.",
  )
  add_training_args(
    p,
    config_example="hps_classifier:tiny or hps_classifier:paper",
    dry_run_help="print the trainable / frozen parameter counts and the config, then exit",
  )
  p.set_defaults(run=run_train_preference)


def run_train_preference(args) -> int:
  return run_training(args, train.run, lambda config, workdir: train.describe_counts(train.parameter_counts(config)))


def add_eval_preference(sub):
  p = add_parser(
    sub,
    "eval-preference",
    help="preference accuracy of a scorer on a dataset (the paper's Table 2)",
    description="For every prompt, scores its images and checks whether the human-chosen one scores "
    "highest (n-way accuracy); also the random-guess expectation, pairwise accuracy and a "
    "per-n breakdown. Writes JSON and a markdown table.",
  )
  who = p.add_mutually_exclusive_group(required=True)
  who.add_argument(
    "--checkpoint", metavar="CKPT", help="an HPS / CLIP checkpoint (any supported format): HPS = cos(image, prompt)"
  )
  who.add_argument(
    "--aesthetic-mlp",
    "--aesthetic",
    dest="aesthetic",
    metavar="MLP",
    help="the LAION aesthetic head (needs --clip-checkpoint)",
  )
  who.add_argument("--random", action="store_true", help="uniform random scores (the chance baseline)")
  p.add_argument("--clip-checkpoint", help="CLIP ViT-L/14 for --aesthetic-mlp")
  p.add_argument("--format", default="auto", choices=CHECKPOINT_FORMATS, help="checkpoint layout (auto: detected)")
  p.add_argument("--tokenizer", help="CLIP BPE file or HF tokenizer dir (default: the checkpoint's)")
  p.add_argument("--preprocess", choices=["pad", "clip"], help="default: pad for HPS, clip for aesthetic")
  p.add_argument(
    "--max-images", type=integer(2), default=4, help="image slots per prompt (more are truncated, chosen kept)"
  )
  p.add_argument("--batch-size", type=COUNT, default=16, help="prompts per batch")
  add_dataset_args(p, seed_help="seeds --random and the synthetic set")
  p.add_argument("--output", help="JSON report (a .md table is written next to it)")
  p.set_defaults(run=run_eval_preference)


def run_eval_preference(args) -> int:
  if args.aesthetic and not args.clip_checkpoint:
    raise UsageError("--aesthetic-mlp needs --clip-checkpoint (the CLIP ViT-L/14 whose embedding it reads)")
  check_report_output(args.output, inputs=[args.dataset])
  source = limit(open_dataset(args), args.max_prompts)
  score_fn, image_size, name = _eval_scorer(args)
  mode = args.preprocess or ("clip" if args.aesthetic else "pad")
  tokenizer = resolve_tokenizer(args.tokenizer, args.checkpoint or args.clip_checkpoint)
  transform = RecordTransform(tokenizer, PreprocessConfig(mode=mode, size=image_size), max_images=args.max_images)
  scores, ranks = slot_scores(score_fn, source, transform, args.batch_size, progress=True)
  report = preference_report(scores, ranks)
  report.update({"scorer": name, "dataset": args.dataset, "split": args.split, "preprocess": mode})
  table = markdown_table(report, f"{name} on {args.dataset}/{args.split}")
  require_finite(report)
  print(table)
  write_report(args.output, report, table)
  return 0


def _eval_scorer(args):
  """-> (batch -> (B, K) scores, model input size, a name for the report)."""
  if args.random:
    rng = np.random.default_rng(args.seed)
    return (lambda batch: rng.random(batch["mask"].shape)), 32, "random"  # images are still decoded (and checked)
  if args.checkpoint:
    model = load_clip(args.checkpoint, args.format)
    return clip_score_fn(model, batch_size=_eval_batch(args)), model.config.image_size, f"HPS ({args.checkpoint})"
  clip_model = load_clip(args.clip_checkpoint, args.format)
  return (
    aesthetic_score_fn(clip_model, load_aesthetic(args.aesthetic), batch_size=_eval_batch(args)),
    clip_model.config.image_size,
    f"aesthetic ({Path(args.aesthetic).name})",
  )


def _eval_batch(args) -> int:
  div = parallel.batch_divisor(parallel.local_mesh())
  if args.batch_size % div:
    args.batch_size = -(-args.batch_size // div) * div  # round up to a multiple of the local devices
    print(f"--batch-size rounded up to {args.batch_size}, a multiple of the {div} local devices", file=sys.stderr)
  return args.batch_size
