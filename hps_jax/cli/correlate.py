"""`hps-jax correlate`: how much two or more per-image scores agree (the paper's Fig. 6 plots HPS against CLIP score
per image): Pearson, Spearman and Kendall tau-b for every pair of scores, over all images and within prompts, with
bootstrap CIs and p-values (`hps_jax.metrics.correlation` defines them).

Scores come from score files (`--scores NAME=FILE.jsonl[:FIELD]`, rows as `hps-jax score` / `aesthetic` /
`benchmark` write them), joined on (image, prompt) (on the image alone for a file whose rows carry no prompt, such
as `hps-jax aesthetic`'s), or are computed here from a pairs file (`--input`) with scorers given as options (one
decoding pass for all of them).

Exit codes: 0 all done; 1 some images were left out (missing from a file, an `error` row, an unreadable image) or a
score is constant (its coefficients are reported as undefined), each named on stderr; 2 bad usage or input (a
duplicate row, a non-finite or non-numeric value: one line naming FILE:LINE; every pair undefined).
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from hps_jax import files
from hps_jax.cli.benchmark import add_scorer_args, scorers_from_args, specs_from_args
from hps_jax.cli.common import (
  COUNT,
  SEED,
  UsageError,
  add_parser,
  add_paths_arg,
  check_outdir,
  integer,
  named_specs,
  progress,
  read_pairs,
  report_skips,
  require_finite,
  say_wrote,
  write_json,
  write_table,
)
from hps_jax.data.images import describe
from hps_jax.data.pairs import jsonl_objects
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError
from hps_jax.metrics import correlation as corr
from hps_jax.metrics.multiscore import MultiScorer, describe_scorer

DEFAULT_FIELDS = ("hps", "aesthetic", "score")
OUTPUTS = ("correlation.json", "correlation.md", "scatter.png", "scores.jsonl")
_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def add_correlate(sub):
  p = add_parser(
    sub,
    "correlate",
    help="per-image agreement of two or more scores (Pearson / Spearman / Kendall)",
    description="How much per-image scores agree (the HPS paper's Fig. 6: HPS against CLIP score per image). For "
    "every pair of scores: Pearson r, Spearman rho and Kendall tau-b over all images ('global', CI resampling "
    "images) and within prompts ('pooled': values centered / ranked within each prompt, Kendall over same-prompt "
    "pairs; 'mean': the mean of each prompt's own coefficient; CIs resampling prompts), with scipy's p-values. "
    "A constant score has no coefficient: it is reported as undefined, with the reason.",
  )
  src = p.add_argument_group("inputs (one of)")
  src.add_argument(
    "--scores",
    action="append",
    metavar="NAME=FILE.jsonl[:FIELD]",
    help="a score file as `hps-jax score` / `aesthetic` / `benchmark` write it (JSONL rows with image, prompt and "
    f"numbers); FIELD: the number to use (default: the first of {', '.join(DEFAULT_FIELDS)} present). Repeat it "
    "(at least twice; one file may give several fields: clip=s.jsonl:cosine hps=s.jsonl:hps). Files are joined on "
    "(image, prompt), on the image alone for a file without prompts",
  )
  src.add_argument(
    "--input",
    metavar="PAIRS.jsonl",
    help='score the {"image", "prompt"} rows of this file here, with the scorers given by the options below',
  )
  add_paths_arg(p)
  add_scorer_args(p)
  p.add_argument(
    "--out",
    metavar="DIR",
    help="write DIR/correlation.json, correlation.md and scatter.png (and, with --input, the per-image scores "
    "DIR/scores.jsonl, reusable with --scores NAME=DIR/scores.jsonl:NAME)",
  )
  p.add_argument("--no-scatter", action="store_true", help="do not draw DIR/scatter.png (no matplotlib needed)")
  p.add_argument("--bootstrap", type=COUNT, default=1000, help="bootstrap replicates of each 95%% CI")
  p.add_argument("--seed", type=SEED, default=0, help="seeds the bootstrap resampling")
  p.add_argument(
    "--min-per-prompt",
    type=integer(2),
    default=3,
    help="prompts with fewer images take no part in the within-prompt coefficients",
  )
  p.set_defaults(run=run_correlate)


def run_correlate(args) -> int:
  if bool(args.scores) == bool(args.input):
    raise UsageError("give either --scores NAME=FILE.jsonl[:FIELD] (at least twice) or --input PAIRS.jsonl")
  if args.scores and (args.checkpoint or args.aesthetic):
    raise UsageError("--checkpoint / --aesthetic score --input's images; with --scores the scores are read from files")
  out = Path(args.out) if args.out else None
  inputs = []
  if args.scores:
    specs = [
      (name, *_split_source(name, value)) for name, value in named_specs(args.scores, "--scores", "FILE.jsonl[:FIELD]")
    ]
    if len(specs) < 2:
      raise UsageError("--scores: give at least two scores to correlate")
    inputs = [path for _, path, _ in specs]
  else:
    inputs = [args.input]
  if out is not None:
    _check_out(out, inputs)
    if not args.no_scatter:
      corr.check_matplotlib()
  skips = Skips()
  images = None
  if args.scores:
    cols, prompts, sources = read_score_files(specs, skips)
  else:
    cols, prompts, sources, images = score_pairs(args, skips)
  n = len(next(iter(cols.values())))
  if n < corr.MIN_IMAGES:
    where = "in every score file" if args.scores else "scored"
    first = f" (first left out: {skips.items[0][0]}: {skips.items[0][1]})" if skips.items else ""
    raise InputError(f"only {n} images {where}: at least {corr.MIN_IMAGES} are needed to correlate{first}")
  _check_constant(cols, sources, skips)
  report = corr.correlate(cols, prompts, n_boot=args.bootstrap, seed=args.seed, min_per_prompt=args.min_per_prompt)
  report["inputs"] = sources
  report["skipped"] = [{"what": what, "why": why} for what, why in skips.items]
  require_finite(report, "the correlation report")
  table = corr.markdown(report)
  sys.stdout.write(table)
  sys.stdout.flush()
  if out is not None:
    write_json(out / "correlation.json", report)
    files.write_text(out / "correlation.md", table)
    say_wrote(f"{out / 'correlation.json'} and {out / 'correlation.md'}", "the correlation report")
    if not args.no_scatter:
      corr.scatter_png(out / "scatter.png", cols, report)
      say_wrote(out / "scatter.png", "the scatter plot")
    if images is not None:  # the scores computed here, reusable with --scores NAME=scores.jsonl:NAME
      rows = [
        {"image": img, "prompt": prompts[i], **{k: float(v[i]) for k, v in cols.items()}}
        for i, img in enumerate(images)
      ]
      write_table(rows, str(out / "scores.jsonl"))
      say_wrote(out / "scores.jsonl", f"the scores of {len(rows)} images")
  return report_skips(skips, n, "images")


def _check_out(out: Path, inputs) -> None:
  check_outdir(str(out), "--out")
  resolved = {Path(i).resolve() for i in inputs}
  for name in OUTPUTS:
    if (out / name).resolve() in resolved:
      raise UsageError(f"--out {out}: {name} would replace an input; choose another folder")


def _check_constant(cols: dict, sources: dict, skips: Skips) -> None:
  """A constant score has no correlation with anything: every pair undefined -> exit 2; some -> named (exit 1)."""
  const = [k for k, v in cols.items() if np.all(v == v[0])]
  n = len(next(iter(cols.values())))
  if len(cols) - len(const) < 2:
    k = const[0]
    raise InputError(
      f"score {k} ({_describe_source(sources[k])}) is constant over all {n} images (every image scores "
      f"{cols[k][0]:.6g}): no correlation is defined"
    )
  for k in const:
    skips.add(
      f"score {k} ({_describe_source(sources[k])})",
      f"constant over all {n} images (every image scores {cols[k][0]:.6g}): its coefficients are undefined",
    )


def _describe_source(src: dict) -> str:
  if "file" in src:
    return f"{src['file']}:{src['field']}"
  return src.get("checkpoint", "")


# ----------------------------------------------------------------------------------------------------- --scores
def _split_source(name: str, value: str) -> tuple[str, str | None]:
  """FILE[:FIELD] -> (FILE, FIELD or None); a value naming an existing file is taken whole (a path may hold ':')."""
  if os.path.isfile(value) or ":" not in value:
    return value, None
  head, _, field = value.rpartition(":")
  if head and _FIELD.fullmatch(field):
    return head, field
  if not field:
    raise UsageError(f"--scores {name}={value}: expected NAME=FILE.jsonl[:FIELD], the FIELD is empty")
  return value, None


class _ScoreFile:
  """The rows of one score file: key (image, prompt or None) -> (FILE:LINE, row); `errors` the rows with an
  'error' (key -> (FILE:LINE, message)); `has_prompt`: whether its rows carry prompts (decided by the first row)."""

  def __init__(self, path: str, skips: Skips):
    self.path = path
    self.rows: dict[tuple, tuple[str, dict]] = {}
    self.errors: dict[tuple, tuple[str, str]] = {}
    self.shown: dict[tuple, str] = {}  # key -> the image as written
    self.has_prompt: bool | None = None
    lines: dict[tuple, str] = {}
    for where, row in jsonl_objects(path, skips.add):
      image = row.get("image") if isinstance(row, dict) else None
      if not isinstance(image, str) or not image:
        skips.add(where, 'expected a JSON object with a string "image"')
        continue
      if self.has_prompt is None:
        self.has_prompt = "prompt" in row
      prompt = row.get("prompt")
      if self.has_prompt and not isinstance(prompt, str):
        got = "missing" if "prompt" not in row else f"a JSON {type(prompt).__name__}"
        raise InputError(f'{where}: "prompt" is {got}, expected a string (the file\'s first row has a prompt)')
      if not self.has_prompt and "prompt" in row:
        raise InputError(f'{where}: a "prompt", but the file\'s first row has none (join on one or the other)')
      key = (os.path.normpath(image), prompt if self.has_prompt else None)
      if key in lines:
        what = f"image {image}" + (f" with prompt {prompt!r}" if self.has_prompt else "")
        raise InputError(f"{where}: duplicate row for {what} (first at line {lines[key].rsplit(':', 1)[1]})")
      lines[key] = where
      self.shown[key] = image
      if "error" in row:
        self.errors[key] = (where, str(row["error"]))
      else:
        self.rows[key] = (where, row)
    if not lines:
      raise InputError(f"{path}: no score rows (expected JSON objects with image, prompt and a number per line)")

  def default_field(self, name: str, value: str) -> str:
    first = next(iter(self.rows.values()), None)
    if first is None:
      raise InputError(f"{self.path}: every row is an error row, no score to read")
    row = first[1]
    for f in DEFAULT_FIELDS:
      if f in row:
        return f
    numeric = [k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    raise UsageError(
      f"--scores {name}={value}: {first[0]} has none of the fields {', '.join(DEFAULT_FIELDS)}; name one "
      f"({name}={self.path}:FIELD; numeric fields: {', '.join(numeric) or 'none'})"
    )

  def value(self, key: tuple, field: str) -> float:
    where, row = self.rows[key]
    if field not in row:
      raise InputError(f"{where}: no field {field!r} (fields: {', '.join(row)})")
    v = row[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      raise InputError(f"{where}: {field} is {json_type(v)}, expected a number")
    v = float(v)
    if not math.isfinite(v):
      raise InputError(f"{where}: {field} is {v} (non-finite): refused")
    return v


def json_type(v) -> str:
  if v is None:
    return "null"
  return "a JSON " + {str: "string", list: "array", dict: "object"}.get(type(v), type(v).__name__)


def read_score_files(specs: list[tuple[str, str, str | None]], skips: Skips):
  """({name: values}, prompts (None for images without one), {name: {file, field}}) of the images present (and
  not an error row) in every file; every other image is named in `skips` with what it lacks."""
  opened: dict[str, _ScoreFile] = {}
  for _, path, _ in specs:
    key = os.path.realpath(path)
    if key not in opened:
      opened[key] = _ScoreFile(path, skips)
  use = [(name, opened[os.path.realpath(path)], field) for name, path, field in specs]
  fields = {}
  for name, f, field in use:
    fields[name] = field or f.default_field(name, f"{f.path}")
  with_prompts = [f for _, f, _ in use if f.has_prompt]
  files_used = list({id(f): f for _, f, _ in use}.values())
  if with_prompts:
    candidates = list(dict.fromkeys(k for f in with_prompts for k in (*f.shown,)))
  else:
    candidates = list(dict.fromkeys(k for f in files_used for k in f.shown))
  shown = {}
  for f in files_used:
    for k, img in f.shown.items():
      shown.setdefault(k if f.has_prompt else (k[0], None), img)

  cols = {name: [] for name, _, _ in use}
  prompts: list[str | None] = []
  for key in candidates:
    problems = []
    for f in files_used:
      k = key if f.has_prompt else (key[0], None)
      if k in f.errors:
        problems.append(f"{f.errors[k][0]}: {f.errors[k][1]}")
      elif k not in f.rows:
        problems.append(f"not in {f.path}")
    if problems:
      skips.add(_show(shown.get(key, key[0]), key[1]), "; ".join(problems))
      continue
    for name, f, _ in use:
      cols[name].append(f.value(key if f.has_prompt else (key[0], None), fields[name]))
    prompts.append(key[1])
  if with_prompts:  # images of the prompt-less files that no file with prompts has
    known = {k[0] for k in candidates}
    for f in files_used:
      if not f.has_prompt:
        for k, img in f.shown.items():
          if k[0] not in known:
            skips.add(img, f"only in {f.path}: not in {', '.join(g.path for g in with_prompts)}")
  sources = {name: {"file": f.path, "field": fields[name]} for name, f, _ in use}
  arrays = {name: np.asarray(v, dtype=np.float64) for name, v in cols.items()}
  return arrays, (prompts if with_prompts else None), sources


def _show(image: str, prompt: str | None) -> str:
  return image if prompt is None else f"{image} (prompt {prompt!r})"


# ------------------------------------------------------------------------------------------------------ --input
def score_pairs(args, skips: Skips):
  """({name: values}, prompts, {name: scorer description}) of --input's pairs scored by the scorers of the
  command line, every image decoded once (`MultiScorer`); unreadable images go to `skips`."""
  specs = specs_from_args(args)
  if len(specs) < 2:
    raise UsageError("--input: give at least two scorers to correlate (--checkpoint NAME=CKPT / --aesthetic NAME=MLP)")
  items = list(read_pairs(args.input, skips, allow_outside=args.allow_outside_paths))
  seen = set()
  for image, prompt in items:
    if (image, prompt) in seen:
      raise InputError(f"{args.input}: image {image} with prompt {prompt!r} is listed twice")
    seen.add((image, prompt))
  scorers = scorers_from_args(args, specs)
  cols = {s.name: [] for s in specs}
  prompts, images = [], []
  with progress(len(items), "scoring") as bar:
    for src, prompt, _, values, err in MultiScorer(scorers).iter_scores((i, p, None) for i, p in items):
      bar.update(1)
      if err is not None:
        skips.add(describe(src), str(err))
        continue
      for name in cols:
        cols[name].append(values[name])
      prompts.append(prompt)
      images.append(describe(src))
  sources = {s.name: {"checkpoint": s.checkpoint, **describe_scorer(scorers[s.name])} for s in specs}
  return {k: np.asarray(v, dtype=np.float64) for k, v in cols.items()}, prompts, sources, images
