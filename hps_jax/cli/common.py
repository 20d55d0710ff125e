"""What every `hps-jax` subcommand shares: the error contract (UsageError, exit codes), the help formatter, progress
bars, the skip report, row writers, prompt and pair readers, argument groups used by several commands, config
loading and the one training-command wiring (`run_training`).

Exit codes: 0 all done; 1 the run finished but some inputs were skipped (each named in the summary); 2 bad usage,
or an unreadable input file / checkpoint / config (one line, no traceback); 3 training stopped on a non-finite loss.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import json
import math
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from tqdm import tqdm

from hps_jax import configs, files
from hps_jax.data.images import describe as describe_source
from hps_jax.data.images import image_files
from hps_jax.data.pairs import read_image_rows
from hps_jax.data.skips import Skips
from hps_jax.data.sources import open_source
from hps_jax.errors import InputError, check_stop

EXIT_OK = 0
EXIT_SKIPPED = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

CHECKPOINT_FORMATS = ["auto", "hf", "openai", "open_clip"]


class UsageError(InputError):
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


class _Progress(tqdm):
  """A progress bar that is also a stop point: a SIGTERM / SIGINT received meanwhile stops the loop here."""

  def update(self, n=1):
    check_stop()
    return super().update(n)


def progress(total: int | None, desc: str, unit: str = "img"):
  return _Progress(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


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
  files.write_text(path, json.dumps(obj, indent=2) + "\n")


def first_non_finite(obj, where: str = "") -> str | None:
  """The path ('fid', 'per_prompt[3].hps') of the first NaN / infinite number in a JSON-like result, or None."""
  if isinstance(obj, float):
    return None if math.isfinite(obj) else (where or "the value")
  if isinstance(obj, dict):
    items = ((f"{where}.{k}" if where else str(k), v) for k, v in obj.items())
  elif isinstance(obj, (list, tuple)):
    items = ((f"{where}[{i}]", v) for i, v in enumerate(obj))
  else:
    return None
  for path, v in items:
    bad = first_non_finite(v, path)
    if bad is not None:
      return bad
  return None


def require_finite(result, what: str = "the result") -> None:
  """No impossible number is ever reported at exit 0: a NaN / infinite value (NaN weights in a checkpoint, a
  degenerate statistics file) is an error naming where it appeared; nothing is written."""
  bad = first_non_finite(result)
  if bad is not None:
    raise InputError(
      f"{what} holds a non-finite value at {bad}: an input (checkpoint weights, statistics, images) produced NaN or "
      "infinity; nothing was written"
    )


def check_report_output(path: str | None, inputs=()) -> None:
  """--output of a JSON report (a markdown table is written next to it, FILE.md)."""
  if path:
    check_output(path, overwrite=True, inputs=inputs, formats=(".json",))
    if Path(path).with_suffix(".md").resolve() in {Path(i).resolve() for i in inputs if i}:
      raise UsageError(f"--output {path}: its table {Path(path).with_suffix('.md')} would replace an input")


def write_report(path: str | None, report: dict, table: str, what: str = "the report") -> None:
  """A JSON report and its markdown table (FILE.json + FILE.md), both atomic, after checking every number is
  finite."""
  require_finite(report, what)
  if path:
    out = Path(path)
    write_json(out, report)
    files.write_text(out.with_suffix(".md"), table)
    say_wrote(f"{out} and {out.with_suffix('.md')}", what)


OUTPUT_FORMATS = (".jsonl", ".csv", ".parquet")


def check_output(
  path: str | None, *, overwrite: bool, inputs=(), flag: str = "--output", formats=OUTPUT_FORMATS
) -> None:
  """Validates an output file's path before any work: a known format (by extension), not a folder, not one of the
  inputs, in a folder that can be created and written, and not an existing file unless --overwrite. None / '-' is
  stdout (JSONL)."""
  if path is None or path == "-":
    return
  out = Path(path)
  if out.suffix.lower() not in formats:
    raise UsageError(f"{flag} {path}: unknown format {out.suffix or '(no extension)'}; use {', '.join(formats)}")
  if out.is_dir():
    raise UsageError(f"{flag} {path} is a directory, expected a file")
  resolved = out.resolve()
  for i in inputs:
    if i is not None and Path(i).resolve() == resolved:
      raise UsageError(f"{flag} {path} is also an input: choose another file")
  if out.exists() and not overwrite:
    raise UsageError(f"{flag} {path} exists: pass --overwrite to replace it")
  check_outdir(str(out.parent), f"the folder of {flag}")
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
  fmt = out.suffix.lower()
  columns = list(dict.fromkeys(k for row in rows for k in row))
  if fmt == ".parquet":
    import pyarrow as pa  # optional (the [data] extra), checked by check_output
    import pyarrow.parquet as pq

    with files.atomic_path(out, suffix=".parquet") as tmp:
      pq.write_table(pa.Table.from_pylist(rows), tmp)
  elif fmt == ".csv":
    with files.atomic_write(out, newline="") as f:
      writer = csv.DictWriter(f, fieldnames=columns)
      writer.writeheader()
      writer.writerows(rows)
  else:
    with files.atomic_write(out) as f:
      for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")


def non_finite(row: dict) -> str | None:
  """The first key of `row` holding a NaN or infinite number (such a value is never written as a result)."""
  for k, v in row.items():
    if isinstance(v, float) and not math.isfinite(v):
      return k
  return None


def write_rows(rows, total: int, output: str | None, desc: str, skips: Skips, rank_by: str | None = None) -> int:
  """Collects result rows with a progress bar (rows with an 'error', or a non-finite value, go to the skip report),
  adds per-prompt ranks when asked, writes them (`write_table`) and reports; -> exit code."""
  done = []
  with progress(total, desc) as bar:
    for row in rows:
      bar.update(1)
      if "error" in row:
        skips.add(row["image"], row["error"])
        continue
      bad = non_finite(row)
      if bad is not None:
        skips.add(row.get("image"), f"{bad} is {row[bad]} (non-finite: check the checkpoint's weights)")
        continue
      done.append(row)
  if rank_by is not None:
    add_ranks(done, rank_by)
  write_table(done, output)
  if output is not None and output != "-":
    say_wrote(output, f"{len(done)} rows")
  return report_skips(skips, len(done))


# ------------------------------------------------------------------------------------------------------------
# streamed, resumable scoring (`hps-jax score` / `aesthetic`)
# ------------------------------------------------------------------------------------------------------------
class ScoreInput(NamedTuple):
  """One input of a scoring run, in the run's deterministic input order. `image` is its identity, the row's
  `image` (a path, or `SHARD.tar/KEY.EXT` for a webdataset sample); `source` what the scorer reads (the path, or
  the encoded bytes); `prompt` / `caption` what the row records with it (checked again on --resume)."""

  image: str
  source: object
  prompt: str | None = None
  caption: str | None = None


def add_resume_arg(p, output: str = "--output") -> None:
  p.add_argument(
    "--resume",
    action="store_true",
    help=f"continue the run a kill or stop left in {output.lstrip('-').upper()}.partial: the same settings and "
    "inputs are required (checked), the inputs already done are not scored again (at most one chunk of work is "
    f"lost); needs {output}. A run that is killed, stopped or fails keeps what it did in that .partial file; a run "
    "without --resume starts afresh",
  )


def check_resumable(output: str | None, settings: dict, resume: bool) -> None:
  """Refuses (ResumeError, exit 2) a --resume of OUTPUT.partial written with other settings, before any model is
  loaded; nothing to check without --resume or without a partial run."""
  if resume and output is not None and output != "-":
    partial = Path(output).with_name(Path(output).name + ".partial")
    if partial.exists():
      files.JsonlAppender(output, settings, resume=True).close()


def _identified(inputs: Iterable[ScoreInput], score: Callable) -> Iterator[tuple[ScoreInput, dict]]:
  """(input, row) pairs: `score(inputs)` yields one row per input, in order (it may read ahead); each row is named by
  its input's identity (an error about in-memory bytes names the input, not '<bytes of N bytes>')."""
  pending: collections.deque[ScoreInput] = collections.deque()

  def feed():
    for item in inputs:
      pending.append(item)
      yield item

  for row in score(feed()):
    item = pending.popleft()
    if "error" in row and not isinstance(item.source, (str, os.PathLike)):
      prefix = describe_source(item.source) + ": "
      err = str(row["error"])
      row["error"] = item.image + ": " + (err[len(prefix) :] if err.startswith(prefix) else err)
    row["image"] = item.image
    bad = None if "error" in row else non_finite(row)
    if bad is not None:
      why = f"{bad} is {row[bad]} (non-finite: check the checkpoint's weights)"
      row = {k: v for k, v in row.items() if not (isinstance(v, float) and not math.isfinite(v))}
      row["error"] = why
    yield item, row


