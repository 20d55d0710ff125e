"""`hps-jax study`: human A/B preference studies (the paper's user study, Fig. 8 / Table 3). `study create` builds a
study file from two or more systems' images; the file's format and the alignment rules are documented in
`hps_jax.study.create`. Each action registers itself under `study` with `add_<action>(actions)` (`serve` and
`report` are added the same way)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hps_jax.cli.common import (
  LIMIT,
  SEED,
  UsageError,
  add_parser,
  add_paths_arg,
  check_output,
  progress,
  report_skips,
  say_wrote,
)
from hps_jax.data.skips import Skips
from hps_jax.errors import InputError
from hps_jax.study.create import (
  CHECKS_DIR,
  DEFAULT_INSTRUCTIONS,
  DEFAULT_TITLE,
  FOLDER_MANIFESTS,
  MAX_TEXT_CHARS,
  Options,
  ab_sources,
  build_study,
  check_kinds,
  check_name,
  system_source,
  write_study,
)


def add_study(sub):
  p = add_parser(
    sub,
    "study",
    help="human A/B preference studies: create a study file (serve and report come next)",
    description="A human A/B preference study, as in the paper's user study (base vs HPS-adapted Stable Diffusion): "
    "`study create` pairs the images of two or more systems by prompt (and seed) into a study file that a study "
    "server shows to participants, one pair at a time, sides randomized.",
  )
  actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions", required=True)
  add_create(actions)


def add_create(actions):
  c = add_parser(
    actions,
    "create",
    help="a study file (JSON) from `sample --ab` output or two or more systems' image folders / manifests",
    description="Writes STUDY.json (format hps-jax-study/1, described in hps_jax.study.create): every image with its "
    "sha256 and size (each is fully decoded first), the test pairs (two systems' images of one prompt, in system-name "
    "order: sides are randomized per participant when served), the attention checks with their expected answers, "
    "and the settings. Sources: --ab OUTDIR pairs OUTDIR/base and OUTDIR/adapted by prompt and seed; --system "
    "NAME=PATH (two or more) takes an image folder (matched by file name across systems), a folder with "
    "samples.jsonl / metadata.jsonl, or a JSONL manifest of {image, prompt[, seed]} rows (matched by prompt: equal "
    "seeds first, the rest drawn with --seed, each image in at most one pair per pair of systems). With 3+ systems "
    "every pair of systems is compared on each prompt (--pairs-per-prompt caps that). Exit 1 when some images or "
    "prompts could not be paired (each named in the summary; the study holds the rest), 2 when nothing can be.",
  )
  src = c.add_argument_group("images (--ab, or two or more --system)")
  src.add_argument("--ab", metavar="OUTDIR", help="the --outdir of `hps-jax sample --ab` (base/ and adapted/)")
  src.add_argument(
    "--names",
    nargs=2,
    metavar=("BASE", "ADAPTED"),
    help="with --ab: the names of the two systems (base and adapted unless given)",
  )
  src.add_argument(
    "--system",
    action="append",
    metavar="NAME=PATH",
    help="a system's images: an image folder, a folder with samples.jsonl / metadata.jsonl, or a JSONL manifest of "
    "{image, prompt} rows; repeat for each system. NAME: letters, digits, _ . + - (not 'tie')",
  )
  add_paths_arg(src)
  c.add_argument("--out", required=True, metavar="STUDY.json", help="the study file (check images go next to it)")
  c.add_argument("--overwrite", action="store_true", help="replace an existing study file and its check images")
  c.add_argument(
    "--pairs-per-participant",
    type=LIMIT,
    default=0,
    metavar="N",
    help="test pairs each participant answers, drawn at random per participant when served (0: all test pairs)",
  )
  c.add_argument(
    "--pairs-per-prompt",
    type=LIMIT,
    default=0,
    metavar="N",
    help="at most N test pairs per prompt, drawn with --seed in turn over the pairs of systems (0: every pair that "
    "can be formed: all pairs of systems, every image once per pair of systems)",
  )
  answer = c.add_mutually_exclusive_group()
  answer.add_argument(
    "--forced-choice",
    dest="allow_tie",
    action="store_false",
    help="participants must pick one image of each pair (the default)",
  )
  answer.add_argument(
    "--allow-tie", dest="allow_tie", action="store_true", help='participants may also answer "can\'t decide"'
  )
  c.set_defaults(allow_tie=False)
  c.add_argument(
    "--checks",
    type=LIMIT,
    default=0,
    metavar="N",
    help="N attention checks shown to every participant besides the test pairs: the same image twice (expected "
    "answer: tie; needs --allow-tie), or with --broken-checks an image next to a heavily blurred and noised copy "
    "(expected: the intact image's system)",
  )
  c.add_argument(
    "--broken-checks",
    action="store_true",
    help="make the checks broken-image checks (with --allow-tie: identical and broken checks alternate); the broken "
    f"copies are written to {CHECKS_DIR}/ next to the study file",
  )
  c.add_argument("--seed", type=SEED, default=0, help="seeds the pairing of multi-image prompts and the checks")
  c.add_argument("--title", default=DEFAULT_TITLE, help="the study's title, shown to participants")
  c.add_argument("--instructions", default=DEFAULT_INSTRUCTIONS, help="shown to participants before the first pair")
  c.add_argument("--consent", metavar="FILE", help="a UTF-8 text file: the consent text participants must accept")
  c.set_defaults(run=run_create)


def _system_specs(specs: list[str]) -> list[tuple[str, str]]:
  out, seen_names, seen_paths = [], {}, {}
  for spec in specs:
    name, eq, path = spec.partition("=")
    if not eq or not path:
      raise UsageError(f"--system {spec}: expected NAME=PATH")
    try:
      check_name(name, "--system name")
    except InputError as e:
      raise UsageError(str(e)) from None
    if name in seen_names:
      raise UsageError(f"--system {name} is given twice")
    real = os.path.realpath(path)
    if real in seen_paths:
      raise UsageError(f"--system {name}={path}: the same images as --system {seen_paths[real]}")
    if not os.path.exists(path):
      raise UsageError(f"--system {name}={path}: no such file or folder")
    seen_names[name] = path
    seen_paths[real] = name
    out.append((name, path))
  return out


def _read_consent(path: str | None) -> str | None:
  if path is None:
    return None
  p = Path(path)
  try:
    if p.stat().st_size > 4 * MAX_TEXT_CHARS:
      raise UsageError(f"--consent {path}: larger than a consent text may be ({MAX_TEXT_CHARS} characters)")
    text = p.read_bytes().decode("utf-8-sig")
  except OSError as e:
    raise UsageError(f"--consent {path}: cannot read it ({e.strerror or e})") from e
  except UnicodeDecodeError as e:
    raise UsageError(f"--consent {path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
  text = text.strip()
  if not text or len(text) > MAX_TEXT_CHARS or "\x00" in text:
    raise UsageError(f"--consent {path}: expected a non-empty text of at most {MAX_TEXT_CHARS} characters")
  return text


def _inputs(args, systems: list[tuple[str, str]]) -> list[str]:
  """The files the command reads that --out must not replace."""
  found = [args.consent]
  if args.ab:
    found += [os.path.join(args.ab, sub, "samples.jsonl") for sub in ("base", "adapted")]
  for _, path in systems:
    found += [path] if os.path.isfile(path) else [os.path.join(path, m) for m in FOLDER_MANIFESTS]
  return found


def run_create(args) -> int:
  if bool(args.ab) == bool(args.system):
    raise UsageError("give the images: --ab OUTDIR, or two or more --system NAME=PATH")
  if args.names and not args.ab:
    raise UsageError("--names names the two systems of --ab; --system gives each name with its images")
  systems = _system_specs(args.system or [])
  if args.system and len(systems) < 2:
    raise UsageError(f"a study compares two or more systems: got one (--system {args.system[0]})")
  names = tuple(args.names or ("base", "adapted"))
  try:
    for name in names:
      check_name(name, "--names")
  except InputError as e:
    raise UsageError(str(e)) from None
  if names[0] == names[1]:
    raise UsageError(f"--names: the two systems need different names, got {names[0]} twice")
  check_output(args.out, overwrite=args.overwrite, inputs=_inputs(args, systems), flag="--out", formats=(".json",))
  if args.broken_checks and not args.checks:
    raise UsageError("--broken-checks sets the kind of the attention checks: give their number with --checks N")
  try:
    kinds = check_kinds(args.checks, allow_tie=args.allow_tie, broken=args.broken_checks)
  except InputError as e:
    raise UsageError(str(e)) from None
  out = Path(args.out)
  for i in range(1, kinds.count("broken") + 1):
    check_file = out.parent / CHECKS_DIR / f"broken-{i:03d}.png"
    if check_file.exists() and not args.overwrite:
      raise UsageError(f"{check_file} exists (a check image of an earlier study): pass --overwrite to replace it")
  options = Options(
    pairs_per_participant=args.pairs_per_participant,
    pairs_per_prompt=args.pairs_per_prompt,
    allow_tie=args.allow_tie,
    checks=args.checks,
    broken_checks=args.broken_checks,
    seed=args.seed,
    title=args.title,
    instructions=args.instructions,
    consent=_read_consent(args.consent),
  )

  skips = Skips()
  allow = args.allow_outside_paths
  if args.ab:
    sources = ab_sources(args.ab, names, skips=skips, allow_outside=allow)
  else:
    exclude = str(out.parent / CHECKS_DIR)
    sources = [system_source(n, p, skips=skips, allow_outside=allow, exclude=exclude) for n, p in systems]
  with progress(sum(len(s.entries) for s in sources), "checking images") as bar:
    study, check_files = build_study(sources, out, options, skips, bar.update)
  write_study(out, study, check_files)

  s, counts = study["settings"], study["counts"]
  answer = "ties allowed" if s["allow_tie"] else "forced choice"
  print(
    f"study: {len(study['systems'])} systems ({', '.join(study['systems'])}), {len(study['images'])} images, "
    f"{counts['test_pairs']} test pairs, {counts['checks']} checks; each participant answers "
    f"{s['pairs_per_participant']} test pairs and every check ({answer})",
    file=sys.stderr,
  )
  if counts["left_out_by_pairs_per_prompt"]:
    print(f"  {counts['left_out_by_pairs_per_prompt']} pairs left out by --pairs-per-prompt", file=sys.stderr)
  say_wrote(out, f"the study ({counts['test_pairs']} test pairs, {counts['checks']} checks)")
  return report_skips(skips, counts["test_pairs"], noun="test pairs")
