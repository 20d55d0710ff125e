"""`hps-jax train-preference` (the HPS classifier from a config) and `hps-jax eval-preference` (Table 2)."""

from __future__ import annotations

import dataclasses
import re
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
  named_specs,
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
from hps_jax.errors import InputError
from hps_jax.preference import train
from hps_jax.preference.evaluate import (
  aesthetic_score_fn,
  clip_score_fn,
  comparison_table,
  markdown_table,
  preference_report,
  slot_scores,
  table2_order,
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
    "per-n breakdown. Writes JSON and a markdown table. Several scorers in one run (repeat "
    "--checkpoint / --aesthetic-mlp, add --random) give the paper's Table 2: rows random, CLIP models, "
    "aesthetic, HPS models; a --checkpoint whose row name starts with 'CLIP' (or an OpenAI CLIP release "
    "file such as RN50x64.pt) is listed with the CLIP baselines, any other with the HPS models.",
  )
  p.add_argument(
    "--checkpoint",
    metavar="[NAME=]CKPT",
    action="append",
    help="an HPS / CLIP checkpoint (any supported format): score = cos(image, prompt); repeatable; NAME= labels "
    "its table row (default: the file name; an existing path containing '=' is a path)",
  )
  p.add_argument(
    "--aesthetic-mlp",
    "--aesthetic",
    dest="aesthetic",
    metavar="[NAME=]MLP",
    action="append",
    help="the LAION aesthetic head (needs --clip-checkpoint); repeatable, NAME= as for --checkpoint",
  )
  p.add_argument("--random", action="store_true", help="uniform random scores (the chance baseline)")
  p.add_argument("--clip-checkpoint", help="CLIP ViT-L/14 for --aesthetic-mlp")
  p.add_argument("--format", default="auto", choices=CHECKPOINT_FORMATS, help="checkpoint layout (auto: detected)")
  p.add_argument("--tokenizer", help="CLIP BPE file or HF tokenizer dir (default: the checkpoint's)")
  p.add_argument("--preprocess", choices=["pad", "clip"], help="default: pad for HPS / CLIP, clip for aesthetic")
  p.add_argument(
    "--max-images", type=integer(2), default=4, help="image slots per prompt (more are truncated, chosen kept)"
  )
  p.add_argument("--batch-size", type=COUNT, default=16, help="prompts per batch")
  add_dataset_args(p, seed_help="seeds --random and the synthetic set")
  p.add_argument("--output", help="JSON report (a .md table is written next to it)")
  p.set_defaults(run=run_eval_preference)


# OpenAI's CLIP release files (RN50x64.pt, ViT-L-14.pt, ViT-L-14-336px.pt, ...): zero-shot CLIP rows of Table 2
_OPENAI_CLIP_FILE = re.compile(r"^(RN\d+(x\d+)?|ViT-[BLHg]-\d+(-\d+px)?)\.pt$", re.IGNORECASE)


@dataclasses.dataclass
class _Row:
  """One scorer of an eval-preference run (one row of the table)."""

  kind: str  # one of TABLE2_KINDS
  name: str  # the row's label (the report's "scorer")
  path: str | None = None  # the checkpoint, or the aesthetic head


def _named_path(spec: str, flag: str) -> tuple[str | None, str]:
  """`NAME=PATH` -> (NAME, PATH); an existing path (even one holding '=') or a spec without '=' -> (None, spec)."""
  if "=" not in spec or Path(spec).exists():
    return None, spec
  [(name, path)] = named_specs([spec], flag, "PATH")
  if not Path(path).exists():
    raise UsageError(f"{flag} {spec}: no such file or directory: {path}")
  return name, path


def _scorer_rows(args) -> list[_Row]:
  """The scorers asked for, in the paper's Table 2 order (random, CLIP, aesthetic, HPS; as given within a kind)."""
  rows = [_Row("random", "random")] if args.random else []
  single = (len(args.checkpoint or []) + len(args.aesthetic or []) + bool(args.random)) == 1
  for spec in args.checkpoint or []:
    name, path = _named_path(spec, "--checkpoint")
    label = name or Path(path).name or path
    clip = label.lower().startswith("clip") or bool(_OPENAI_CLIP_FILE.match(Path(path).name))
    rows.append(_Row("clip" if clip else "hps", name or (f"HPS ({path})" if single else label), path))
  for spec in args.aesthetic or []:
    name, path = _named_path(spec, "--aesthetic-mlp")
    rows.append(
      _Row("aesthetic", name or (f"aesthetic ({Path(path).name})" if single else Path(path).name or path), path)
    )
  if not rows:
    raise UsageError("choose a scorer: --checkpoint CKPT, --aesthetic-mlp MLP (with --clip-checkpoint) or --random")
  if args.aesthetic and not args.clip_checkpoint:
    raise UsageError("--aesthetic-mlp needs --clip-checkpoint (the CLIP ViT-L/14 whose embedding it reads)")
  seen = set()
  for row in rows:
    if row.name in seen:
      raise UsageError(f"two scorers are named {row.name!r}: label them with NAME=CKPT")
    seen.add(row.name)
    if row.path is not None and not Path(row.path).exists():  # every input checked before the first scorer runs
      raise UsageError(f"{row.path}: no such file or directory (expected a checkpoint)")
  if args.aesthetic and not Path(args.clip_checkpoint).exists():
    raise UsageError(f"--clip-checkpoint {args.clip_checkpoint}: no such file or directory")
  return [rows[i] for i in table2_order([r.kind for r in rows])]