def _mismatch(item: ScoreInput, row: dict) -> str | None:
  for key, want in (("image", item.image), ("prompt", item.prompt), ("caption", item.caption)):
    if (key == "image" or key in row) and row.get(key) != want:
      return f"{key} {row.get(key)!r} where the input now gives {want!r}"
  return None


def stream_rows(
  inputs: Iterable[ScoreInput],
  score: Callable[[Iterable[ScoreInput]], Iterator[dict]],
  *,
  output: str | None,
  desc: str,
  skips: Skips,
  total: int | None = None,
  rank_by: str | None = None,
  resume: bool = False,
  settings: dict | None = None,
  chunk: int = 32,
  on_chunk: Callable[[list[tuple[int, ScoreInput, dict]]], None] | None = None,
  on_finish: Callable[[list[dict]], None] | None = None,
) -> int:
  """Scores a stream of inputs with bounded memory and writes the rows; -> exit code.

  `score(inputs)` yields one row dict per input, in order ({'error': ...} for an unreadable one). To stdout (no
  `output`) the rows are collected and written as `write_rows` does. To a file, rows are appended as they come,
  `chunk` at a time, to OUTPUT.partial (`hps_jax.files.JsonlAppender`, each chunk fsynced; `settings` recorded next
  to it), error rows included; with `resume` a partial run with equal settings is continued: its rows must match
  the first inputs one for one (identity, prompt, caption), those inputs are not scored again. A kill, a stop
  (SIGTERM / SIGINT) or an error leaves the partial files for a later resume (OUTPUT itself is only ever written
  complete); a run without `resume` starts afresh. At the end the
  complete partial file is read back: error rows go to the skip report, `rank_by` ranks are added, `on_finish(rows)`
  runs and OUTPUT is written atomically (JSONL / CSV / Parquet); then the partial files are removed.

  `on_chunk([(position, input, row), ...])` runs on each chunk before it is appended (it may add fields to the
  rows; what it writes must be done when the rows are recorded: a kill in between redoes the chunk)."""
  if output is None or output == "-":
    rows = (row for _, row in _identified(inputs, score))
    if on_chunk is not None or on_finish is not None:
      raise UsageError("this run writes files next to its results: give --output")
    return write_rows(rows, total, output, desc, skips, rank_by=rank_by)
  appender = files.JsonlAppender(output, settings or {}, resume=resume)
  done = appender.rows
  try:
    rows = _stream_to(appender, inputs, score, desc=desc, total=total, chunk=chunk, on_chunk=on_chunk)
    if done:
      scored = f"{appender.rows_written} inputs scored now, {len(done)} taken from the partial run"
      print(f"resumed run: {scored}", file=sys.stderr)
    for row in rows:
      if "error" in row:
        skips.add(row["image"], row["error"])
    rows = [row for row in rows if "error" not in row]
    if rank_by is not None:
      add_ranks(rows, rank_by)
    if on_finish is not None:
      on_finish(rows)
    write_table(rows, output)
  except BaseException:
    with contextlib.suppress(OSError):
      appender.close()
    # the rows scored so far stay in OUTPUT.partial (OUTPUT itself is only written complete): a preempted job
    # continues where it stopped with --resume
    if appender.partial.exists() and appender.partial.stat().st_size:
      print(f"the rows scored so far are kept in {appender.partial}: rerun with --resume to continue", file=sys.stderr)
    raise
  appender.partial.unlink(missing_ok=True)
  appender.meta.unlink(missing_ok=True)
  say_wrote(output, f"{len(rows)} rows")
  return report_skips(skips, len(rows))


