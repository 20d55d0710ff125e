"""What every `hps-jax` subcommand shares: the error contract (UsageError, exit codes), the help formatter, progress
bars, the skip report, row writers, prompt and pair readers, argument groups used by several commands, config
loading and the one training-command wiring (`run_training`).

Exit codes: 0 all done; 1 the run finished but some inputs were skipped (each named in the summary); 2 bad usage,
or an unreadable input file / checkpoint / config (one line, no traceback); 3 training stopped on a non-finite loss.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from hps_jax import configs
from hps_jax.data.images import image_files
from hps_jax.data.pairs import read_image_rows
from hps_jax.data.skips import Skips
from hps_jax.data.sources import open_source

EXIT_OK = 0
EXIT_SKIPPED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

CHECKPOINT_FORMATS = ["auto", "hf", "openai", "open_clip"]


class UsageError(Exception):
  """An error in what the user asked for; printed as one line, exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
  """Shows every option's default (when it has one) after its help text, and keeps the description's line breaks
  out of the way of the wrapped option list."""

  def _get_help_string(self, action):
    text = action.help or ""
    if "%(default)" in text or not action.option_strings or not shows_default(action):
      return text
    return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def shows_default(action) -> bool:
  """Whether --help shows this option's default: not for None, False (flags), '' (unset) or a suppressed one
  (identity checks: 0 is a default worth showing, though 0 == False)."""
  d = action.default
  return not (d is None or d is False or d is argparse.SUPPRESS or (isinstance(d, str) and d == ""))


def add_parser(sub, name: str, **kw) -> argparse.ArgumentParser:
  """A subcommand parser with the shared formatter."""
  return sub.add_parser(name, formatter_class=HelpFormatter, **kw)


# ------------------------------------------------------------------------------------------------------------
# reporting and output
# ------------------------------------------------------------------------------------------------------------
def report_skips(skips: Skips, done: int, noun: str = "images", stream=None) -> int:
  """The end-of-run summary: how many were processed, every skipped input with its reason; -> exit code."""
  stream = stream or sys.stderr  # looked up at call time (redirections after import are honoured)
  print(f"done: {done} {noun} processed, {len(skips.items)} skipped", file=stream)
  for what, why in skips.items:
    print(f"  skipped {what}: {why}", file=stream)
  return EXIT_SKIPPED if skips.items else EXIT_OK


def progress(total: int | None, desc: str, unit: str = "img"):
  return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def say_wrote(path, what: str) -> None:
  """The one line every command prints for an output file it wrote."""
  print(f"wrote {what} to {path}", file=sys.stderr)


def open_output(path: str | None):
  if path is None or path == "-":
    return sys.stdout
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  return open(path, "w", encoding="utf-8")


def write_json(path, obj) -> None:
  """JSON written atomically (a temporary file renamed over the target)."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
  os.replace(tmp, path)


OUTPUT_FORMATS = (".jsonl", ".csv", ".parquet")


def check_output(path: str | None, *, overwrite: bool, inputs=()) -> None:
  """Validates an --output path before any work: a known format (by extension), not one of the inputs, and not an
  existing file unless --overwrite. None / '-' is stdout (JSONL)."""
  if path is None or path == "-":
    return
  out = Path(path)
  if out.suffix.lower() not in OUTPUT_FORMATS:
    raise UsageError(
      f"--output {path}: unknown format {out.suffix or '(no extension)'}; use {', '.join(OUTPUT_FORMATS)}"
    )
  if out.is_dir():
    raise UsageError(f"--output {path} is a directory, expected a file")
  resolved = out.resolve()
  for i in inputs:
    if i is not None and Path(i).resolve() == resolved:
      raise UsageError(f"--output {path} is also an input: choose another file")
  if out.exists() and not overwrite:
    raise UsageError(f"--output {path} exists: pass --overwrite to replace it")
  if out.suffix.lower() == ".parquet":
    try:
      import pyarrow  # noqa: F401  (optional: the [data] extra)
    except ImportError:
      raise UsageError("writing .parquet needs pyarrow: pip install 'hps_jax[data]' (or use .jsonl / .csv)") from None


def add_ranks(rows: list[dict], key: str) -> None:
  """rank = 1 for the highest `key` among the rows of the same prompt (ties share the better rank): HPS values only
  compare images of one prompt."""
  by_prompt: dict[str, list[dict]] = {}
  for row in rows:
    by_prompt.setdefault(row.get("prompt"), []).append(row)
  for group in by_prompt.values():
    values = [r[key] for r in group]
    for r in group:
      r["rank"] = 1 + sum(v > r[key] for v in values)


def write_table(rows: list[dict], path: str | None) -> None:
  """Rows as JSONL (stdout, .jsonl), CSV or Parquet by the path's extension; files are written atomically."""
  if path is None or path == "-":
    for row in rows:
      sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
    sys.stdout.flush()
    return
  out = Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(out.name + ".tmp")
  fmt = out.suffix.lower()
  columns = list(dict.fromkeys(k for row in rows for k in row))
  if fmt == ".parquet":
    import pyarrow as pa  # optional (the [data] extra), checked by check_output
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp)
  elif fmt == ".csv":
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=columns)
      writer.writeheader()
      writer.writerows(rows)
  else:
    with open(tmp, "w", encoding="utf-8") as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
  os.replace(tmp, out)