def run_eval_preference(args) -> int:
  rows = _scorer_rows(args)
  check_report_output(args.output, inputs=[args.dataset])
  source = limit(open_dataset(args), args.max_prompts)
  batch_size = args.batch_size  # the random row draws its scores batch by batch: it keeps the batch size given
  model_batch = _eval_batch(args) if any(r.kind != "random" for r in rows) else batch_size
  where = f"{args.dataset}/{args.split}"
  if len(rows) == 1:  # one scorer: the flat report and per-n table of before
    row = rows[0]
    report, about = _evaluate(args, row, source, batch_size if row.kind == "random" else model_batch, {})
    report.update({"scorer": row.name, "dataset": args.dataset, "split": args.split, "preprocess": about["preprocess"]})
    table = markdown_table(report, f"{row.name} on {where}")
    require_finite(report)
    print(table)
    write_report(args.output, report, table)
    return 0
  reports, clip_cache = [], {}
  for row in rows:
    report, about = _evaluate(args, row, source, batch_size if row.kind == "random" else model_batch, clip_cache)
    reports.append({"scorer": row.name, "kind": row.kind, **report, **about})
  clip_cache.clear()
  summary_keys = ("scorer", "kind", "accuracy", "random_expectation", "pairwise_accuracy", "num_prompts", "preprocess")
  summary = [{k: r[k] for k in summary_keys} | {"image_size": r["image_size"]} for r in reports]
  out = {"dataset": args.dataset, "split": args.split, "table": summary, "scorers": reports}
  table = comparison_table(reports, f"Preference accuracy on {where} (the paper's Table 2)")
  table += "".join("\n" + markdown_table(r, f"{r['scorer']}: per number of images") for r in reports)
  require_finite(out)
  print(table)
  write_report(args.output, out, table)
  return 0


def _evaluate(args, row: _Row, source, batch_size: int, clip_cache: dict) -> tuple[dict, dict]:
  """One scorer's `preference_report` (accuracy, per-n, ...) and what it ran with (preprocessing, model input size,
  inputs)."""
  score_fn, image_size, extra = _eval_scorer(args, row, batch_size, clip_cache)
  mode = args.preprocess or ("clip" if row.kind == "aesthetic" else "pad")
  tokenizer = resolve_tokenizer(args.tokenizer, row.path if row.kind in ("clip", "hps") else args.clip_checkpoint)
  transform = RecordTransform(tokenizer, PreprocessConfig(mode=mode, size=image_size), max_images=args.max_images)
  scores, ranks = slot_scores(score_fn, source, transform, batch_size, progress=True, desc=row.name)
  try:
    report = preference_report(scores, ranks)
  except InputError as e:
    raise InputError(f"{row.name}: {e}") from e
  return report, {"preprocess": mode, "image_size": image_size, **extra}


def _eval_scorer(args, row: _Row, batch_size: int, clip_cache: dict):
  """-> (batch -> (B, K) scores, model input size, what the report records about the scorer's inputs)."""
  if row.kind == "random":
    rng = np.random.default_rng(args.seed)
    # images are still decoded (and checked)
    return (lambda batch: rng.random(batch["mask"].shape)), 32, {"seed": args.seed}
  if row.kind != "aesthetic":
    model = load_clip(row.path, args.format)
    return clip_score_fn(model, batch_size=batch_size), model.config.image_size, {"checkpoint": row.path}
  if args.clip_checkpoint not in clip_cache:  # one CLIP for every aesthetic head
    clip_cache[args.clip_checkpoint] = load_clip(args.clip_checkpoint, args.format)
  clip_model = clip_cache[args.clip_checkpoint]
  return (
    aesthetic_score_fn(clip_model, load_aesthetic(row.path), batch_size=batch_size),
    clip_model.config.image_size,
    {"aesthetic_mlp": row.path, "clip_checkpoint": args.clip_checkpoint},
  )


def _eval_batch(args) -> int:
  div = parallel.batch_divisor(parallel.local_mesh())
  if args.batch_size % div:
    args.batch_size = -(-args.batch_size // div) * div  # round up to a multiple of the local devices
    print(f"--batch-size rounded up to {args.batch_size}, a multiple of the {div} local devices", file=sys.stderr)
  return args.batch_size