def _stream_to(appender, inputs, score, *, desc, total, chunk, on_chunk) -> list[dict]:
  """`stream_rows`' file part: checks the recorded rows against the first inputs, scores the others, appends their
  rows a chunk at a time; -> every row of the complete partial file, read back."""
  done = appender.rows
  it = iter(inputs)
  for i, row in enumerate(done):
    item = next(it, None)
    bad = "the inputs end before it" if item is None else _mismatch(item, row)
    if bad is not None:
      raise files.ResumeError(
        f"{appender.partial}:{i + 1}: cannot resume, the recorded row does not match input {i + 1} ({bad}): the "
        "inputs changed since the partial run; rerun without --resume to start over"
      )
  if done:
    to_go = f", {total - len(done)} to go" if total is not None else ""
    print(f"resumed: {len(done)} done{to_go} (from {appender.partial})", file=sys.stderr)
  position, buf = len(done), []

  def flush():
    if on_chunk is not None:
      on_chunk(buf)
    try:
      appender.write([row for _, _, row in buf])
    except OSError as e:  # a full disk, a file size limit: name the file
      raise OSError(e.errno, f"cannot write it ({e.strerror or e})", str(appender.partial)) from e
    buf.clear()

  with progress(total, desc) as bar:
    bar.update(len(done))
    for item, row in _identified(it, score):
      buf.append((position, item, row))
      position += 1
      bar.update(1)
      if len(buf) >= chunk:
        flush()
    flush()
  appender.close()
  return [json.loads(line) for line in appender.partial.read_bytes().splitlines()]