def write_rows(rows, total: int, output: str | None, desc: str, skips: Skips, rank_by: str | None = None) -> int:
  """Collects result rows with a progress bar (rows with an 'error' go to the skip report), adds per-prompt ranks
  when asked, writes them (`write_table`) and reports; -> exit code."""
  done = []
  with progress(total, desc) as bar:
    for row in rows:
      bar.update(1)
      if "error" in row:
        skips.add(row["image"], row["error"])
        continue
      done.append(row)
  if rank_by is not None:
    add_ranks(done, rank_by)
  write_table(done, output)
  if output is not None and output != "-":
    say_wrote(output, f"{len(done)} rows")
  return report_skips(skips, len(done))


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------
def read_pairs(path: str, skips: Skips) -> Iterator[tuple[str, str]]:
  """A JSONL of {"image": PATH, "prompt": TEXT} rows; relative image paths are relative to the file."""
  try:
    yield from read_image_rows(path, skips.add, require_prompt=True)
  except ValueError as e:
    raise UsageError(f"cannot read pairs file {path}: {e.__cause__ or e}") from e


def expand_images(paths) -> list[str]:
  """Image paths from the command line, each directory replaced by the image files below it (recursive)."""
  out = []
  for p in paths:
    if Path(p).is_dir():
      try:
        out.extend(str(f) for f in image_files(p))
      except ValueError as e:
        raise UsageError(str(e)) from e
    else:
      out.append(str(p))
  return out


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
  """One --prompt, or the non-empty lines of a --prompts file."""
  if not prompts_file:
    return [prompt]
  try:
    lines = Path(prompts_file).read_text(encoding="utf-8").splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise UsageError(f"cannot read {prompts_file}: {e}") from e
  return [line.strip() for line in lines if line.strip()]


def positive(args, *names: str) -> None:
  """Every named integer option must be >= 1."""
  bad = [n for n in names if getattr(args, n) < 1]
  if bad:
    raise UsageError(", ".join("--" + n.replace("_", "-") for n in bad) + " must be >= 1")


# ------------------------------------------------------------------------------------------------------------
# argument groups shared by several commands (one name for one thing)
# ------------------------------------------------------------------------------------------------------------
def add_checkpoint_args(p, *, required: bool = True, help: str | None = None, aliases: tuple = ()) -> None:
  """--checkpoint (the HPS / CLIP model), its --format, --activation and --tokenizer."""
  p.add_argument(
    "--checkpoint",
    *aliases,
    dest="checkpoint",
    required=required,
    metavar="CKPT",
    help=help
    or "HPS / CLIP checkpoint: HF CLIPModel dir, hpc.pt (HPS v1), HPS_v2*.pt, safetensors, or a published model's "
    "name (hps-v2.1, hps-v2, hps-v1, clip-vit-l-14, pickscore: `hps-jax weights list`)",
  )
  p.add_argument("--format", default="auto", choices=CHECKPOINT_FORMATS, help="checkpoint layout (auto: detected)")
  p.add_argument("--activation", choices=["quick_gelu", "gelu"], help="override the inferred MLP activation")
  p.add_argument("--tokenizer", help="CLIP BPE file (bpe_simple_vocab_16e6.txt.gz) or HF tokenizer dir")


