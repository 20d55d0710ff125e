"""`hps-jax dataset stats` (the paper's Sec. 3 numbers of a preference dataset) and `hps-jax dataset metrics` (Table 1:
IS / FID of the preferred vs the non-preferred images)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

from hps_jax.cli.common import (
  COUNT,
  UsageError,
  add_dataset_args,
  add_parser,
  check_report_output,
  open_dataset,
  progress,
  require_finite,
  say_wrote,
  write_report,
)
from hps_jax.cli.metrics import add_inception_args, load_inception_arg
from hps_jax.data import stats as dstats
from hps_jax.data.pairs import jsonl_objects
from hps_jax.data.skips import Skips
from hps_jax.data.sources import concat, limit
from hps_jax.metrics import table1
from hps_jax.plotting import pyplot, require_matplotlib

SPLIT_HELP = "dataset split, or several joined by commas (e.g. train,test: the whole dataset)"


def add_dataset(sub):
  p = add_parser(
    sub,
    "dataset",
    help="statistics of a preference dataset and its Table 1 metrics (IS / FID of preferred vs non-preferred)",
    description="`dataset stats`: prompts by image count, images, users and choices per user, prompt lengths "
    "(the paper's Sec. 3). `dataset metrics`: Inception Score and FID of the preferred vs the non-preferred images "
    "(the paper's Table 1).",
  )
  cmds = p.add_subparsers(dest="dataset_command", metavar="SUBCOMMAND", title="subcommands", required=True)

  s = add_parser(
    cmds,
    "stats",
    help="prompts by image count, images, users, choices per user, prompt lengths",
    description="Counts over every record of the split(s): prompts by number of images (n = 2, 3, 4, ...), images, "
    "users and choices per user (when the records name their user), prompt length in words and characters. "
    "Prints a markdown table; --output writes JSON (and the table next to it), --plots PNG histograms.",
  )
  add_dataset_args(
    s, positional=True, extra_help=", or a preference .jsonl file (`collect discord` output; its users are counted)"
  )
  s.set_defaults(run=run_dataset_stats)
  s.add_argument("--output", metavar="FILE.json", help="JSON report (a .md table is written next to it)")
  s.add_argument(
    "--plots",
    metavar="DIR",
    help="also write PNG histograms of images per prompt, choices per user and prompt length (needs matplotlib)",
  )

  m = add_parser(
    cmds,
    "metrics",
    help="Table 1: IS and FID of the preferred vs the non-preferred images",
    description="Samples the preferred (chosen) images and the non-preferred (ranked worse than the chosen) images "
    "of the split(s), each seeded and without replacement (at most --num-is for IS, --num-fid for FID), and measures "
    "them with the FID Inception exactly as `hps-jax metrics --metrics is,fid` would. Prints a markdown table; "
    "--output writes JSON (and the table next to it).",
  )
  add_dataset_args(m, positional=True, seed_help="seeds the two samples (and the synthetic set)")
  m.add_argument(
    "--reference", required=True, help="FID reference: image directory, JSONL of {image} rows, or a stats .npz"
  )
  m.add_argument("--num-is", type=COUNT, default=20000, help="images per subset for the Inception Score (at most)")
  m.add_argument("--num-fid", type=COUNT, default=10000, help="images per subset for FID (at most)")
  m.add_argument("--is-splits", type=COUNT, default=10, help="Inception Score splits")
  add_inception_args(m)
  m.add_argument(
    "--save-samples",
    metavar="DIR",
    help="keep the sampled images in DIR (a new or empty folder): <subset>/ and <subset>_is.jsonl, "
    "<subset>_fid.jsonl, inputs for `hps-jax metrics --images`",
  )
  m.add_argument("--output", metavar="FILE.json", help="JSON report (a .md table is written next to it)")
  m.set_defaults(run=run_dataset_metrics)


def _source(args):
  splits = [s.strip() for s in args.split.split(",") if s.strip()]
  if not splits:
    raise UsageError("--split names no split")
  if args.max_prompts < 0:
    raise UsageError("--max-prompts must be >= 0")
  return limit(concat([open_dataset(args, s) for s in splits]), args.max_prompts)


def _jsonl_records(path: str) -> list[dict]:
  """The rows of a preference JSONL read as they are (`collect discord` output keeps its `user` field, which the
  prepared TFDS datasets do not store); rows without a prompt or an image list are an error naming the line."""
  rows, bad = [], Skips()
  try:
    for where, row in jsonl_objects(path, bad.add):
      if not isinstance(row, dict) or not isinstance(row.get("images"), list) or "prompt" not in row:
        raise UsageError(f"{where}: expected an object with 'prompt' and an 'images' list")
      rows.append(row)
  except ValueError as e:
    raise UsageError(str(e)) from e
  if bad.items:
    raise UsageError(f"{bad.items[0][0]}: {bad.items[0][1]}")
  return rows


def _check_output(args) -> None:
  check_report_output(args.output, inputs=[getattr(args, "data_dir", None), getattr(args, "dataset", None)])


def _write(args, report: dict, table: str) -> None:
  require_finite(report)
  print(table, end="")
  write_report(args.output, report, table)


def run_dataset_stats(args) -> int:
  _check_output(args)
  if args.plots:
    require_matplotlib("--plots")  # before reading the dataset: a missing matplotlib fails at once
  source = _jsonl_records(args.dataset) if args.dataset.endswith(".jsonl") else _source(args)
  stats = dstats.DatasetStats()
  with progress(len(source), "records", unit="rec") as bar:
    for i in range(len(source)):
      stats.add(source[i])
      bar.update(1)
  report = {"dataset": args.dataset, "split": args.split, **stats.summary()}
  _write(args, report, dstats.markdown(report, f"{args.dataset}/{args.split}"))
  if args.plots:
    written = plot_stats(stats, args.plots)
    say_wrote(args.plots, f"{len(written)} histograms ({', '.join(p.name for p in written)})")
  return 0


def run_dataset_metrics(args) -> int:
  _check_output(args)
  if args.seed < 0:
    raise UsageError("--seed must be >= 0")
  if args.save_samples and Path(args.save_samples).exists() and any(Path(args.save_samples).iterdir()):
    raise UsageError(f"--save-samples {args.save_samples} is not empty: choose a new folder")
  source = _source(args)
  model = load_inception_arg(args)
  try:
    result = table1.table1(
      source,
      args.reference,
      model,
      num_is=args.num_is,
      num_fid=args.num_fid,
      seed=args.seed,
      resize=args.resize,
      batch_size=args.batch_size,
      is_splits=args.is_splits,
      inception_sha256=args.inception_sha256,
      samples_dir=args.save_samples,
    )
  except ValueError as e:
    raise UsageError(str(e)) from e
  report = {"dataset": args.dataset, "split": args.split, **result}
  _write(args, report, table1.markdown(report, f"Table 1: {args.dataset}/{args.split}"))
  for s in result["skipped"]:
    print(f"  skipped {s['what']}: {s['why']}", file=sys.stderr)
  if args.save_samples:
    say_wrote(args.save_samples, "the sampled images")
  return 1 if result["skipped"] else 0


def plot_stats(stats: dstats.DatasetStats, out_dir) -> list[Path]:
  """PNG histograms of images per prompt, choices per user (when users are recorded) and prompt length."""
  plt = pyplot()
  out = Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  written = []

  def save(fig, name):
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    written.append(out / name)

  fig, ax = plt.subplots(figsize=(5, 3.5))
  by_n = Counter(stats.images_per_prompt)
  ns = sorted(by_n)
  ax.bar([str(n) for n in ns], [by_n[n] for n in ns])
  ax.set(xlabel="images per prompt", ylabel="prompts", title="prompts by number of images")
  save(fig, "images_per_prompt.png")
  if stats.choices:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(list(stats.choices.values()), bins=min(50, max(stats.choices.values())))
    ax.set(xlabel="choices per user", ylabel="users", title=f"choices per user ({len(stats.choices):,} users)")
    save(fig, "choices_per_user.png")
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
  for ax, values, unit in ((axes[0], stats.prompt_words, "words"), (axes[1], stats.prompt_chars, "characters")):
    ax.hist(values, bins=50)
    ax.set(xlabel=f"prompt length ({unit})", ylabel="prompts")
  fig.suptitle("prompt length")
  save(fig, "prompt_length.png")
  return written