# ------------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------------
def read_pairs(path: str, skips: Skips, *, allow_outside: bool = False) -> Iterator[tuple[str, str]]:
  """A JSONL of {"image": PATH, "prompt": TEXT} rows; relative image paths are relative to the file and stay in
  its folder unless `allow_outside` (--allow-outside-paths)."""
  try:
    yield from read_image_rows(path, skips.add, require_prompt=True, allow_outside=allow_outside)
  except InputError:
    raise
  except ValueError as e:
    raise UsageError(f"cannot read pairs file {path}: {e.__cause__ or e}") from e


def add_paths_arg(p) -> None:
  """--allow-outside-paths: what lets relative paths read from files leave their file's folder."""
  p.add_argument(
    "--allow-outside-paths",
    action="store_true",
    help="let relative image paths in JSONL / metadata files climb out of the file's folder with '..' (refused by "
    "default: a dataset folder is self-contained; absolute paths are always taken as written)",
  )


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


def integer(lo: int | None = 1, hi: int | None = None, *, multiple_of: int = 1):
  """An argparse type: an integer in [lo, hi] (None: unbounded), a multiple of `multiple_of` when > 1; anything else
  is a usage error naming the option (argparse adds it) and the expected range."""

  def parse(text: str) -> int:
    try:
      value = int(text, 10)
    except (TypeError, ValueError):
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi) or value % multiple_of:
      rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]" if lo is not None else f"<= {hi}"
      extra = f", a multiple of {multiple_of}" if multiple_of > 1 else ""
      raise argparse.ArgumentTypeError(f"expected an integer {rng}{extra}, got {text}")
    return value

  parse.__name__ = "integer"
  return parse


def real(lo: float | None = None, hi: float | None = None):
  """An argparse type: a finite number in [lo, hi] (nan and inf are refused: they would silently produce black
  images or NaN scores)."""

  def parse(text: str) -> float:
    try:
      value = float(text)
    except (TypeError, ValueError):
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
      raise argparse.ArgumentTypeError(f"expected a finite number, got {text}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
      rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]" if lo is not None else f"<= {hi}"
      raise argparse.ArgumentTypeError(f"expected a number {rng}, got {text}")
    return value

  parse.__name__ = "number"
  return parse