def add_dataset_args(
  p, *, positional: bool = False, seed_help: str = "seeds the synthetic set", extra_help: str = ""
) -> None:
  """The preference dataset a command reads (`hps_jax.data.sources.open_source`): DATASET (or --dataset), --split,
  --manual-dir, --data-dir, --builder-config, --max-prompts, --seed and the synthetic set's size; `open_dataset`
  opens it."""
  what = "synthetic, hpd_v1, hpd_v2, pickapic or preference_jsonl" + extra_help
  if positional:
    p.add_argument("dataset", metavar="DATASET", help=what)
  else:
    p.add_argument("--dataset", required=True, help=what)
  p.add_argument("--split", default="test", help="dataset split")
  p.add_argument("--manual-dir", default="", help="the dataset's local download (not for synthetic)")
  p.add_argument("--data-dir", default="", help="where the prepared TFDS files go (default MANUAL_DIR/tfds_prepared)")
  p.add_argument("--builder-config", default="", help="TFDS builder config (e.g. pickapic's with_ties)")
  p.add_argument("--max-prompts", type=int, default=0, help="use only the first N prompts (0 = all)")
  p.add_argument("--seed", type=int, default=0, help=seed_help)
  p.add_argument("--synthetic-size", type=int, default=200, help="prompts of the synthetic set")
  p.add_argument("--synthetic-image-size", type=int, default=48, help="image size of the synthetic set")


def open_dataset(args, split: str | None = None):
  """The records of one split (default --split) of the dataset named by `add_dataset_args`' options (callers apply
  --max-prompts with `hps_jax.data.sources.limit`); an unknown dataset or a missing download is a UsageError."""
  try:
    source = open_source(
      args.dataset,
      args.split if split is None else split,
      manual_dir=args.manual_dir,
      data_dir=args.data_dir,
      builder_config=args.builder_config,
      seed=args.seed,
      synthetic_size=args.synthetic_size,
      synthetic_image_size=args.synthetic_image_size,
    )
  except ValueError as e:
    raise UsageError(str(e)) from e
  return source


# ------------------------------------------------------------------------------------------------------------
# configs and training
# ------------------------------------------------------------------------------------------------------------
def load_config(spec: str, overrides: list[str] | tuple[str, ...] = ()):
  """An ml_collections config from 'name[:preset]' (a packaged config) or 'path.py[:preset]', with --config.KEY=VALUE
  overrides; any mistake is a UsageError naming it."""
  try:
    return configs.load_config(spec, overrides)
  except configs.ConfigError as e:
    raise UsageError(str(e)) from e


def add_training_args(p, *, config_example: str, dry_run_help: str) -> None:
  p.add_argument(
    "--config", required=True, help=f"a packaged config and preset ({config_example}) or a config file's PATH:preset"
  )
  p.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, tb/, export/ go here")
  p.add_argument("--dry-run", action="store_true", help=dry_run_help)
  p.set_defaults(accepts_config_overrides=True)


def run_training(args, run: Callable, describe: Callable) -> int:
  """The one wiring of the training commands: config (+ overrides) -> --dry-run description, or run(config,
  workdir) with resume from WORKDIR's last checkpoint (the loop's process 0 writes WORKDIR/config.json); the summary (status,
  step, parameter counts, eval, export) is printed as one JSON line. Exit 0 done, 3 stopped on a non-finite loss."""
  config = load_config(args.config, args.overrides)
  workdir = Path(args.workdir)
  if args.dry_run:
    try:
      print(describe(config, workdir))
    except (ValueError, FileNotFoundError) as e:
      raise UsageError(str(e)) from e
    print(config)
    return EXIT_OK
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    result = run(config, workdir)
  except (ValueError, FileNotFoundError) as e:
    raise UsageError(str(e)) from e
  summary = {
    "status": result.status,
    "step": result.step,
    "trainable_params": result.trainable_params,
    "frozen_params": result.frozen_params,
    "eval": result.eval,
    "export": result.export_path,
  }
  print(json.dumps(summary))
  return EXIT_OK if result.status == "done" else EXIT_FAILED