def text(value: str) -> str:
  """An argparse type for free text (prompts): it must be valid Unicode. An argument holding bytes that are not
  UTF-8 arrives with lone surrogates, which no output file can hold."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError:
    raise argparse.ArgumentTypeError(f"not valid UTF-8 text: {value.encode('utf-8', 'replace').decode()!r}") from None
  return value


# the kinds of integer option every command shares
COUNT = integer(1)  # batch sizes, steps, splits, images per prompt
LIMIT = integer(0)  # caps where 0 means "no cap"
SEED = integer(0, 2**32 - 1)
IMAGE_SIDE = integer(8, 8192, multiple_of=8)  # the VAE downsamples by 8


def check_outdir(path: str, flag: str = "--outdir") -> Path:
  """An output folder: created if missing; an existing file there is a usage error (not a traceback)."""
  out = Path(path)
  if out.exists() and not out.is_dir():
    raise UsageError(f"{flag} {path} is a file, expected a folder")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f"{flag} {path}: cannot create it ({e.strerror or e})") from e
  if not os.access(out, os.W_OK):
    raise UsageError(f"{flag} {path} is not writable")
  return out


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
  p.add_argument("--max-prompts", type=LIMIT, default=0, help="use only the first N prompts (0 = all)")
  p.add_argument("--seed", type=SEED, default=0, help=seed_help)
  p.add_argument("--synthetic-size", type=COUNT, default=200, help="prompts of the synthetic set")
  p.add_argument("--synthetic-image-size", type=COUNT, default=48, help="image size of the synthetic set")


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
  p.add_argument(
    "--allow-config-change",
    action="store_true",
    help="resume WORKDIR's run with a config that differs from its config.json (refused otherwise; the change is "
    "appended to WORKDIR/config_history.jsonl). num_steps, num_epochs, the log / eval / checkpoint cadence, the "
    "mesh and the evaluation settings may change on resume without it",
  )
  p.set_defaults(accepts_config_overrides=True)


def run_training(args, run: Callable, describe: Callable) -> int:
  """The one wiring of the training commands: config (+ overrides), its values checked before anything is built
  (bad ones: one line naming the key, exit 2) -> --dry-run description, or run(config, workdir) with resume from
  WORKDIR's last checkpoint (the loop's process 0 writes WORKDIR/config.json); the summary (status, step, parameter
  counts, eval, export) is printed as one JSON line. Exit 0 done, 3 stopped on a non-finite loss; a SIGTERM /
  SIGINT stops at a checkpoint (`hps_jax.errors.Interrupted`, which `main` turns into exit 143 / 130).

  WORKDIR is locked for the whole run, task building included (a second run there fails at once naming the first's
  pid), and a resumed run whose config differs from WORKDIR/config.json is refused before any model is built unless
  --allow-config-change (`hps_jax.train_loop.check_config_change`: which keys may change freely)."""
  from hps_jax import train_loop  # JAX: only when a training command runs

  config = load_config(args.config, args.overrides)
  try:
    train_loop.validate_config(config)
  except InputError as e:
    raise UsageError(str(e)) from e
  workdir = Path(args.workdir)
  if args.dry_run:
    try:
      print(describe(config, workdir))
    except (ValueError, FileNotFoundError) as e:
      raise UsageError(str(e)) from e
    print(config)
    return EXIT_OK
  allow = bool(getattr(args, "allow_config_change", False))
  workdir.mkdir(parents=True, exist_ok=True)
  try:
    with train_loop.workdir_lock(workdir), train_loop.allowing_config_change(allow):
      train_loop.check_config_change(config, workdir)  # before the task is built: a refusal costs nothing
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


def named_specs(
  specs: list[str] | None, flag: str, value: str, *, check: Callable[[str], None] | None = None
) -> list[tuple[str, str]]:
  """Repeated `flag NAME=VALUE` options -> [(name, value)] in the order given: NAME is what precedes the first `=`,
  non-empty, each NAME once; `check(name)` may refuse a name (raising UsageError). UsageError (exit 2) naming the
  option otherwise."""
  out: dict[str, str] = {}
  for spec in specs or []:
    name, eq, val = spec.partition("=")
    name = name.strip()
    if not eq or not name or not val:
      raise UsageError(f"{flag} {spec}: expected NAME={value}")
    if check is not None:
      check(name)
    if name in out:
      raise UsageError(f"{flag} {name} is given twice")
    out[name] = val
  return list(out.items())
